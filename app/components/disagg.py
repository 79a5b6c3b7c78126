"""Disaggregated prefill: the contract between decode workers and PrefillWorkers.

The hand-off, one request at a time:

1. The decode worker (VllmWorker) decides to prefill remotely (`DisaggPolicy`), makes a
   one-shot `PendingPrefills` slot for a fresh job id, and pushes a `PrefillJob` on the
   JetStream work queue `PREFILL_QUEUE`. Every PrefillWorker pulls from the queue's one
   durable consumer, so each job goes to one of them.
2. The PrefillWorker runs the prompt with `max_tokens=1` and
   `kv_transfer_params={"do_remote_decode": true}`: its engine keeps the KV and returns
   where to fetch it. It answers with a `PrefillAnswer` by calling the decode worker's
   `prefill_done` endpoint on the instance the job names, then acks the job. A job whose
   prefill failed is nak'ed (redelivered, maybe to another PrefillWorker); one whose worker
   died is redelivered after the queue's ack wait.
3. The decode worker waits for the answer until the job's deadline. With the answer, its
   engine pulls the KV over NIXL and decodes; without it (timeout, error), it prefills
   locally. An answer that arrives after that is discarded: each slot is used at most
   once, and a PrefillWorker skips jobs past their deadline. The KV a discarded answer
   points at is freed by the prefill engine when its lease runs out (vLLM, about 30 s).

Deadlines are wall-clock times, so decode and prefill nodes need roughly synced clocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any, Literal

import msgspec

from app.protocol import PreprocessedRequest
from app.runtime import Runtime
from app.runtime.discovery import TunablesWatch
from app.tunables import DISAGG_MAX_LOCAL_PREFILL_LENGTH, DISAGG_MAX_PREFILL_QUEUE_SIZE

log = logging.getLogger(__name__)

PREFILL_QUEUE = "prefill_queue"
# A job its PrefillWorker neither acks nor marks in progress within this is redelivered
# (the worker died); a live worker marks long prefills in progress every half of it.
PREFILL_ACK_WAIT_S = 10.0

Decision = Literal["local", "remote", "fallback"]


class PrefillJob(msgspec.Struct, kw_only=True):
    job_id: str
    request: PreprocessedRequest
    # The VllmWorker instance waiting for the answer (its `prefill_done` endpoint).
    decode_worker_id: str
    deadline: float  # wall clock (time.time()); the decode worker gives up after it


class PrefillAnswer(msgspec.Struct, kw_only=True):
    job_id: str
    prefill_worker_id: str
    kv_transfer_params: dict[str, Any]


class PendingPrefills:
    """One-shot slots for answers the decode worker awaits, by job id."""

    def __init__(self) -> None:
        self._slots: dict[str, asyncio.Future[PrefillAnswer]] = {}

    def open(self, job_id: str) -> asyncio.Future[PrefillAnswer]:
        slot: asyncio.Future[PrefillAnswer] = asyncio.get_running_loop().create_future()
        self._slots[job_id] = slot
        return slot

    def close(self, job_id: str) -> None:
        self._slots.pop(job_id, None)

    def deliver(self, answer: PrefillAnswer) -> bool:
        """Hand the answer to its waiter; False if nobody waits for it any more (late, or twice)."""
        slot = self._slots.pop(answer.job_id, None)
        if slot is None or slot.done():
            return False
        slot.set_result(answer)
        return True


class DisaggPolicy:
    """Where a request's prefill runs: the config's switches, the live etcd thresholds."""

    def __init__(
        self, runtime: Runtime, conditional: bool, max_local_prefill_length: int, max_prefill_queue_size: int
    ) -> None:
        self._runtime = runtime
        self._conditional = conditional
        self._defaults = {
            DISAGG_MAX_LOCAL_PREFILL_LENGTH: max_local_prefill_length,
            DISAGG_MAX_PREFILL_QUEUE_SIZE: max_prefill_queue_size,
        }
        self._tunables: TunablesWatch | None = None
        self.decisions: Counter[str] = Counter()

    async def start(self) -> None:
        self._tunables = await self._runtime.discovery.watch_tunables()

    async def close(self) -> None:
        if self._tunables is not None:
            await self._tunables.close()

    def threshold(self, key: str) -> int:
        value = self._tunables.values.get(key) if self._tunables is not None else None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        return self._defaults[key]

    async def prefill_remotely(self, request: PreprocessedRequest, queue_depth: Any) -> bool:
        """True if this request's prefill should go to the queue.

        `queue_depth` is an async callable, asked only when the length alone sends the
        request remote (it costs a JetStream round trip). vLLM has no cheap prefix-cache
        lookup, so the whole prompt counts as uncached.
        """
        if not self._conditional:
            return True
        uncached = len(request.token_ids)
        if uncached <= self.threshold(DISAGG_MAX_LOCAL_PREFILL_LENGTH):
            return False
        return await queue_depth() < self.threshold(DISAGG_MAX_PREFILL_QUEUE_SIZE)

    def count(self, decision: Decision, request_id: str, detail: str) -> None:
        self.decisions[decision] += 1
        log.info("request %s: prefill %s (%s)", request_id, decision, detail)
