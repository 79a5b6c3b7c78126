"""The prefill side of disaggregated prefill: `PrefillJobs` pulls the shared work queue.

Each job is a decode worker's request (app/protocol/prefill.py has the whole hand-off).
The engine prefills it with `max_tokens=1` and `kv_transfer_params={"do_remote_decode":
true}`, keeps the KV, and returns where to fetch it; the job's answer goes to the decode
worker's `prefill_done` with those params and this worker's instance id, then the job is
acked. A job its decode worker no longer waits for (it prefilled locally, or is gone) is
acked and skipped.

A prefill that fails is nak'ed for another PrefillWorker to try, `MAX_ATTEMPTS` times in
all; after the last, or at once where the request itself is at fault (the engine's 400),
the decode worker is answered with the error and prefills the request itself, instead of
waiting out its `remote-prefill-timeout-s`. A prefill that outlasts that wait (an engine
hung) is abandoned then: the decode worker has prefilled it itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry

from app.aio import cancel_and_wait, end_on_exit
from app.errors import InvalidRequestError
from app.logs import Throttled
from app.metrics import CounterView
from app.protocol import (
    PREFILL_ACK_WAIT_S,
    EngineOutput,
    PrefillAnswer,
    PrefillJob,
    PrefillWanted,
    PreprocessedRequest,
    names,
)
from app.runtime import Runtime
from app.runtime.workqueue import Job, WorkQueue

log = logging.getLogger(__name__)
# One line per kind of failure however many jobs meet it (a NATS outage meets them all);
# the jobs' outcomes are counted in tandem_prefill_jobs.
_pull_failed_log = Throttled(log, logging.ERROR)
_job_failed_log = Throttled(log, logging.ERROR)
_retried_log = Throttled(log, logging.ERROR)
_given_back_log = Throttled(log, logging.ERROR)
_timed_out_log = Throttled(log)
_answer_failed_log = Throttled(log)
_cannot_ask_log = Throttled(log)
_heartbeat_failed_log = Throttled(log)

_REDELIVERY_DELAY_S = 0.5
_ANSWER_TIMEOUT_S = 5.0
# Deliveries of one job whose prefill failed before its decode worker is told to do it.
MAX_ATTEMPTS = 3

Generate = Callable[[PreprocessedRequest], AsyncGenerator[EngineOutput, None]]


def prefill_request(request: PreprocessedRequest, attempt: int) -> PreprocessedRequest:
    """The engine request that computes the prompt's KV and keeps it for a decode engine."""
    return msgspec.structs.replace(
        request,
        # A redelivered job may come back to this engine while vLLM still knows the old id.
        request_id=f"{request.request_id}-prefill-{attempt}",
        # Its one token is thrown away (the decode engine samples the first one itself), so
        # neither logprobs nor a grammar to compile for it.
        sampling=msgspec.structs.replace(request.sampling, logprobs=None, structured=None),
        stop=msgspec.structs.replace(request.stop, max_tokens=1, min_tokens=0),
        kv_transfer_params={"do_remote_decode": True},
        # One prefill serves all of the request's choices (app/engines/choices.py).
        n=1,
    )


