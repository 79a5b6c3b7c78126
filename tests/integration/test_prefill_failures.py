"""A prefill that fails or hangs, on real NATS and etcd: the decode side's RemotePrefill and
the prefill side's PrefillJobs as the workers run them, the engine a script.

Before, a failed prefill was nak'ed and retried until the decode worker's wait ran out
(`remote-prefill-timeout-s`, 30 s by default), and a hung engine held its job for ever while
the heartbeat renewed it. Now the decode worker hears of the failure at once (a request at
fault) or after `MAX_ATTEMPTS` tries, and a hung prefill is given up when its decode worker
stops waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from app.disagg.decode import RemotePrefill
from app.disagg.policy import DisaggPolicy
from app.disagg.prefill import MAX_ATTEMPTS, PrefillJobs
from app.errors import InvalidRequestError
from app.protocol import (
    EngineOutput,
    PrefillAnswer,
    PrefillWanted,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
    names,
)
from app.runtime import Runtime

MakeRuntime = Callable[..., Awaitable[Runtime]]
WAIT_S = 4.0  # the decode worker's remote-prefill-timeout-s here
PARAMS = {"do_remote_prefill": True, "remote_engine_id": "e1"}


class ScriptedEngine:
    """The prefill engine: each attempt does what `script` says (raise, hang, or answer)."""

    def __init__(self, *script: BaseException | str) -> None:
        self.script = list(script)
        self.attempts = 0

    async def generate(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
        step = self.script[min(self.attempts, len(self.script) - 1)]
        self.attempts += 1
        if isinstance(step, BaseException):
            raise step
        if step == "hang":
            await asyncio.sleep(3600)
        yield EngineOutput(token_ids=[1], finish_reason="length", kv_transfer_params=PARAMS)


class Pair:
    def __init__(self, remote: RemotePrefill, jobs: PrefillJobs, policy: DisaggPolicy) -> None:
        self.remote, self.jobs, self.policy = remote, jobs, policy

    async def counted(self, **expected: int) -> None:
        """Until the prefill side's counts are `expected`: it counts an outcome once the decode
        worker took its answer, a moment after the decode side has it."""
        async with asyncio.timeout(5):
            while {name: self.jobs.counts[name] for name in expected} != expected:
                await asyncio.sleep(0.02)

    async def prefill(self) -> tuple[PrefillAnswer | None, float]:
        request = PreprocessedRequest(
            request_id=f"r{time.monotonic_ns()}",
            model="m",
            token_ids=list(range(200)),
            sampling=SamplingOptions(),
            stop=StopConditions(max_tokens=4),
        )
        started = time.monotonic()
        answer = await self.remote.prefill(request)
        return answer, time.monotonic() - started


@pytest.fixture
async def make_pair(make_runtime: MakeRuntime) -> AsyncIterator[Callable[[ScriptedEngine], Awaitable[Pair]]]:
    closing: list[Any] = []

    async def make(engine: ScriptedEngine) -> Pair:
        decode, prefill = await make_runtime(), await make_runtime()
        policy = DisaggPolicy(conditional=False, max_local_prefill_length=0, max_prefill_queue_size=100)
        remote = RemotePrefill(decode, policy, timeout_s=WAIT_S)

        async def done(answer: PrefillAnswer, _ctx: Any) -> AsyncGenerator[bool, None]:
            yield remote.deliver(answer)

        async def wanted(question: PrefillWanted, _ctx: Any) -> AsyncGenerator[float, None]:
            yield remote.time_left(question.job_id)

        async def status(_payload: Any, _ctx: Any) -> AsyncGenerator[dict[str, Any], None]:
            yield {}

        await decode.serve_endpoint(names.VLLM_WORKER, names.PREFILL_DONE, done, request_type=PrefillAnswer)
        await decode.serve_endpoint(names.VLLM_WORKER, names.PREFILL_WANTED, wanted, request_type=PrefillWanted)
        await prefill.serve_endpoint(names.PREFILL_WORKER, names.PREFILL_STATUS, status)
        jobs = PrefillJobs(prefill, engine.generate, 1, CollectorRegistry(), fail=pytest.fail)
        await jobs.start()
        await remote.start(CollectorRegistry())
        await decode.client(names.PREFILL_WORKER, names.PREFILL_STATUS).wait_for_instances(timeout=10)
        closing.extend([jobs, remote])
        return Pair(remote, jobs, policy)

    try:
        yield make
    finally:
        for thing in closing:
            await thing.close()


async def test_a_request_the_engine_refuses_is_handed_back_at_once(make_pair) -> None:
    engine = ScriptedEngine(InvalidRequestError("prompt too long for this engine"))
    pair = await make_pair(engine)
    answer, took = await pair.prefill()
    assert answer is None and took < WAIT_S / 2  # prefilled locally now, not after the wait
    assert engine.attempts == 1  # no other PrefillWorker would do better
    assert pair.policy.decisions["fallback"] == 1
    await pair.counted(failed=1, given_back=1)


async def test_an_engine_that_keeps_failing_is_tried_max_attempts_times_then_handed_back(make_pair) -> None:
    engine = ScriptedEngine(RuntimeError("engine step failed"))
    pair = await make_pair(engine)
    answer, took = await pair.prefill()
    assert answer is None and took < WAIT_S
    assert engine.attempts == MAX_ATTEMPTS
    await pair.counted(failed=MAX_ATTEMPTS, given_back=1)


async def test_a_failure_that_passes_is_retried_and_answered(make_pair) -> None:
    engine = ScriptedEngine(RuntimeError("once"), "answer")
    pair = await make_pair(engine)
    answer, _ = await pair.prefill()
    assert answer is not None and answer.kv_transfer_params == PARAMS and not answer.error
    assert engine.attempts == 2
    await pair.counted(failed=1, done=1)
    assert pair.policy.decisions["remote"] == 1


async def test_a_hung_prefill_is_given_up_when_its_decode_worker_stops_waiting(make_pair) -> None:
    engine = ScriptedEngine("hang", "answer")
    pair = await make_pair(engine)
    answer, took = await pair.prefill()
    assert answer is None and WAIT_S - 0.5 <= took < WAIT_S + 2  # the decode worker's own wait
    await pair.counted(timed_out=1)  # and the prefill side lets go of it then, acking the job
    assert engine.attempts == 1  # acked, not redelivered into the same hang
    # The next job finds the puller free.
    answer, _ = await pair.prefill()
    assert answer is not None and engine.attempts == 2
