"""The prefill queue's depth as a decode worker weighs it, on real NATS (JetStream) and etcd.

Before, every long prompt cost one JetStream consumer-info round trip (a burst of them, one
each), and a job whose decode worker had stopped waiting for it (its wait ran out, its
request went) stayed queued and counted until a PrefillWorker reached it: with every
PrefillWorker busy, expired jobs alone could fill the queue and keep prompts local. Now one
read serves every prompt for 0.5 s, and a job no longer awaited is withdrawn from the queue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry

from app.disagg.decode import RemotePrefill
from app.disagg.policy import DisaggPolicy
from app.protocol import PREFILL_ACK_WAIT_S, PreprocessedRequest, SamplingOptions, StopConditions, names
from app.runtime import Runtime

MakeRuntime = Callable[..., Awaitable[Runtime]]


def long_request() -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=f"r{time.monotonic_ns()}",
        model="m",
        token_ids=list(range(200)),
        sampling=SamplingOptions(),
        stop=StopConditions(max_tokens=4),
    )


async def decode_side(make_runtime: MakeRuntime, policy: DisaggPolicy, wait_s: float) -> RemotePrefill:
    """A decode worker's RemotePrefill, and a registered PrefillWorker that pulls nothing (busy)."""
    decode, prefill = await make_runtime(), await make_runtime()

    async def status(_payload: Any, _ctx: Any) -> AsyncGenerator[dict[str, Any], None]:
        yield {}

    await prefill.serve_endpoint(names.PREFILL_WORKER, names.PREFILL_STATUS, status)
    remote = RemotePrefill(decode, policy, timeout_s=wait_s)
    await remote.start(CollectorRegistry())
    await decode.client(names.PREFILL_WORKER, names.PREFILL_STATUS).wait_for_instances(timeout=10)
    return remote


async def depth_becomes(runtime: Runtime, expected: int, within_s: float = 3.0) -> int:
    queue = await runtime.work_queue(names.PREFILL_QUEUE, ack_wait_s=PREFILL_ACK_WAIT_S)
    deadline = time.monotonic() + within_s
    while (depth := await queue.depth()) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return depth


async def test_a_job_whose_wait_ran_out_leaves_the_queue(make_runtime: MakeRuntime) -> None:
    policy = DisaggPolicy(conditional=False, max_local_prefill_length=0, max_prefill_queue_size=100)
    remote = await decode_side(make_runtime, policy, wait_s=0.5)
    try:
        assert await remote.prefill(long_request()) is None  # no answer: prefilled locally
        assert policy.decisions["fallback"] == 1
        assert await depth_becomes(await make_runtime(), 0) == 0
    finally:
        await remote.close()


async def test_a_job_whose_request_went_leaves_the_queue(make_runtime: MakeRuntime) -> None:
    policy = DisaggPolicy(conditional=False, max_local_prefill_length=0, max_prefill_queue_size=100)
    remote = await decode_side(make_runtime, policy, wait_s=30)
    observer = await make_runtime()
    try:
        waiting = asyncio.create_task(remote.prefill(long_request()))
        assert await depth_becomes(observer, 1) == 1  # queued, awaited
        waiting.cancel()  # the client went
        assert await depth_becomes(observer, 0) == 0
    finally:
        await remote.close()


async def test_concurrent_long_prompts_share_one_depth_read(make_runtime: MakeRuntime) -> None:
    # A full queue (size 0): every prompt asks the depth and stays local, nothing is queued.
    policy = DisaggPolicy(conditional=True, max_local_prefill_length=10, max_prefill_queue_size=0)
    remote = await decode_side(make_runtime, policy, wait_s=5)
    try:
        queue = remote._queue
        assert queue is not None
        js, reads = queue._js, []
        consumer_info = js.consumer_info

        async def counted(*args: Any, **kwargs: Any) -> Any:
            reads.append(time.monotonic())
            return await consumer_info(*args, **kwargs)

        js.consumer_info = counted  # type: ignore[method-assign]
        answers = await asyncio.gather(*(remote.prefill(long_request()) for _ in range(20)))
        assert answers == [None] * 20 and policy.decisions["local"] == 20
        assert len(reads) == 1
        await remote.prefill(long_request())
        assert len(reads) == 1  # within 0.5 s of the read: the same depth
        await asyncio.sleep(0.6)
        await remote.prefill(long_request())
        assert len(reads) == 2  # older than that: read again
    finally:
        await remote.close()
