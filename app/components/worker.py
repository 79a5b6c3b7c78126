"""VllmWorker: the decode worker. Serves `generate` on an engine (vLLM or the mocker).

With `remote-prefill`, long prefills go to PrefillWorkers through the prefill work queue
(see app/components/disagg.py for the hand-off); the answer comes back on `prefill_done`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry
from pydantic import Field

from app.aio import cancel_and_wait
from app.components.disagg import PREFILL_ACK_WAIT_S, PREFILL_QUEUE, DisaggPolicy, PendingPrefills, PrefillAnswer, PrefillJob
from app.components.metrics import CounterView, EngineStatsView, serve_metrics
from app.components.routing import RouterPolicyName
from app.engines import Engine, create_engine
from app.infra import free_port
from app.protocol import EngineOutput, KvEventBatch, LoadReport, ModelInfo, PreprocessedRequest
from app.runtime import EndpointClient, ModelRecord, Runtime
from app.runtime.workqueue import WorkQueue
from app.sdk import EngineConfig, ServiceContext, endpoint, on_shutdown, on_start, service

log = logging.getLogger(__name__)


class WorkerConfig(EngineConfig):
    """Keys every worker takes; any other key of the section is an engine argument."""

    cpu_omp_threads_bind: list[str] = Field(
        default=[], description="VLLM_CPU_OMP_THREADS_BIND for each replica, by replica index"
    )
    load_report_interval_s: float = Field(default=1.0, gt=0, description="how often to publish LoadReport")
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="serve Prometheus /metrics here (replica i on metrics-port + i): engine load, prefill decisions",
    )
    nixl_side_channel_port: int = Field(
        default=0, ge=0, le=65535,
        description="with NixlConnector: VLLM_NIXL_SIDE_CHANNEL_PORT of replica 0 (replica i: +i); 0 picks a free port",
    )
    ray_address: str | None = Field(
        default=None,
        description="an engine on Ray (larger than its node): the Ray head as HOST:PORT; default RAY_ADDRESS, else the cluster this node joined",
    )
    ray_wait_timeout_s: float = Field(
        default=600.0, gt=0,
        description="an engine on Ray waits this long for the cluster to offer its devices, then fails saying what is missing",
    )


class VllmWorkerConfig(WorkerConfig):
    router: RouterPolicyName = Field(default="round-robin", description="the Processor's router; kv makes the worker publish KV events")
    remote_prefill: bool = Field(default=False, description="hand long prefills to PrefillWorkers")
    conditional_disagg: bool = Field(default=False, description="prefill remotely only past the thresholds")
    max_local_prefill_length: int = Field(default=1000, ge=0, description="uncached prompt tokens prefilled locally")
    max_prefill_queue_size: int = Field(default=2, ge=0, description="queue depth beyond which prefill stays local")
    remote_prefill_timeout_s: float = Field(
        default=30.0, gt=0, description="wait this long for a PrefillWorker, then prefill locally"
    )


class EngineHost:
    """What every worker does around its engine: CPU pinning, start, the model record,
    KV events and load reports on the events plane, and a clean stop.

    VllmWorker and PrefillWorker both own one; only their endpoints differ. A host that
    does not `advertise` (a PrefillWorker) registers no model and publishes no KV events
    or load reports: routers must never pick it for a request.
    """

    def __init__(
        self, service: str, endpoint: str, config: WorkerConfig, ctx: ServiceContext, runtime: Runtime,
        advertise: bool = True,
    ) -> None:
        self._service = service
        self._endpoint = endpoint
        self._config = config
        self._runtime = runtime
        self._advertise = advertise
        binds = config.cpu_omp_threads_bind
        if binds:
            # Two vLLM CPU engines sharing cores run ~10x slower (FACTS.md): each replica
            # takes its own cores, set before the engine spawns its workers.
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binds[ctx.replica % len(binds)]
        if _uses_nixl(config.engine_args):
            _set_nixl_side_channel(config.nixl_side_channel_port, ctx.replica, runtime.host)
        self.engine: Engine = create_engine(config.engine, config.engine_args)
        self._replica = ctx.replica
        # The service adds its own views (prefill decisions, jobs) before start().
        self.metrics = CollectorRegistry()
        self.metrics.register(EngineStatsView(self.engine))
        self._metrics_server: Any = None
        self.info: ModelInfo | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._pending_publishes: set[asyncio.Task[None]] = set()

    async def start(self) -> ModelInfo:
        worker_id = self._runtime.instance_id
        if self._config.engine == "vllm":
            await _wait_for_ray_devices(self._config)
        self.info = await self.engine.start(worker_id, on_kv_events=self._publish_kv if self._advertise else None)
        log.info("engine %s ready: model %s, block size %d", self._config.engine, self.info.name, self.info.block_size)
        self._metrics_server = serve_metrics(self.metrics, self._config.metrics_port, self._replica)
        if not self._advertise:
            return self.info
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
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        await cancel_and_wait(self._load_task)
        await self.engine.stop()


async def _wait_for_ray_devices(config: WorkerConfig) -> None:
    """An engine larger than its node starts only once the Ray cluster offers its devices."""
    from app.engines.vllm_ray import ray_devices_needed, wait_for_ray_devices

    need = ray_devices_needed(config.engine_args)
    if need is not None:
        # In a thread: the wait may take minutes, and the process must keep its etcd lease.
        await asyncio.to_thread(wait_for_ray_devices, need, config.ray_address, config.ray_wait_timeout_s)


def _uses_nixl(engine_args: dict) -> bool:
    for key in ("kv_transfer_config", "kv-transfer-config"):
        if "NixlConnector" in str(engine_args.get(key) or ""):
            return True
    return False


def _set_nixl_side_channel(base_port: int, replica: int, advertised_host: str) -> None:
    """Give this engine its own NIXL side channel (engines on one host must not share a port).

    The host is where the prefill side listens and what it tells decode engines to dial:
    the address this process advertises in its instance records (TANDEM_ADVERTISE_HOST,
    else the hostname's address), so that records and KV hand-offs never disagree.
    """
    port = base_port + replica if base_port else free_port()
    os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(port)
    if not os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST"):
        os.environ["VLLM_NIXL_SIDE_CHANNEL_HOST"] = advertised_host
    log.info("NIXL side channel on %s:%d", os.environ["VLLM_NIXL_SIDE_CHANNEL_HOST"], port)


# VllmWorker reaches PrefillWorkers through the prefill work queue, not by calling them.
@service(config=VllmWorkerConfig)
class VllmWorker:
    config: VllmWorkerConfig
    ctx: ServiceContext
    runtime: Runtime

    def __init__(self) -> None:
        self.host = EngineHost("VllmWorker", "generate", self.config, self.ctx, self.runtime)
        self._queue: WorkQueue | None = None
        self._policy: DisaggPolicy | None = None
        self._prefill_fleet: EndpointClient | None = None
        self._pending = PendingPrefills()

    @on_start
    async def start(self) -> None:
        await self.host.start()
        if self.config.remote_prefill:
            self._queue = await self.runtime.work_queue(PREFILL_QUEUE, ack_wait_s=PREFILL_ACK_WAIT_S)
            self._policy = DisaggPolicy(
                self.runtime, self.config.conditional_disagg,
                self.config.max_local_prefill_length, self.config.max_prefill_queue_size,
            )
            await self._policy.start()
            # Followed so that a job is queued only while some PrefillWorker can take it:
            # a decode worker up before its prefill nodes (or after they all died) must not
            # hold long prompts for `remote-prefill-timeout-s` each.
            self._prefill_fleet = self.runtime.client("PrefillWorker", "status")
            await self._prefill_fleet.watch()
            self.host.metrics.register(
                CounterView("tandem_worker_prefill_decisions", "Where prompts were prefilled", "decision", self._policy.decisions)
            )

    @endpoint(request=PreprocessedRequest)
    async def generate(self, request: PreprocessedRequest) -> AsyncIterator[EngineOutput]:
        prefill_worker_id = None
        if self._policy is not None and request.kv_transfer_params is None:
            answer = await self._prefill_remotely_if_worth_it(request)
            if answer is not None:
                request = msgspec.structs.replace(request, kv_transfer_params=answer.kv_transfer_params)
                prefill_worker_id = answer.prefill_worker_id
        # aclosing: a caller that goes away closes this generator, and closing the
        # engine's stream is what aborts the request and frees its KV blocks.
        async with contextlib.aclosing(self.host.engine.generate(request)) as outputs:
            async for output in outputs:
                if prefill_worker_id is not None:
                    output.prefill_worker_id = prefill_worker_id
                    prefill_worker_id = None
                yield output

    async def _prefill_remotely_if_worth_it(self, request: PreprocessedRequest) -> PrefillAnswer | None:
        """The PrefillWorker's answer, or None where this worker prefills the request itself."""
        assert self._policy is not None and self._queue is not None and self._prefill_fleet is not None
        policy, queue = self._policy, self._queue
        if not self._prefill_fleet.instance_ids():
            policy.count("local", request.request_id, "no PrefillWorker registered")
            return None
        try:
            remote = await policy.prefill_remotely(request, queue.depth)
        except Exception as exc:
            policy.count("local", request.request_id, f"prefill queue unreadable: {exc}")
            return None
        if not remote:
            policy.count("local", request.request_id, f"{len(request.token_ids)} prompt tokens")
            return None
        job_id = uuid.uuid4().hex
        timeout = self.config.remote_prefill_timeout_s
        answer = self._pending.open(job_id)
        try:
            job = PrefillJob(
                job_id=job_id, request=request, decode_worker_id=self.runtime.instance_id, deadline=time.time() + timeout
            )
            await queue.push(job)
            result = await asyncio.wait_for(answer, timeout)
        except Exception as exc:
            reason = f"no answer within {timeout:g}s" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            policy.count("fallback", request.request_id, reason)
            return None
        finally:
            # A late answer finds no slot and is discarded.
            self._pending.close(job_id)
        policy.count("remote", request.request_id, f"{len(request.token_ids)} prompt tokens on {result.prefill_worker_id}")
        return result

    @endpoint(request=PrefillAnswer)
    async def prefill_done(self, answer: PrefillAnswer) -> AsyncIterator[bool]:
        """A PrefillWorker's answer; True if a request still waited for it."""
        yield self._pending.deliver(answer)

    @on_shutdown
    async def stop(self) -> None:
        if self._policy is not None:
            await self._policy.close()
        await self.host.stop()
