"""LiveTunables: consumers get validated values; bad ones are logged once and ignored."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import msgspec
import pytest

from app.tunables import LiveTunables, Tunable
from tests.unit.tunables.fake_tunables import FakeTunables

LENGTH: Tunable[int] = Tunable("test/length", Annotated[int, msgspec.Meta(ge=0)], 100, "a length")
NAME: Tunable[str] = Tunable("test/name", str, "a", "a name")


class Changes:
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def __call__(self, tunable: Tunable[Any], value: Any) -> None:
        self.seen.append((tunable.key, value))


async def test_configured_values_apply_before_start_and_without_a_live_value() -> None:
    live = LiveTunables({LENGTH: 7, NAME: "b"})
    assert (live.get(LENGTH), live.get(NAME)) == (7, "b")
    await live.start(FakeTunables())
    assert (live.get(LENGTH), live.get(NAME)) == (7, "b")


async def test_a_live_value_present_at_start_applies_and_is_handed_over() -> None:
    changes = Changes()
    live = LiveTunables({LENGTH: 7}, on_change=changes)
    await live.start(FakeTunables({LENGTH.key: 512, "other/key": "not ours"}))
    assert live.get(LENGTH) == 512
    assert changes.seen == [(LENGTH.key, 512)]


async def test_changes_apply_and_a_deleted_key_falls_back_to_the_configured_value() -> None:
    changes, etcd = Changes(), FakeTunables()
    live = LiveTunables({LENGTH: 7, NAME: "b"}, on_change=changes)
    await live.start(etcd)
    etcd.put(LENGTH.key, 9)
    etcd.put(NAME.key, "c")
    etcd.put(LENGTH.key, 9)  # no change: nothing handed over
    etcd.delete(LENGTH.key)
    assert (live.get(LENGTH), live.get(NAME)) == (7, "c")
    assert changes.seen == [(LENGTH.key, 9), (NAME.key, "c"), (LENGTH.key, 7)]


@pytest.mark.parametrize("bad", [-1, "512", True, 1.5, {"length": 1}])
async def test_an_invalid_value_is_logged_once_and_ignored(bad: Any, caplog: pytest.LogCaptureFixture) -> None:
    changes, etcd = Changes(), FakeTunables()
    live = LiveTunables({LENGTH: 7}, on_change=changes)
    await live.start(etcd)
    etcd.put(LENGTH.key, 9)
    with caplog.at_level(logging.WARNING, logger="app.tunables.live"):
        etcd.put(LENGTH.key, bad)
        for _ in range(3):
            assert live.get(LENGTH) == 9  # reading does not re-validate (nor log again)
    assert changes.seen == [(LENGTH.key, 9)]
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and LENGTH.key in warnings[0] and "keeping 9" in warnings[0], warnings


async def test_an_invalid_value_present_at_start_leaves_the_configured_one() -> None:
    live = LiveTunables({LENGTH: 7})
    await live.start(FakeTunables({LENGTH.key: "lots"}))
    assert live.get(LENGTH) == 7


async def test_a_consumer_that_fails_to_apply_a_value_does_not_stop_the_watch(caplog: pytest.LogCaptureFixture) -> None:
    def explode(tunable: Tunable[Any], value: Any) -> None:
        raise RuntimeError("boom")

    etcd = FakeTunables()
    live = LiveTunables({LENGTH: 7}, on_change=explode)
    await live.start(etcd)
    etcd.put(LENGTH.key, 8)  # would raise into the etcd watch task if it escaped
    assert live.get(LENGTH) == 8
    assert any("boom" in (record.exc_text or "") or record.exc_info for record in caplog.records)


async def test_one_watch_for_all_of_a_consumers_tunables_closed_with_it() -> None:
    etcd = FakeTunables()
    live = LiveTunables({LENGTH: 7, NAME: "b"})
    await live.start(etcd)
    await live.close()
    assert etcd.watches == 1 and etcd.closed
