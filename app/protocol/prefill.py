"""Disaggregated prefill: the contract between decode workers and PrefillWorkers.

The hand-off, one request at a time:

1. The decode worker (VllmWorker) decides to prefill remotely (`DisaggPolicy` in
   app/disagg/policy.py), opens a one-shot slot for a fresh job id, and pushes a
   `PrefillJob` on the JetStream work queue `prefill_queue` (`names.PREFILL_QUEUE`). Every
   PrefillWorker pulls from the queue's one durable consumer, so each job goes to one of them.
2. The PrefillWorker runs the prompt with `max_tokens=1` and
   `kv_transfer_params={"do_remote_decode": true}`: its engine keeps the KV and returns
   where to fetch it. It answers with a `PrefillAnswer` by calling the decode worker's
   `prefill_done` endpoint on the instance the job names, then acks the job. A job whose
   prefill failed is nak'ed (redelivered, maybe to another PrefillWorker); one whose worker
   died is redelivered after `PREFILL_ACK_WAIT_S`.
3. The decode worker waits for the answer until the job's deadline. With the answer, its
   engine pulls the KV over NIXL and decodes; without it (timeout, error), it prefills
   locally. An answer that arrives after that is discarded: each slot is used at most
   once, and a PrefillWorker skips jobs past their deadline. The KV a discarded answer
   points at is freed by the prefill engine when its lease runs out (vLLM, about 30 s).

Deadlines are wall-clock times, so decode and prefill nodes need roughly synced clocks.
"""

from __future__ import annotations

from typing import Any

import msgspec

from app.protocol.requests import PreprocessedRequest

# A job its PrefillWorker neither acks nor marks in progress within this is redelivered
# (the worker died); a live worker marks long prefills in progress every half of it.
# Both sides open the queue with it: JetStream keeps the first consumer's setting.
PREFILL_ACK_WAIT_S = 10.0


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
