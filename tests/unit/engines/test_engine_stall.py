"""A hung engine: the stall rule (`StallWatch`), the mocker's hang fault, and the engine host
that takes a hung engine's worker out as it does a dead one's.

The host runs a real mocker; only the runtime (discovery and the events plane) is an
in-memory fake of the few calls the host makes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, cast

import pytest

from app.engines.base import EngineProgress
from app.engines.host import EngineHost, WorkerConfig
from app.engines.mocker import MockerEngine
from app.engines.stall import MAX_LOOK_INTERVAL_S, StallWatch
from app.protocol import ModelRecord, PreprocessedRequest, SamplingOptions, StopConditions
from app.runtime import Runtime
from app.sdk import ServiceContext
from app.sdk.config import GraphConfig

TIMEOUT_S = 5.0


def busy(steps: int, pending: int = 2) -> EngineProgress:
    return EngineProgress(pending=pending, steps=steps)


def looks(watch: StallWatch, *progress: tuple[float, EngineProgress]) -> list[float | None]:
    return [watch.look(p, at) for at, p in progress]


def test_an_engine_that_steps_is_never_hung_however_long_it_is_busy() -> None:
    watch = StallWatch(TIMEOUT_S)
    # Ten minutes busy, a step (or more) between any two looks half a second apart.
    assert {watch.look(busy(steps=i // 2), i * 0.5) for i in range(1200)} == {None}


def test_a_busy_engine_without_a_step_is_hung_after_the_timeout_and_not_before() -> None:
    watch = StallWatch(TIMEOUT_S)
    answers = looks(watch, *((i * 0.5, busy(steps=7)) for i in range(11)))
    assert answers[:-1] == [None] * 10  # 4.5 s
    assert answers[-1] == pytest.approx(5.0)


def test_a_step_forgives_the_stall_so_far() -> None:
    watch = StallWatch(TIMEOUT_S)
    # 4.5 s without a step, one step, 4.5 s more without.
    stalled = [(i * 0.5, busy(1)) for i in range(10)]
    after = [(5.0 + i * 0.5, busy(2)) for i in range(10)]
    assert set(looks(watch, *stalled, *after)) == {None}


def test_idle_time_neither_counts_nor_forgives() -> None:
    """A hung PrefillWorker whose jobs are each abandoned (its decode workers give up on
    them) before the timeout: the busy spells without a step add up."""
    watch = StallWatch(TIMEOUT_S)
    spell = [(t * 0.5, busy(3)) for t in range(7)]  # 3 s busy, no step
    idle = [(3.0 + t * 0.5, busy(3, pending=0)) for t in range(1, 200)]  # 99.5 s idle
    again = [(103.0 + t * 0.5, busy(3)) for t in range(1, 6)]  # busy again, still no step
    answers = looks(watch, *spell, *idle, *again)
    assert set(answers[: -len(again)]) == {None}
    assert answers[-len(again) :][:4] == [None] * 4
    assert answers[-1] is not None and answers[-1] >= TIMEOUT_S


def test_a_request_that_just_came_has_not_waited_the_interval() -> None:
    watch = StallWatch(1.0)
    # Pending at one look only, each time: a short request that came and went.
    answers = looks(watch, *((i * 0.5, busy(0, pending=i % 2)) for i in range(40)))
    assert set(answers) == {None}


def test_a_late_look_counts_one_interval_at_most() -> None:
    """This process's event loop was blocked: the engine's steps may be queued behind it."""
    watch = StallWatch(TIMEOUT_S)
    assert looks(watch, (0.0, busy(1)), (30.0, busy(1))) == [None, None]
    # Then looks half a second apart: the rest of the timeout must still pass.
    rest = int((TIMEOUT_S - MAX_LOOK_INTERVAL_S) / 0.5)
    answers = looks(watch, *((30.0 + i * 0.5, busy(1)) for i in range(1, rest + 1)))
    assert answers[:-1] == [None] * (rest - 1) and answers[-1] is not None


def test_vllm_steps_are_the_batches_its_stat_loggers_hear_of() -> None:
    """AsyncLLM's output handler hands every batch of engine core outputs to its stat loggers,
    with SchedulerStats even where the step output no request's token (a prefill chunk)."""
    from vllm.v1.metrics.stats import SchedulerStats

    from app.engines.vllm_stats import SchedulerStatsCapture

    capture = SchedulerStatsCapture()
    logger = capture.factory(vllm_config=None)  # type: ignore[arg-type]
    for _ in range(3):
        logger.record(SchedulerStats(num_running_reqs=1), None)
    logger.record(None, None)
    assert capture.steps == 4


