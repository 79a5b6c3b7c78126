"""Events plane (NATS pub/sub) and the JetStream work queue."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import msgspec

from app.runtime import Runtime
from app.settings import RuntimeSettings
from tests.integration.child_process import Child

MakeRuntime = Callable[..., Awaitable[Runtime]]


class LoadReport(msgspec.Struct, kw_only=True):
    worker_id: str
    running: int
    waiting: int
    kv_used_blocks: int


class PrefillJob(msgspec.Struct):
    request_id: str
    tokens: list[int]


async def test_events_arrive_typed(make_runtime: MakeRuntime) -> None:
    publisher, subscriber = await make_runtime(), await make_runtime()
    sub = await subscriber.subscribe("load", LoadReport)
    reports = [LoadReport(worker_id="w1", running=i, waiting=0, kv_used_blocks=3) for i in range(3)]
    for report in reports:
        await publisher.publish("load", report)
    received = [await asyncio.wait_for(anext(sub), timeout=5) for _ in reports]
    assert received == reports
    await sub.close()
    assert [item async for item in sub] == []


async def test_events_skip_what_does_not_decode(make_runtime: MakeRuntime) -> None:
    rt = await make_runtime()
    sub = await rt.subscribe("load", LoadReport)
    await rt.publish("load", {"unexpected": True})
    good = LoadReport(worker_id="w2", running=1, waiting=2, kv_used_blocks=0)
    await rt.publish("load", good)
    assert await asyncio.wait_for(anext(sub), timeout=5) == good


async def test_events_to_a_callback_in_order_past_bad_events_and_failures(make_runtime: MakeRuntime) -> None:
    publisher, subscriber = await make_runtime(), await make_runtime()
    received: list[LoadReport] = []
    done = asyncio.Event()

    def on_event(report: LoadReport) -> None:
        received.append(report)
        if report.running == 1:
            raise RuntimeError("a failing handler must not end the subscription")
        if report.running == 3:
            done.set()

    await subscriber.subscribe("load", LoadReport, on_event=on_event)
    reports = [LoadReport(worker_id="w1", running=i, waiting=0, kv_used_blocks=3) for i in range(4)]
    await publisher.publish("load", reports[0])
    await publisher.publish("load", {"unexpected": True})
    for report in reports[1:]:
        await publisher.publish("load", report)
    await asyncio.wait_for(done.wait(), timeout=5)
    assert received == reports


async def test_queue_push_pull_ack_and_depth(make_runtime: MakeRuntime) -> None:
    producer, consumer = await make_runtime(), await make_runtime()
    queue_in = await producer.work_queue("prefill", ack_wait_s=30)
    queue_out = await consumer.work_queue("prefill", ack_wait_s=30)
    assert await queue_in.depth() == 0
    for i in range(3):
        await queue_in.push(PrefillJob(f"r{i}", [i, i + 1]))
    assert await queue_in.depth() == 3

    job = await queue_out.pull(timeout=2, job_type=PrefillJob)
    assert job is not None and job.data == PrefillJob("r0", [0, 1]) and job.redeliveries == 0
    assert await queue_in.depth() == 3  # delivered but not acked still counts
    await job.ack()
    assert await queue_in.depth() == 2

    job = await queue_out.pull(timeout=2, job_type=PrefillJob)
    assert job is not None
    await job.nak()
    rest = []
    for _ in range(2):
        pulled = await queue_out.pull(timeout=2, job_type=PrefillJob)
        assert pulled is not None
        rest.append((pulled.data, pulled.redeliveries))
        await pulled.ack()
    assert (job.data, 1) in rest  # handed back by nak, delivered again
    assert await queue_out.pull(timeout=0.2) is None
    assert await queue_in.depth() == 0


async def test_job_of_a_killed_consumer_is_redelivered(
    make_runtime: MakeRuntime, runtime_settings: RuntimeSettings
) -> None:
    ack_wait_s = 1.0
    producer = await make_runtime()
    queue = await producer.work_queue("handoff", ack_wait_s=ack_wait_s)
    child = await Child.start(runtime_settings, "consume", "handoff", str(ack_wait_s))
    try:
        assert await child.read_line() == "ready"
        await queue.push(PrefillJob("lost", [7]))
        assert await child.read_line() == "got {'request_id': 'lost', 'tokens': [7]}"
        child.proc.kill()
        await child.proc.wait()
    finally:
        await child.kill()

    survivor = await make_runtime()
    survivor_queue = await survivor.work_queue("handoff", ack_wait_s=ack_wait_s)
    job = await survivor_queue.pull(timeout=ack_wait_s + 3, job_type=PrefillJob)
    assert job is not None and job.data == PrefillJob("lost", [7]) and job.redeliveries >= 1
    await job.ack()
    assert await queue.depth() == 0


async def test_queue_state_reads_the_stream_and_its_consumer_without_taking_jobs(make_runtime: MakeRuntime) -> None:
    producer, observer = await make_runtime(), await make_runtime()
    assert await observer.queue_state("prefill") is None  # nobody opened it yet
    queue = await producer.work_queue("prefill", ack_wait_s=30)
    for i in range(3):
        await queue.push(PrefillJob(f"r{i}", [i]))
    job = await queue.pull(timeout=2, job_type=PrefillJob)
    assert job is not None
    for _ in range(2):  # reading twice takes nothing and changes nothing
        state = await observer.queue_state("prefill")
        assert state is not None and state.stream == queue.stream and state.messages == 3
        (consumer,) = state.consumers
        assert (consumer.num_pending, consumer.num_ack_pending) == (2, 1)
    await job.ack()
    state = await observer.queue_state("prefill")
    assert state is not None and state.messages == 2 and state.consumers[0].num_ack_pending == 0