class PrefillJobs:
    def __init__(
        self,
        runtime: Runtime,
        generate: Generate,
        concurrency: int,
        registry: CollectorRegistry,
        fail: Callable[[str], None],
    ) -> None:
        """`generate`: the engine's stream (its host's); `concurrency`: jobs in the engine at once.
        `counts` (done, failed, given_back, timed_out, expired, undelivered, errors) also go
        to `registry`. `fail`
        ends the process: a puller that ended (a bug: each contains its jobs' errors) would
        leave a registered PrefillWorker that pulls less, or nothing."""
        self._runtime = runtime
        self._fail = fail
        self._generate = generate
        self._concurrency = concurrency
        self._pullers: list[asyncio.Task[None]] = []
        self.counts: Counter[str] = Counter()
        registry.register(CounterView("tandem_prefill_jobs", "Prefill jobs by outcome", "outcome", self.counts))

    async def start(self) -> None:
        queue = await self._runtime.work_queue(names.PREFILL_QUEUE, ack_wait_s=PREFILL_ACK_WAIT_S)
        self._pullers = [
            end_on_exit(asyncio.create_task(self._pull_jobs(queue), name=f"prefill-puller-{i}"), self._fail)
            for i in range(self._concurrency)
        ]
        log.info("pulling prefill jobs from %s", queue.stream)

    async def close(self) -> None:
        for puller in self._pullers:
            if not puller.done():  # one that ended was reported (end_on_exit): nothing to wait for
                await cancel_and_wait(puller)

    def live_pullers(self) -> int:
        """Pullers still pulling (each contains its jobs' errors: fewer than configured is a bug)."""
        return sum(not puller.done() for puller in self._pullers)

    async def _pull_jobs(self, queue: WorkQueue) -> None:
        while True:
            try:
                job = await queue.pull(timeout=1.0, job_type=PrefillJob)
            except Exception:
                _pull_failed_log.log("pulling from the prefill queue failed", exc_info=True)
                await asyncio.sleep(1.0)
                continue
            if job is None:
                continue
            try:
                await self._handle(job)
            except Exception:
                # An ack, nak or answer that failed (NATS slow or away) costs this job a
                # redelivery at most, never the puller: it goes on with the next one.
                self.counts["errors"] += 1
                _job_failed_log.log(
                    "request %s: prefill job failed; JetStream redelivers it",
                    job.data.request.request_id,
                    exc_info=True,
                )

    async def _handle(self, job: Job) -> None:
        data: PrefillJob = job.data
        request_id = data.request.request_id
        left_s = await self._time_left(data)
        if left_s <= 0:
            self.counts["expired"] += 1
            log.debug("request %s: its decode worker waits no more; prefill job skipped", request_id)
            await job.ack()
            return
        answer_by = time.monotonic() + left_s
        heartbeat = asyncio.create_task(self._keep_in_progress(job))
        try:
            async with asyncio.timeout(left_s):
                params = await self._prefill(prefill_request(data.request, job.redeliveries))
        except TimeoutError:
            # Its decode worker prefilled it itself by now: the job is done, by it.
            self.counts["timed_out"] += 1
            _timed_out_log.log(
                "request %s: prefill outlasted its decode worker's wait (%.1f s); abandoned", request_id, left_s
            )
            await job.ack()
            return
        except Exception as exc:
            self.counts["failed"] += 1
            attempt = job.redeliveries + 1
            if attempt < MAX_ATTEMPTS and not isinstance(exc, InvalidRequestError):
                _retried_log.log(
                    "request %s: prefill failed (attempt %d); the job goes back to the queue",
                    request_id,
                    attempt,
                    exc_info=True,
                )
                await job.nak(delay=_REDELIVERY_DELAY_S)
                return
            _given_back_log.log(
                "request %s: prefill failed (attempt %d: %s); its decode worker prefills it", request_id, attempt, exc
            )
            params, error = {}, f"prefill failed: {exc}"
        else:
            error = ""
        finally:
            await cancel_and_wait(heartbeat)
        answer = PrefillAnswer(
            job_id=data.job_id, prefill_worker_id=self._runtime.instance_id, kv_transfer_params=params, error=error
        )
        # The decode worker waits for this answer until the job's deadline: until then a slow
        # accept (its process busy) is no reason to give up on it. A decode process that is
        # gone answers at once (NATS: no responders).
        answer_within = max(answer_by - time.monotonic(), _ANSWER_TIMEOUT_S)
        try:
            taken = await self._runtime.client(names.VLLM_WORKER, names.PREFILL_DONE).call(
                answer, target=data.decode_worker_id, timeout=answer_within, accept_timeout=answer_within
            )
        except Exception as exc:
            # The decode worker is gone or unreachable: nobody can use this KV any more.
            taken = False
            _answer_failed_log.log(
                "request %s: answering decode worker %s failed: %s", request_id, data.decode_worker_id, exc
            )
        if error:
            self.counts["given_back"] += 1
        else:
            self.counts["done" if taken else "undelivered"] += 1
            log.debug(
                "request %s: prefilled %d tokens for %s (%s)",
                request_id,
                len(data.request.token_ids),
                data.decode_worker_id,
                "taken" if taken else "discarded",
            )
        await job.ack()

    async def _time_left(self, job: PrefillJob) -> float:
        """How long the job's decode worker still waits, by its own clock: no clocks of two
        nodes are compared. 0 when it waits no more or cannot be asked (gone)."""
        try:
            left = await self._runtime.client(names.VLLM_WORKER, names.PREFILL_WANTED).call(
                PrefillWanted(job_id=job.job_id),
                target=job.decode_worker_id,
                timeout=_ANSWER_TIMEOUT_S,
                response_type=float,
            )
        except Exception as exc:
            _cannot_ask_log.log(
                "request %s: decode worker %s cannot be asked (%s)", job.request.request_id, job.decode_worker_id, exc
            )
            return 0.0
        return float(left or 0.0)

    async def _prefill(self, request: PreprocessedRequest) -> dict[str, Any]:
        params = None
        async with contextlib.aclosing(self._generate(request)) as outputs:
            async for output in outputs:
                if output.kv_transfer_params is not None:
                    params = output.kv_transfer_params
        if params is None:
            raise RuntimeError("the engine returned no kv_transfer_params (is a KV connector configured?)")
        return params

    @staticmethod
    async def _keep_in_progress(job: Job) -> None:
        while True:
            await asyncio.sleep(PREFILL_ACK_WAIT_S / 2)
            try:
                await job.in_progress()
            except Exception as exc:  # the next beat may pass; if none does, a redelivery
                _heartbeat_failed_log.log(
                    "request %s: prefill job heartbeat failed (%s)", job.data.request.request_id, exc
                )
