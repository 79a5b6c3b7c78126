"""`EngineHost`: what every worker does around its engine.

The engine's own preparation (`Engine.prepare`), its start, the model record, KV events
and load reports on the events plane, /metrics, a watchdog that takes the worker of a dead
or hung engine (app/engines/stall.py) out of routing, and a clean stop. VllmWorker and
PrefillWorker both own one; only their endpoints differ.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry
from pydantic import Field

from app import env
from app.aio import cancel_and_wait, end_on_exit
from app.engines import Engine, create_engine
from app.engines.base import EngineProcess
from app.engines.kv_mirror import KvMirror
from app.engines.metrics import EngineStatsView
from app.engines.stall import StallWatch
from app.metrics import replica_port, serve_metrics
from app.protocol import KV_HASH_SCHEME, KvEventBatch, LoadReport, ModelInfo, ModelRecord, names
from app.runtime import Runtime
from app.sdk import EngineConfig, ServiceContext, startup

log = logging.getLogger(__name__)

# How often a worker asks its engine whether it still lives: a dead engine's worker leaves
# routing within this time (the check reads a flag; vLLM sets it when its core process ends),
# a hung one's within this time after `engine-stall-timeout-s`.
ENGINE_CHECK_INTERVAL_S = 0.5

# A worker's KV event batches of this long go out as one message (batches first_seq..seq):
# every router replica gets every message, and under load an engine makes a batch or more
# per step, so one message per batch was most of the events plane's messages. A router
# that learns of a cached block 5 ms later misses at worst a prefix hit of a request that
# came within those 5 ms; its view of the worker is as exact as before.
KV_WINDOW_S = 0.005


class WorkerConfig(EngineConfig):
    """Keys every worker takes; any other key of the section is an engine argument."""

    cpu_omp_threads_bind: list[str] = Field(
        default=[], description="VLLM_CPU_OMP_THREADS_BIND for each replica, by replica index"
    )
    load_report_interval_s: float = Field(default=1.0, gt=0, description="how often to publish LoadReport")
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="serve Prometheus /metrics here (replica i on metrics-port + i): engine load, prefill decisions",
    )
    nixl_side_channel_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="with NixlConnector: VLLM_NIXL_SIDE_CHANNEL_PORT of replica 0 (replica i: +i); 0 picks a free port",
    )
    ray_address: str | None = Field(
        default=None,
        description="an engine on Ray (larger than its node): the Ray head as HOST:PORT; "
        "default RAY_ADDRESS, else the cluster this node joined",
    )
    ray_wait_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="an engine on Ray waits this long for the cluster to offer its devices, "
        "then fails saying what is missing",
    )
    engine_stall_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="an engine that has requests to serve and completes no step for this long is hung: "
        "its worker leaves routing and exits, to be restarted (a healthy engine steps every second or faster)",
    )


class EngineHost:
    """A host that does not `advertise` (a PrefillWorker) registers no model and publishes
    no KV events or load reports: routers must never pick it for a request."""

    def __init__(
        self,
        service: str,
        endpoint: str,
        config: WorkerConfig,
        ctx: ServiceContext,
        runtime: Runtime,
        advertise: bool = True,
    ) -> None:
        self._service = service
        self._endpoint = endpoint
        self._config = config
        self._runtime = runtime
        self._advertise = advertise
        self.engine: Engine = create_engine(config.engine, config.engine_args)
        self._replica = ctx.replica
        self._fail = ctx.fail
        self._process = ctx.process
        # The service adds its own views (prefill decisions, jobs) before start().
        self.metrics = CollectorRegistry()
        self.metrics.register(EngineStatsView(self.engine))
        self._metrics_server: Any = None
        self.info: ModelInfo | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._leaving: asyncio.Task[None] | None = None
        self._model_record: ModelRecord | None = None
        self._pending_publishes: set[asyncio.Task[None]] = set()
        # Engine batches waiting for the window to close (`_publish_kv`), and its timer.
        self._held_kv: list[KvEventBatch] = []
        self._kv_flush_timer: asyncio.TimerHandle | None = None
        # What this worker's KV events said its engine caches, for routers that ask (`kv_blocks`).
        self._kv_mirror = KvMirror(runtime.instance_id)

    async def start(self) -> ModelInfo:
        worker_id = self._runtime.instance_id
        config = self._config
        startup.phase(startup.ENGINE_STARTING, config.engine)
        await self.engine.prepare(
            EngineProcess(
                replica=self._replica,
                advertised_host=self._runtime.host,
                cpu_omp_threads_bind=config.cpu_omp_threads_bind,
                nixl_side_channel_port=config.nixl_side_channel_port,
                ray_address=config.ray_address,
                ray_wait_timeout_s=config.ray_wait_timeout_s,
                leftovers_record=self._leftovers_record(),
            )
        )
        self._process.nixl_side_channel = self.engine.nixl_side_channel()
        # One phase for loading the weights and allocating the KV cache: vLLM's AsyncLLM does
        # both (and its warm-up) inside its EngineCore process, whose start-up handshake tells
        # this process only "HELLO" before and "READY" after (vllm/v1/engine/utils.py,
        # wait_for_engine_startup). The core's own lines in the same log ("Loading weights
        # took", "Available KV cache memory", "init engine ... took") give the split.
        info = await self.engine.start(worker_id, on_kv_events=self._publish_kv if self._advertise else None)
        # The scheme is this host's: it publishes the KV events, in the protocol's format.
        self.info = msgspec.structs.replace(info, kv_hash_scheme=KV_HASH_SCHEME)
        self._kv_mirror.block_size = self.info.block_size
        self._kv_mirror.capacity_blocks = self.engine.stats().kv_total_blocks
        startup.phase(
            startup.ENGINE_READY,
            f"{config.engine}: model {self.info.name}, block size {self.info.block_size}, "
            f"{self.engine.stats().kv_total_blocks} KV blocks",
        )
        self._metrics_server = serve_metrics(self.metrics, replica_port(config.metrics_port, self._replica))
        self._watchdog = end_on_exit(asyncio.create_task(self._watch_engine(), name="engine-watchdog"), self._fail)
        if not self._advertise:
            return self.info
        self._model_record = ModelRecord(
            name=self.info.name,
            instance_id=worker_id,
            service=self._service,
            endpoint=self._endpoint,
            metadata=msgspec.to_builtins(self.info),
        )
        await self._runtime.discovery.register_model(self._model_record)
        reports = asyncio.create_task(self._report_load(worker_id), name="load-reports")
        self._load_task = end_on_exit(reports, self._fail)
        return self.info

    def _leftovers_record(self) -> Path:
        # The same file for a replica's successor (supervisord restarts it with the same
        # name); the host keeps nodes apart that share a file system (network namespaces).
        name = f"{self._runtime.namespace}.{self._service}.{self._replica}@{self._runtime.host}.json"
        return Path(env.TANDEM_STATE_DIR.get()) / "engines" / name

    def check_engine(self) -> None:
        """Leave if the engine died: called every ENGINE_CHECK_INTERVAL_S, and at once by an
        endpoint whose request failed with EngineDeadError."""
        reason = self.engine.dead_reason()
        if reason is not None:
            self._start_leaving("dead", reason)

    async def _watch_engine(self) -> None:
        # Until stop() cancels it: a watchdog that ended on its own would leave the process.
        stall = StallWatch(self._config.engine_stall_timeout_s)
        while True:
            await asyncio.sleep(ENGINE_CHECK_INTERVAL_S)
            self.check_engine()
            progress = self.engine.progress()
            stalled_s = stall.look(progress, time.monotonic())
            if stalled_s is not None:
                self._start_leaving(
                    "hung",
                    f"{progress.pending} requests to serve and no engine step for {stalled_s:.1f} s; "
                    f"engine-stall-timeout-s is {stall.timeout_s:g}",
                )

    def _start_leaving(self, state: str, reason: str) -> None:
        if self._leaving is None:
            self._leaving = asyncio.get_running_loop().create_task(self._leave(state, reason))

    async def _leave(self, state: str, reason: str) -> None:
        """A dead engine answers every request with an error, a hung one never answers: out
        of routing, then out.

        The model record goes first, so that a Frontend with no other worker of the model
        answers 503 on /health; the runner then withdraws the instance records, ends the
        calls in flight with an error their callers move to another worker, stops the engine
        and exits non-zero, and supervisord starts a fresh worker with a fresh engine. A
        SIGSTOPped vLLM engine core outlives vLLM's shutdown: the worker's leftovers guard
        (app.launch.leftovers) kills it when the worker exits.
        """
        log.error(
            "engine %s %s (%s): leaving routing; this process exits and is restarted",
            self._config.engine,
            state,
            reason,
        )
        if self._model_record is not None:
            try:
                await self._runtime.discovery.deregister_model(self._model_record)
            except Exception:
                log.exception("removing the model record failed; it goes with the lease")
        self._fail(f"engine {state}: {reason}")

    def kv_blocks(self) -> list[KvEventBatch]:
        """Every block the engine caches, as KV event batches a router re-syncs from
        (app/engines/kv_mirror.py): taken at once, so they agree with one seq S.

        The batches held for the window go out first: the mirror has applied them, so S
        counts them, and a later message starting at or before S would carry events the
        dump holds already (the router can skip a message, not half of one). Flushed here,
        every message is either all in the dump or all after it."""
        self._flush_kv()
        return self._kv_mirror.dump()

    def _publish_kv(self, batch: KvEventBatch) -> None:
        """Take one engine batch: into the mirror at once, onto the events plane with the
        others of KV_WINDOW_S (see KV_WINDOW_S)."""
        # Called from the engine's relay task; publishing must not block it.
        self._kv_mirror.apply(batch)
        held = self._held_kv
        if held and (batch.seq != held[-1].seq + 1 or batch.block_size != held[0].block_size):
            # One message claims every seq from its first to its last, in one block size: an
            # engine's own gap (vLLM dropped batches) must reach the routers as a gap.
            self._flush_kv()
        if not held:
            self._kv_flush_timer = asyncio.get_running_loop().call_later(KV_WINDOW_S, self._flush_kv)
        held.append(batch)

    def _flush_kv(self) -> None:
        """Publish the held batches as one message: batches first_seq..seq, events in order."""
        if self._kv_flush_timer is not None:
            self._kv_flush_timer.cancel()
            self._kv_flush_timer = None
        held = self._held_kv
        if not held:
            return
        if len(held) == 1:
            message = held[0]  # as a worker without the window sends it
        else:
            last = held[-1]
            message = KvEventBatch(
                worker_id=last.worker_id,
                seq=last.seq,
                first_seq=held[0].seq,
                block_size=last.block_size,
                events=[event for batch in held for event in batch.events],
                timestamp=last.timestamp,
            )
        held.clear()
        # NATS keeps the order of publishes from one connection, and tasks start in FIFO
        # order: messages leave in the order of their flushes, which is seq order.
        task = asyncio.get_running_loop().create_task(self._runtime.publish(names.KV_EVENTS_TOPIC, message))
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
                prefix_cache_hits=stats.prefix_cache_hits,
                prefix_cache_queries=stats.prefix_cache_queries,
            )
            try:
                await self._runtime.publish(names.LOAD_TOPIC, report)
            except Exception:
                log.exception("publishing the load report failed")
            await asyncio.sleep(self._config.load_report_interval_s)

    async def stop(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        for loop in (self._watchdog, self._load_task):
            # One that ended has failed the process (end_on_exit) and would raise here,
            # before the engine is stopped.
            if loop is not None and not loop.done():
                await cancel_and_wait(loop)
        await self.engine.stop()
        # The engine's last batches, held for the window, still go out.
        self._flush_kv()
