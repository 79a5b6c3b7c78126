"""KvFeedHealth: a busy worker that publishes no KV events, or unusable ones, is said once."""

from __future__ import annotations

import logging

import pytest

from app.router.kv_health import KvFeedHealth

SILENCE_S = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def health(clock: Clock) -> KvFeedHealth:
    return KvFeedHealth(SILENCE_S, clock=clock)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_worker_busy_past_the_limit_without_kv_events_is_warned_of_once(
    health: KvFeedHealth, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    health.on_batch("w1")
    health.on_load("w1", running=2)
    clock.now += SILENCE_S - 1
    health.on_load("w1", running=2)
    assert health.silent == set() and not warnings(caplog)
    clock.now += 2
    for _ in range(3):
        health.on_load("w1", running=1)
    assert health.silent == {"w1"} and health.silences == 1
    assert len(warnings(caplog)) == 1 and "w1" in warnings(caplog)[0]


def test_kv_events_clear_the_silence_and_a_new_one_is_counted_again(health: KvFeedHealth, clock: Clock) -> None:
    health.on_load("w1", running=1)
    clock.now += SILENCE_S + 1
    health.on_load("w1", running=1)
    assert health.silent == {"w1"}
    health.on_batch("w1")
    assert health.silent == set()
    clock.now += SILENCE_S + 1
    health.on_load("w1", running=1)
    assert health.silent == {"w1"} and health.silences == 2


def test_an_idle_worker_is_never_silent_however_long_since_its_last_event(health: KvFeedHealth, clock: Clock) -> None:
    health.on_batch("w1")
    clock.now += 100 * SILENCE_S
    health.on_load("w1", running=0)
    # Busy again: the silence counts from when it started serving, not from its last batch.
    health.on_load("w1", running=3)
    clock.now += SILENCE_S / 2
    health.on_load("w1", running=3)
    assert health.silent == set()


def test_a_worker_between_requests_starts_its_count_again(health: KvFeedHealth, clock: Clock) -> None:
    health.on_load("w1", running=1)
    clock.now += SILENCE_S - 1
    health.on_load("w1", running=0)
    health.on_load("w1", running=1)
    clock.now += SILENCE_S - 1
    health.on_load("w1", running=1)
    assert health.silent == set()


def test_rejected_batches_list_the_worker_until_one_is_accepted(
    health: KvFeedHealth, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(3):
        health.on_batch("w2", rejected_because="block_size 32, expected 16")
    assert health.rejected == {"w2"}
    assert len(warnings(caplog)) == 1 and "block_size 32" in warnings(caplog)[0]
    health.on_batch("w2")
    assert health.rejected == set()


def test_a_worker_that_left_is_forgotten(health: KvFeedHealth, clock: Clock) -> None:
    health.on_load("w1", running=1)
    clock.now += SILENCE_S + 1
    health.on_load("w1", running=1)
    health.on_batch("w2", rejected_because="mismatch")
    health.remove_worker("w1")
    health.remove_worker("w2")
    assert health.silent == set() and health.rejected == set()