def request(max_tokens: int) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=f"r{time.monotonic_ns()}",
        model="mocker",
        token_ids=list(range(1, 40)),
        sampling=SamplingOptions(),
        stop=StopConditions(max_tokens=max_tokens, ignore_eos=True),
    )


async def test_the_mocker_hang_fault_stops_its_steps_and_keeps_its_requests(tmp_path: Path) -> None:
    hang_file = tmp_path / "hang-{worker_id}"
    engine = MockerEngine.from_config({"decode_base_ms": 5, "fault_hang_file": str(hang_file)})
    await engine.start("w1")
    try:
        stream = engine.generate(request(max_tokens=10_000))
        first = await anext(stream)
        assert first.token_ids
        before = engine.progress()
        await asyncio.sleep(0.3)
        assert engine.progress().steps > before.steps  # no file yet: it steps
        (tmp_path / "hang-w1").touch()
        await asyncio.sleep(0.3)  # the scheduler looks for the file every 0.1 s
        hung = engine.progress()
        await asyncio.sleep(0.5)
        assert engine.progress() == hung and hung.pending == 1
        await stream.aclose()  # a caller that gives up still aborts its request
        assert engine.progress().pending == 0
    finally:
        await engine.stop()


class FakeDiscovery:
    def __init__(self) -> None:
        self.models: list[ModelRecord] = []

    async def register_model(self, record: ModelRecord) -> None:
        self.models.append(record)

    async def deregister_model(self, record: ModelRecord) -> None:
        self.models.remove(record)


class FakeRuntime:
    """What EngineHost asks of the runtime; its publishes go nowhere."""

    instance_id = "worker-1"
    host = "127.0.0.1"
    namespace = "test"

    def __init__(self) -> None:
        self.discovery = FakeDiscovery()

    async def publish(self, topic: str, message: Any) -> None:
        pass


class Host:
    """An EngineHost on a mocker, started; `failed` holds the reasons it gave for leaving."""

    def __init__(self, stall_timeout_s: float, **mocker: Any) -> None:
        self.failed: list[str] = []
        self.runtime = FakeRuntime()
        ctx = ServiceContext("VllmWorker", 0, None, GraphConfig(None), self.failed.append)
        config = WorkerConfig(engine="mocker", engine_args=mocker, engine_stall_timeout_s=stall_timeout_s)
        self.host = EngineHost("VllmWorker", "generate", config, ctx, cast(Runtime, self.runtime))

    async def __aenter__(self) -> Host:
        await self.host.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.host.stop()

    async def stream(self, max_tokens: int) -> int:
        """Tokens one request got, until it ends or is cancelled."""
        tokens = 0
        async for output in self.host.engine.generate(request(max_tokens)):
            tokens += len(output.token_ids)
        return tokens


async def test_a_hung_engine_takes_its_worker_out_after_the_stall_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with Host(stall_timeout_s=1.5, decode_base_ms=5, fault_hang_file=str(tmp_path / "hang")) as h:
        assert len(h.runtime.discovery.models) == 1
        streams = [asyncio.create_task(h.stream(max_tokens=100_000)) for _ in range(3)]
        await asyncio.sleep(1.0)
        assert not h.failed  # busy and stepping
        with caplog.at_level(logging.ERROR, logger="app.engines.host"):
            (tmp_path / "hang").touch()
            hung_at = time.monotonic()
            while not h.failed:
                assert time.monotonic() - hung_at < 5.0, "the hung engine's worker did not leave"
                await asyncio.sleep(0.05)
        took = time.monotonic() - hung_at
        assert h.failed[0].startswith("engine hung: 3 requests to serve and no engine step for ")
        assert h.runtime.discovery.models == []  # out of routing first
        # The timeout, then a look interval and the file's poll at most (and a busy machine's lag).
        assert 1.4 <= took <= 1.5 + 0.5 + 0.1 + 1.5
        assert any("engine mocker hung (" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
        for stream in streams:
            stream.cancel()
        await asyncio.gather(*streams, return_exceptions=True)


async def test_a_slow_healthy_engine_is_not_taken_for_a_hung_one() -> None:
    """Each step 0.4 s (a large model's prefill chunk on a busy machine), the timeout 2 s: an
    engine always this slow never stays 2 s without a step."""
    async with Host(stall_timeout_s=2.0, decode_base_ms=400) as h:
        streams = [asyncio.create_task(h.stream(max_tokens=10)) for _ in range(4)]
        got = await asyncio.wait_for(asyncio.gather(*streams), 30)
        await asyncio.sleep(1.0)  # then idle: no step and nothing to serve
        assert got == [10, 10, 10, 10] and h.failed == []
