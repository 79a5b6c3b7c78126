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
   once. Before it prefills, a PrefillWorker asks the decode worker (`prefill_wanted`)
   how long it will still wait, and skips a job nobody waits for any more (the decode
   worker gave up, or is gone). The KV a discarded answer points at is freed by the
   prefill engine when its lease runs out (vLLM, about 30 s).

No clock is compared across nodes: the time left is measured on the decode worker's
clock and taken by the PrefillWorker as a span on its own (a prefill node whose clock is
a minute ahead takes its jobs all the same).
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
    # Wall clock (time.time()) when the decode worker gives up: for logs and older
    # PrefillWorkers only, as clocks differ across nodes (`prefill_wanted` is what counts).
    deadline: float


class PrefillWanted(msgspec.Struct, kw_only=True):
    """A PrefillWorker's question to a job's decode worker before it prefills the job."""

    job_id: str


class PrefillAnswer(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The PrefillWorker's answer to a job's decode worker: where to pull the KV from, or
    `error`, why no PrefillWorker will prefill it (the decode worker prefills it itself at
    once, instead of when its wait runs out). A failed answer's `kv_transfer_params` is
    empty: a decode worker of a Tandem without `error` then prefills locally too. A
    success encodes as it did before `error` existed (omit_defaults)."""

    job_id: str
    prefill_worker_id: str
    kv_transfer_params: dict[str, Any]
    error: str = ""
