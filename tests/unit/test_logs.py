"""`Throttled`: the first line of a kind at once, then at most one per interval, saying how many it left out."""

from __future__ import annotations

import logging

import pytest

from app.logs import Throttled


def test_a_flood_of_one_kind_is_one_line_per_interval_counting_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttled = Throttled(logging.getLogger("flood"), interval_s=10.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="flood")
    for i in range(1000):
        now[0] = i * 0.01  # 1000 events in 10 s
        throttled.log("frame of request %s lost", i)
    now[0] = 10.5
    throttled.log("frame of request %s lost", "last")
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines == [
        (logging.WARNING, "frame of request 0 lost"),
        (logging.WARNING, "frame of request last lost (and 999 more like it in the last 10 s)"),
    ]


def test_what_it_leaves_out_still_goes_to_debug(caplog: pytest.LogCaptureFixture) -> None:
    throttled = Throttled(logging.getLogger("flood.debug"), clock=lambda: 0.0)
    caplog.set_level(logging.DEBUG, logger="flood.debug")
    for i in range(3):
        throttled.log("event %d", i)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "event 0"),
        (logging.DEBUG, "event 1"),
        (logging.DEBUG, "event 2"),
    ]
