"""app.sdk.startup: one line per start-up phase, with the seconds since the process started."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest

from app.sdk import startup


def test_a_phase_is_one_info_line_with_the_prefix_and_the_elapsed_time(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=startup.__name__):
        startup.phase(startup.ENGINE_READY, "mocker: model tiny, block size 16, 64 KV blocks")
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert message.startswith("start-up: engine ready after ")
    assert message.endswith(" s (mocker: model tiny, block size 16, 64 KV blocks)")
    assert float(message.split(" after ")[1].split(" s")[0]) >= 0


def test_the_text_of_a_phase() -> None:
    assert startup.phase_text(startup.CONNECTED, 0.44) == "start-up: connected to NATS and etcd after 0.4 s"
    assert startup.phase_text(startup.ROUTABLE, 12.25, "generate") == (
        "start-up: registered and routable after 12.2 s (generate)"
    )


def test_the_elapsed_time_counts_from_the_process_start_not_the_import() -> None:
    # A process that sleeps before importing the module: its first phase comes after the sleep.
    code = "import time; time.sleep(1.0); from app.sdk import startup; print(startup.elapsed_s())"
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 1.0 <= float(out) <= time.monotonic() - started + 0.1
