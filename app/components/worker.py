"""VllmWorker: the decode worker. Serves `generate` on an engine (vLLM or the mocker).

The engine lives in an `EngineHost` (app/engines/host.py). With `remote-prefill`, long
prefills go to PrefillWorkers through the prefill work queue (app/disagg/decode.py; the
hand-off is app/protocol/prefill.py); the answer comes back on `prefill_done`. A request
with n > 1 runs as n engine requests, one per choice (app/engines/choices.py). Router
replicas that re-sync their KV index ask `kv_blocks` for what the engine caches.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import msgspec
from pydantic import Field

from app.disagg.decode import RemotePrefill
from app.disagg.policy import DisaggPolicy
from app.disagg.tunables import MAX_LOCAL_PREFILL_LENGTH, MAX_PREFILL_QUEUE_SIZE
from app.engines.base import EngineDeadError
from app.engines.choices import generate_choices
from app.engines.host import EngineHost, WorkerConfig
from app.errors import WrongModelError
from app.protocol import (
    EngineOutput,
    KvBlocksWanted,
    KvEventBatch,
    PrefillAnswer,
    PrefillWanted,
    PreprocessedRequest,
    names,
)
from app.runtime import Runtime
from app.sdk import Service, ServiceContext, endpoint, on_shutdown, on_start, service


class VllmWorkerConfig(WorkerConfig):
    remote_prefill: bool = Field(default=False, description="hand long prefills to PrefillWorkers")
    conditional_disagg: bool = Field(default=False, description="prefill remotely only past the thresholds")
    max_local_prefill_length: int = Field(
        default=MAX_LOCAL_PREFILL_LENGTH.default, ge=0, description=MAX_LOCAL_PREFILL_LENGTH.doc
    )
    max_prefill_queue_size: int = Field(
        default=MAX_PREFILL_QUEUE_SIZE.default, ge=0, description=MAX_PREFILL_QUEUE_SIZE.doc
    )
    remote_prefill_timeout_s: float = Field(
        default=30.0, gt=0, description="wait this long for a PrefillWorker, then prefill locally"
    )


# VllmWorker reaches PrefillWorkers through the prefill work queue, not by calling them.
@service(config=VllmWorkerConfig)
class VllmWorker(Service):
    config: VllmWorkerConfig
    ctx: ServiceContext
    runtime: Runtime

    def __init__(self) -> None:
        config = self.config
        self.host = EngineHost(names.VLLM_WORKER, names.GENERATE, config, self.ctx, self.runtime)
        self._remote_prefill: RemotePrefill | None = None
        if config.remote_prefill:
            policy = DisaggPolicy(
                config.conditional_disagg, config.max_local_prefill_length, config.max_prefill_queue_size
            )
            self._remote_prefill = RemotePrefill(self.runtime, policy, config.remote_prefill_timeout_s)

    @on_start
    async def start(self) -> None:
        await self.host.start()
        if self._remote_prefill is not None:
            await self._remote_prefill.start(self.host.metrics)

    @endpoint(request=PreprocessedRequest)
    async def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        self._check_model(request)
        prefill_worker_id = None
        if self._remote_prefill is not None and request.kv_transfer_params is None:
            answer = await self._remote_prefill.prefill(request)
            if answer is not None:
                request = msgspec.structs.replace(request, kv_transfer_params=answer.kv_transfer_params)
                prefill_worker_id = answer.prefill_worker_id
        generate = self.host.engine.generate
        # aclosing: a caller that goes away closes this generator, and closing the
        # engine's stream is what aborts the request and frees its KV blocks.
        try:
            stream = generate(request) if request.n == 1 else generate_choices(generate, request)
            async with contextlib.aclosing(stream) as outputs:
                async for output in outputs:
                    if prefill_worker_id is not None:
                        output.prefill_worker_id = prefill_worker_id
                        prefill_worker_id = None
                    yield output
        except EngineDeadError:
            self.host.check_engine()  # leave now, not at the next check
            raise

    def _check_model(self, request: PreprocessedRequest) -> None:
        """Refuse a request for a model this worker does not serve: before any work, so the
        caller's pipeline routes it to a worker of that model. "" names no model (a caller
        from before routing by model): any worker serves it."""
        assert self.host.info is not None, "request before start()"
        served = self.host.info.name
        if request.model and request.model != served:
            raise WrongModelError(
                f"{names.VLLM_WORKER} {self.runtime.instance_id} serves model `{served}`, "
                f"not `{request.model}` (request {request.request_id})"
            )

    @endpoint(request=PrefillAnswer)
    async def prefill_done(self, answer: PrefillAnswer) -> AsyncIterator[bool]:
        """A PrefillWorker's answer; True if a request still waited for it."""
        yield self._remote_prefill is not None and self._remote_prefill.deliver(answer)

    @endpoint(request=PrefillWanted)
    async def prefill_wanted(self, question: PrefillWanted) -> AsyncIterator[float]:
        """Seconds this worker still waits for the job's answer; 0 when it does not."""
        yield 0.0 if self._remote_prefill is None else self._remote_prefill.time_left(question.job_id)

    @endpoint(request=KvBlocksWanted)
    async def kv_blocks(self, _wanted: KvBlocksWanted) -> AsyncIterator[KvEventBatch]:
        """What the engine caches, for a router replica that re-syncs its view of this worker
        (app/router/kv_resync.py): a clear, then every block."""
        for batch in self.host.kv_blocks():
            yield batch

    @on_shutdown
    async def stop(self) -> None:
        if self._remote_prefill is not None:
            await self._remote_prefill.close()
        await self.host.stop()
