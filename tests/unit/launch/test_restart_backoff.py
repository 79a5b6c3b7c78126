"""The restart listener's backoff: how long each program waits before its next start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.launch.restart_backoff import CRASH_LOOP_DIR, Backoff, Listener, read_fatal


def test_delays_double_for_exits_in_a_row_up_to_the_bound() -> None:
    backoff = Backoff(first_s=1, max_s=60, stable_s=300)
    delays = [backoff.exited("Echo:Echo_0", lasted_s=30) for _ in range(8)]
    assert delays == [(1, 1), (2, 2), (4, 3), (8, 4), (16, 5), (32, 6), (60, 7), (60, 8)]
    # Each program has its own count.
    assert backoff.exited("Echo:Echo_1", lasted_s=30) == (1, 1)


def test_a_run_that_lasted_ends_the_loop() -> None:
    backoff = Backoff(first_s=1, max_s=60, stable_s=300)
    for _ in range(4):
        backoff.exited("w", lasted_s=10)
    # A long run before the exit: a first exit again.
    assert backoff.exited("w", lasted_s=300) == (1, 1)
    backoff.exited("w", lasted_s=10)
    # The listener saw it stay up for stable_s: the next exit starts afresh too.
    backoff.stable("w")
    assert backoff.exited("w", lasted_s=10) == (1, 1)


class FakeSupervisord:
    """The listener's few calls, answered from memory: each run lasted 2 s (past startsecs)."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.shutdowns = 0

    def process_info(self, program: str) -> dict[str, Any]:
        return {"name": program.partition(":")[2], "start": 998, "stop": 1000, "now": 1000, "pid": 7}

    def start(self, program: str) -> None:
        self.started.append(program)

    def shutdown(self) -> None:
        self.shutdowns += 1


def _listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_on_fatal: bool) -> tuple[Listener, FakeSupervisord]:
    listener = Listener(["Echo:Echo_0"], tmp_path, stop_on_fatal, loop_exits=3, loop_window_s=30)
    supervisord = FakeSupervisord()
    monkeypatch.setattr(listener, "_supervisord", supervisord)
    monkeypatch.setattr(listener, "_later", lambda _delay, call, *args: call(*args))  # no waiting
    return listener, supervisord


def test_exits_in_a_row_past_startsecs_are_fatal_to_tandem_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener, supervisord = _listener(tmp_path, monkeypatch, stop_on_fatal=True)
    for _ in range(3):
        listener.handle("PROCESS_STATE_EXITED", "groupname:Echo processname:Echo_0")
    # Started again after the first two exits; the third shuts supervisord down instead.
    assert (supervisord.started, supervisord.shutdowns) == (["Echo:Echo_0"] * 2, 1)
    why = "3 exits in a row, each within 30 s of its start"
    assert read_fatal(tmp_path) == {"Echo_0": why}
    assert (tmp_path / CRASH_LOOP_DIR / "Echo_0").read_text() == f"Echo_0 went FATAL: {why}\n"


def test_without_stop_on_fatal_a_crash_loop_is_started_again_and_stays_marked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener, supervisord = _listener(tmp_path, monkeypatch, stop_on_fatal=False)
    for _ in range(5):
        listener.handle("PROCESS_STATE_EXITED", "groupname:Echo processname:Echo_0")
    assert (len(supervisord.started), supervisord.shutdowns, read_fatal(tmp_path)) == (5, 0, {})
    mark = (tmp_path / CRASH_LOOP_DIR / "Echo_0").read_text()
    assert mark == "Echo_0 is restarting in a loop: 5 exits in a row, the last after 2 s\n"
