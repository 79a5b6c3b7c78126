"""The log of a server that cannot be reached yet: once, then at most every 10 s."""

from __future__ import annotations

import pytest

from app.runtime import connect
from app.runtime.connect import RetryLog


def test_the_retry_log_repeats_at_most_every_ten_seconds(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(connect.time, "monotonic", lambda: clock[0])
    retry_log = RetryLog("NATS", "nats://10.0.0.1:4222")
    with caplog.at_level("WARNING", logger=connect.__name__):
        for _ in range(40):  # 25 s of attempts every 0.625 s
            retry_log.failed(OSError("Connection refused"))
            clock[0] += 0.625
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines  # at 0 s, 10 s and 20 s
    assert (
        lines[0]
        == "cannot reach NATS at nats://10.0.0.1:4222 (OSError: Connection refused; 1 attempt(s) so far): retrying"
    )
    assert "17 attempt(s)" in lines[1] and "33 attempt(s)" in lines[2]
