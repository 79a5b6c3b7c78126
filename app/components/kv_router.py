"""Router: picks the worker for a request (KV overlap, load, or a simple policy)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.aio import cancel_and_wait
from app.components.metrics import serve_metrics
from app.components.routing import RouterPolicyName
from app.components.worker import VllmWorker
from app.protocol import KvEventBatch, LoadReport, RouteDecision, RouteRequest
from app.router import KvRouter, PlacementEvent
from app.router.metrics import RouterMetrics
from app.runtime import InstanceRecord, Runtime, ServiceError
from app.sdk import ServiceContext, depends, endpoint, on_shutdown, on_start, service
from app.tunables import ROUTER_POLICY

log = logging.getLogger(__name__)

# Topic on which routers and processors share placement accounting (app.router.load).
PLACEMENT_TOPIC = "placement"


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    router: RouterPolicyName = "kv"
    model: str = Field(default="", description="route only among workers serving this model")
    block_size: int | None = Field(default=None, ge=1, description="KV block size; default: the model record's")
    knobs: dict[str, Any] = Field(default={}, description="the policy's own parameters")
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="serve Prometheus /metrics here (replica i on metrics-port + i): hit rate, decision time",
    )


class NoRoutableWorkerError(ServiceError):
    status = 503


@service(config=RouterConfig)
class Router:
    """Each replica builds the whole KV index from the event stream and shares its
    placements, so replicas neither miss cached prefixes nor pile onto one worker."""

    config: RouterConfig
    runtime: Runtime
    ctx: ServiceContext
    worker = depends(VllmWorker)

    def __init__(self) -> None:
        self._router: KvRouter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._publishes: set[asyncio.Task[None]] = set()
        self._metrics_server: Any = None

    @on_start
    async def start(self) -> None:
        block_size = self.config.block_size or await self._block_size_from_models()
        metrics = RouterMetrics()
        self._router = KvRouter(
            block_size,
            policy=self.config.router,
            knobs=self.config.knobs,
            router_id=self.runtime.instance_id,
            on_placement=self._share_placement,
            observe_decision_seconds=metrics.observe_decision,
        )
        metrics.router = self._router
        self._metrics_server = serve_metrics(metrics.registry, self.config.metrics_port, self.ctx.replica)
        router = self._router
        self._tasks = [
            await self._consume("kv", KvEventBatch, router.apply_kv_batch),
            await self._consume("load", LoadReport, router.apply_load_report),
            await self._consume(PLACEMENT_TOPIC, PlacementEvent, router.apply_placement),
        ]
        workers = await self.runtime.discovery.watch_instances(VllmWorker.__name__, "generate")
        workers.add_listener(self._on_worker_change)
        await self.worker.generate.watch()
        self._tunables = await self.runtime.discovery.watch_tunables()
        self._tunables.add_listener(self._on_tunable)
        if ROUTER_POLICY in self._tunables.values:
            self._on_tunable(ROUTER_POLICY, self._tunables.values[ROUTER_POLICY])
        log.info("routing with policy %s, block size %d", self.config.router, block_size)

    async def _block_size_from_models(self) -> int:
        watch = await self.runtime.discovery.watch_models()
        try:
            await watch.wait_until(lambda models: any(models.values()), timeout=None)
            for records in watch.models.values():
                for record in records:
                    if self.config.model in ("", record.name):
                        return int(record.metadata["block_size"])
        finally:
            await watch.close()
        raise ServiceError(f"no worker serves model {self.config.model!r}")

    async def _consume(self, topic: str, event_type: type, apply: Callable[[Any], Any]) -> asyncio.Task[None]:
        subscription = await self.runtime.subscribe(topic, event_type)

        async def run() -> None:
            async for event in subscription:
                try:
                    apply(event)
                except Exception:
                    log.exception("applying a %s event failed", topic)

        return asyncio.create_task(run(), name=f"router-{topic}")

    def _share_placement(self, event: PlacementEvent) -> None:
        task = asyncio.get_running_loop().create_task(self.runtime.publish(PLACEMENT_TOPIC, event))
        self._publishes.add(task)
        task.add_done_callback(self._publishes.discard)

    def _on_worker_change(self, instance_id: str, record: InstanceRecord | None) -> None:
        if record is None and self._router is not None:
            self._router.remove_worker(instance_id)

    def _on_tunable(self, key: str, value: Any) -> None:
        if key != ROUTER_POLICY or self._router is None:
            return
        policy, knobs = (self.config.router, self.config.knobs) if value is None else (value["policy"], value.get("knobs"))
        try:
            self._router.set_policy(policy, knobs)
        except Exception:
            # A bad live value must not take routing down: keep the current policy.
            log.exception("router policy %r from etcd rejected; keeping %s", value, self._router.policy.name)
            return
        log.info("router policy now %s %s", policy, knobs or "")

    @endpoint(request=RouteRequest)
    async def route(self, request: RouteRequest) -> AsyncIterator[RouteDecision]:
        assert self._router is not None, "route() before start()"
        live = self.worker.generate.instance_ids()
        if not live:
            raise NoRoutableWorkerError("no VllmWorker is serving")
        yield self._router.route(request.request_id, request.token_ids, live)

    @on_shutdown
    async def stop(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        await self._tunables.close()
        for task in self._tasks:
            await cancel_and_wait(task)
