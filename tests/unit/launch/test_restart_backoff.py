"""The restart listener's backoff: how long each program waits before its next start."""

from __future__ import annotations

from app.launch.restart_backoff import Backoff


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
