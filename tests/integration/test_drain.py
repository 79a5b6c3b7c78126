"""A service told to stop (SIGTERM; here its runner's stop event) drains: out of routing at
once, its calls in flight finish, and what a drain cannot finish ends with an error its
caller can act on. Real NATS and etcd; two Echo instances in this process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.errors import WorkerUnavailableError
from app.runtime import Runtime
from app.sdk import load_config, run_service
from app.sdk.graph import resolve
from app.settings import RuntimeSettings

REPO = Path(__file__).resolve().parents[2]


class Echoes:
    def __init__(self, runtime_settings: RuntimeSettings) -> None:
        self.settings = runtime_settings
        self.stops = [asyncio.Event(), asyncio.Event()]
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        _, echo = resolve("tests.integration.echo_graph:Echo")
        for replica, stop in enumerate(self.stops):
            coroutine = run_service(echo.cls, load_config(None), self.settings, replica=replica, stop=stop)
            self.tasks.append(asyncio.create_task(coroutine))


@pytest.fixture
async def echoes(runtime_settings: RuntimeSettings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Echoes]:
    monkeypatch.chdir(REPO)
    started = Echoes(runtime_settings)
    started.start()
    try:
        yield started
    finally:
        for stop in started.stops:
            stop.set()
        await asyncio.wait_for(asyncio.gather(*started.tasks, return_exceptions=True), 30)


async def _two_ticking(runtime: Runtime) -> list[str]:
    tick = runtime.client("Echo", "tick")
    await tick.wait_for_instances(timeout=20)
    deadline = time.monotonic() + 20
    while len(records := await tick.wait_for_instances()) < 2:
        assert time.monotonic() < deadline, "the second Echo never registered"
        await asyncio.sleep(0.1)
    return sorted(record.instance_id for record in records)


async def test_a_stopping_instance_leaves_routing_at_once_and_finishes_its_streams(
    echoes: Echoes, make_runtime
) -> None:
    runtime = await make_runtime()
    ids = await _two_ticking(runtime)
    tick = runtime.client("Echo", "tick")
    by_replica = {}
    for instance_id in ids:
        (record,) = [r for r in await tick.wait_for_instances() if r.instance_id == instance_id]
        by_replica[record.metadata["replica"]] = instance_id
    stopping = by_replica[0]

    stream = tick.stream({"times": 20, "every_s": 0.1}, target=stopping)
    items = [await anext(stream)]
    echoes.stops[0].set()  # as SIGTERM would
    # Within a second, while its stream has another one to go at least.
    deadline = time.monotonic() + 1.0
    while stopping in tick.instance_ids():
        assert time.monotonic() < deadline, "the stopping instance stayed pickable"
        await asyncio.sleep(0.02)
    # Out of routing, not gone: every new call goes to the other instance meanwhile.
    assert tick.instance_ids() == [by_replica[1]]
    assert stopping in {r.instance_id for r in await tick.wait_for_instances()}
    for _ in range(4):
        assert [n async for n in tick.stream({"times": 1, "every_s": 0})] == [0]
    items += [n async for n in stream]
    assert items == list(range(20)), "the stream in flight did not finish whole"
    await asyncio.wait_for(echoes.tasks[0], 10)
    assert tick.instance_ids() == [by_replica[1]]


async def test_a_stream_longer_than_the_drain_ends_with_worker_unavailable(
    echoes: Echoes, make_runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_STOP_WAIT_S", "11")  # a drain budget of 1 s
    runtime = await make_runtime()
    await _two_ticking(runtime)
    tick = runtime.client("Echo", "tick")
    stopping = (await tick.wait_for_instances())[0]
    stream = tick.stream({"times": 100, "every_s": 0.1}, target=stopping.instance_id)
    received = [await anext(stream)]
    echoes.stops[stopping.metadata["replica"]].set()
    started = time.monotonic()
    with pytest.raises(WorkerUnavailableError, match="stopped before the call ended"):
        async for n in stream:
            received.append(n)
    assert 0.8 < time.monotonic() - started < 5
    assert 5 <= len(received) < 100
