"""VllmWorker: the decode worker. Serves `generate` on an engine (vLLM or the mocker)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator

import msgspec
from pydantic import Field

from app.aio import cancel_and_wait
from app.components.routing import RouterPolicyName
from app.engines import Engine, create_engine
from app.protocol import EngineOutput, KvEventBatch, LoadReport, ModelInfo, PreprocessedRequest
from app.runtime import ModelRecord, Runtime
from app.sdk import EngineConfig, ServiceContext, endpoint, on_shutdown, on_start, service

log = logging.getLogger(__name__)


class WorkerConfig(EngineConfig):
    """Keys every worker takes; any other key of the section is an engine argument."""

    cpu_omp_threads_bind: list[str] = Field(
        default=[], description="VLLM_CPU_OMP_THREADS_BIND for each replica, by replica index"
    )
    load_report_interval_s: float = Field(default=1.0, gt=0, description="how often to publish LoadReport")


class VllmWorkerConfig(WorkerConfig):
    router: RouterPolicyName = Field(default="round-robin", description="the Processor's router; kv makes the worker publish KV events")
    remote_prefill: bool = Field(default=False, description="hand long prefills to PrefillWorkers")
    conditional_disagg: bool = Field(default=False, description="prefill remotely only past the thresholds")
    max_local_prefill_length: int = Field(default=1000, ge=0, description="uncached prompt tokens prefilled locally")
    max_prefill_queue_size: int = Field(default=2, ge=0, description="queue depth beyond which prefill stays local")


class EngineHost:
    """What every worker does around its engine: CPU pinning, start, the model record,
    KV events and load reports on the events plane, and a clean stop.

    VllmWorker and PrefillWorker both own one; only their endpoints differ.
    """

    def __init__(self, service: str, endpoint: str, config: WorkerConfig, ctx: ServiceContext, runtime: Runtime) -> None:
        self._service = service
        self._endpoint = endpoint
        self._config = config
        self._runtime = runtime
        binds = config.cpu_omp_threads_bind
        if binds:
            # Two vLLM CPU engines sharing cores run ~10x slower (FACTS.md): each replica
            # takes its own cores, set before the engine spawns its workers.
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binds[ctx.replica % len(binds)]
        self.engine: Engine = create_engine(config.engine, config.engine_args)
        self.info: ModelInfo | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._pending_publishes: set[asyncio.Task[None]] = set()

    async def start(self) -> ModelInfo:
        worker_id = self._runtime.instance_id
        self.info = await self.engine.start(worker_id, on_kv_events=self._publish_kv)
        await self._runtime.discovery.register_model(
            ModelRecord(
                name=self.info.name,
                instance_id=worker_id,
                service=self._service,
                endpoint=self._endpoint,
                metadata=msgspec.to_builtins(self.info),
            )
        )
        self._load_task = asyncio.create_task(self._report_load(worker_id))
        log.info("engine %s ready: model %s, block size %d", self._config.engine, self.info.name, self.info.block_size)
        return self.info

    def _publish_kv(self, batch: KvEventBatch) -> None:
        # Called from the engine's relay task; publishing must not block it. NATS keeps
        # the order of publishes from one connection, and tasks start in FIFO order.
        task = asyncio.get_running_loop().create_task(self._runtime.publish("kv", batch))
        self._pending_publishes.add(task)
        task.add_done_callback(self._pending_publishes.discard)

    async def _report_load(self, worker_id: str) -> None:
        while True:
            stats = self.engine.stats()
            report = LoadReport(
                worker_id=worker_id,
                running=stats.running,
                waiting=stats.waiting,
                kv_used_blocks=stats.kv_used_blocks,
                kv_total_blocks=stats.kv_total_blocks,
                timestamp=time.time(),
            )
            try:
                await self._runtime.publish("load", report)
            except Exception:
                log.exception("publishing the load report failed")
            await asyncio.sleep(self._config.load_report_interval_s)

    async def stop(self) -> None:
        await cancel_and_wait(self._load_task)
        await self.engine.stop()


# VllmWorker reaches PrefillWorkers through the prefill work queue, not by calling them.
@service(config=VllmWorkerConfig)
class VllmWorker:
    config: VllmWorkerConfig
    ctx: ServiceContext
    runtime: Runtime

    def __init__(self) -> None:
        self.host = EngineHost("VllmWorker", "generate", self.config, self.ctx, self.runtime)

    @on_start
    async def start(self) -> None:
        await self.host.start()

    @endpoint(request=PreprocessedRequest)
    async def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        # aclosing: a caller that goes away closes this generator, and closing the
        # engine's stream is what aborts the request and frees its KV blocks.
        async with contextlib.aclosing(self.host.engine.generate(request)) as outputs:
            async for output in outputs:
                yield output

    @on_shutdown
    async def stop(self) -> None:
        await self.host.stop()
