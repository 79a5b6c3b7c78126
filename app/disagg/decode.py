"""The decode side of disaggregated prefill: `RemotePrefill` asks the policy whether a
request's prefill goes remote, queues the job, and waits for the PrefillWorker's answer in
a one-shot slot (`PendingPrefills`), which the decode worker's `prefill_done` endpoint fills.

A request whose prefill does not go remote, or whose answer does not come in time, is
prefilled by the decode worker itself: remote prefill only ever saves work. A job whose
answer is no longer awaited (its wait ran out, its request went) is withdrawn from the
queue, so that no PrefillWorker spends a prefill on it and the queue's depth, which the
policy weighs, counts only jobs some decode worker still waits for.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from prometheus_client import CollectorRegistry

from app.disagg.policy import DisaggPolicy
from app.metrics import CounterView
from app.protocol import PREFILL_ACK_WAIT_S, PrefillAnswer, PrefillJob, PreprocessedRequest, names
from app.runtime import EndpointClient, Runtime
from app.runtime.workqueue import RecentDepth, WorkQueue

log = logging.getLogger(__name__)

# How old a prefill queue depth may be when it decides a request: concurrent long prompts
# share one JetStream read, and a burst of them cannot overshoot the threshold by much more
# than this long's arrivals.
_DEPTH_MAX_AGE_S = 0.5


class PendingPrefills:
    """One-shot slots for answers the decode worker awaits, by job id, each with the
    moment (this process's monotonic clock) it gives up."""

    def __init__(self) -> None:
        self._slots: dict[str, tuple[asyncio.Future[PrefillAnswer], float]] = {}

    def open(self, job_id: str, timeout_s: float) -> asyncio.Future[PrefillAnswer]:
        slot: asyncio.Future[PrefillAnswer] = asyncio.get_running_loop().create_future()
        self._slots[job_id] = (slot, time.monotonic() + timeout_s)
        return slot

    def close(self, job_id: str) -> None:
        self._slots.pop(job_id, None)

    def time_left(self, job_id: str) -> float:
        """Seconds the job's answer is still awaited; 0 when it is not (any more)."""
        entry = self._slots.get(job_id)
        if entry is None or entry[0].done():
            return 0.0
        return max(entry[1] - time.monotonic(), 0.0)

    def deliver(self, answer: PrefillAnswer) -> bool:
        """Hand the answer to its waiter; False if nobody waits for it any more (late, or twice)."""
        entry = self._slots.pop(answer.job_id, None)
        if entry is None or entry[0].done():
            return False
        entry[0].set_result(answer)
        return True


class RemotePrefill:
    def __init__(self, runtime: Runtime, policy: DisaggPolicy, timeout_s: float) -> None:
        """`timeout_s`: how long a request waits for a PrefillWorker before it prefills locally."""
        self._runtime = runtime
        self._policy = policy
        self._timeout_s = timeout_s
        self._pending = PendingPrefills()
        self._queue: WorkQueue | None = None
        self._depth: RecentDepth | None = None
        self._prefill_fleet: EndpointClient | None = None
        self._withdrawals: set[asyncio.Task[None]] = set()

    async def start(self, registry: CollectorRegistry) -> None:
        """Open the queue, follow the thresholds and the PrefillWorkers; count decisions in `registry`."""
        self._queue = await self._runtime.work_queue(names.PREFILL_QUEUE, ack_wait_s=PREFILL_ACK_WAIT_S)
        self._depth = RecentDepth(self._queue.depth, _DEPTH_MAX_AGE_S)
        await self._policy.start(self._runtime.discovery)
        # Followed so that a job is queued only while some PrefillWorker can take it:
        # a decode worker up before its prefill nodes (or after they all died) must not
        # hold long prompts for `remote-prefill-timeout-s` each.
        self._prefill_fleet = self._runtime.client(names.PREFILL_WORKER, names.PREFILL_STATUS)
        await self._prefill_fleet.watch()
        decisions = self._policy.decisions
        registry.register(
            CounterView("tandem_worker_prefill_decisions", "Where prompts were prefilled", "decision", decisions)
        )

    async def close(self) -> None:
        await self._policy.close()

    async def prefill(self, request: PreprocessedRequest) -> PrefillAnswer | None:
        """The PrefillWorker's answer, or None where the decode worker prefills the request itself."""
        assert self._queue is not None and self._depth is not None and self._prefill_fleet, "used before start()"
        policy, queue = self._policy, self._queue
        if not self._prefill_fleet.instance_ids():
            policy.count("local", request.request_id, "no PrefillWorker registered")
            return None
        if request.sampling.prompt_logprobs is not None:
            # The prompt's logprobs come from the engine that computes the prompt, and a
            # PrefillWorker's output is thrown away: the decode worker must compute it.
            policy.count("local", request.request_id, "prompt_logprobs asked for")
            return None
        try:
            remote = await policy.prefill_remotely(request, self._depth)
        except Exception as exc:
            policy.count("local", request.request_id, f"prefill queue unreadable: {exc}")
            return None
        if not remote:
            policy.count("local", request.request_id, f"{len(request.token_ids)} prompt tokens")
            return None
        job_id = uuid.uuid4().hex
        timeout = self._timeout_s
        answer = self._pending.open(job_id, timeout)
        seq: int | None = None
        try:
            job = PrefillJob(
                job_id=job_id,
                request=request,
                decode_worker_id=self._runtime.instance_id,
                deadline=time.time() + timeout,
            )
            seq = await queue.push(job)
            result = await asyncio.wait_for(answer, timeout)
        except Exception as exc:
            reason = (
                f"no answer within {timeout:g}s" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            )
            policy.count("fallback", request.request_id, reason)
            return None
        finally:
            # A late answer finds no slot and is discarded.
            self._pending.close(job_id)
            if seq is not None and (answer.cancelled() or not answer.done()):
                self._withdraw(queue, seq, request.request_id)
        if result.error:
            policy.count("fallback", request.request_id, f"{result.prefill_worker_id} gave up: {result.error}")
            return None
        policy.count(
            "remote", request.request_id, f"{len(request.token_ids)} prompt tokens on {result.prefill_worker_id}"
        )
        return result

    def _withdraw(self, queue: WorkQueue, seq: int, request_id: str) -> None:
        """Take the job out of the queue, in the background: the request goes on (prefilled
        here, or it was cancelled and must end now)."""

        async def withdraw() -> None:
            try:
                await queue.withdraw(seq)
            except Exception as exc:
                # A PrefillWorker that takes it still skips it (its answer is no longer awaited).
                log.debug("request %s: prefill job %d not withdrawn (%s)", request_id, seq, exc)

        task = asyncio.get_running_loop().create_task(withdraw(), name=f"withdraw-prefill-job-{seq}")
        self._withdrawals.add(task)
        task.add_done_callback(self._withdrawals.discard)

    def deliver(self, answer: PrefillAnswer) -> bool:
        """A PrefillWorker's answer; True if a request still waited for it."""
        return self._pending.deliver(answer)

    def time_left(self, job_id: str) -> float:
        """Seconds a job's answer is still awaited (0: not any more), on this node's clock."""
        return self._pending.time_left(job_id)
