"""Router: picks the worker for a request (KV overlap, load, or a simple policy)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field

from app.components.metrics import serve_metrics
from app.components.routing import RouterPolicyName
from app.components.worker import VllmWorker
from app.protocol import KvEventBatch, LoadReport, RouteDecision, RouteRequest
from app.router import KvRouter, PlacementEvent
from app.router.metrics import RouterMetrics
from app.runtime import EventSubscription, InstanceRecord, Runtime, ServiceError
from app.runtime.requests import EndpointClient
from app.sdk import ServiceContext, depends, endpoint, on_shutdown, on_start, service
from app.tunables import ROUTER_POLICY

log = logging.getLogger(__name__)

# Topic on which routers and processors share placement accounting (app.router.load).
# A message is a list of PlacementEvents (a lone PlacementEvent is still understood).
PLACEMENT_TOPIC = "placement"
PlacementMessage = PlacementEvent | list[PlacementEvent]


class PlacementPublisher:
    """Publishes placement events, those of one turn of the event loop in one message.

    Every router replica applies every event, so each message costs every replica a
    NATS delivery; a busy Processor makes several events per turn (one request's first
    token and its end often arrive in one frame, other requests' alongside).
    """

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._pending: list[PlacementEvent] = []
        self._publishes: set[asyncio.Task[None]] = set()

    def publish(self, event: PlacementEvent) -> None:
        if not self._pending:
            # A task runs after the current turn's callbacks: by then the turn's events are in.
            task = asyncio.get_running_loop().create_task(self._flush())
            self._publishes.add(task)
            task.add_done_callback(self._publishes.discard)
        self._pending.append(event)

    async def _flush(self) -> None:
        events, self._pending = self._pending, []
        try:
            await self._runtime.publish(PLACEMENT_TOPIC, events)
        except Exception:
            log.exception("publishing %d placement events failed", len(events))


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


class FleetRouter:
    """One router replica's state, kept current from the fleet: a KvRouter fed the workers'
    KV events and load reports and the other replicas' placements, dropping a worker whose
    instance record goes, following the live policy tunable in etcd.

    The Router service runs one per process; a Frontend with `embed-router` runs one in
    its own process and routes without a NATS round trip. Either way every replica builds
    the whole index and shares its placements on the placement topic.
    """

    def __init__(
        self,
        runtime: Runtime,
        config: RouterConfig,
        workers: EndpointClient,
        replica: int = 0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """`registry`: where the router's metrics go (the Frontend's, when embedded); they are
        also served on the section's `metrics-port` + `replica` if one is set."""
        self._runtime = runtime
        self._config = config
        self._workers = workers  # the worker endpoint's client: which workers are live
        self._replica = replica
        self._registry = registry
        self._router: KvRouter | None = None
        self._subscriptions: list[EventSubscription[Any]] = []
        self._metrics_server: Any = None
        self._tunables: Any = None

    @property
    def router(self) -> KvRouter:
        assert self._router is not None, "used before start()"
        return self._router

    async def start(self) -> None:
        block_size = self._config.block_size or await self._block_size_from_models()
        metrics = RouterMetrics(self._registry)
        self._router = KvRouter(
            block_size,
            policy=self._config.router,
            knobs=self._config.knobs,
            router_id=self._runtime.instance_id,
            on_placement=PlacementPublisher(self._runtime).publish,
            observe_decision_seconds=metrics.observe_decision,
        )
        metrics.router = self._router
        self._metrics_server = serve_metrics(metrics.registry, self._config.metrics_port, self._replica)
        router = self._router
        # Callbacks, not consumer tasks: every replica gets every event of the fleet, and
        # a task hop per event was a good part of a Router's CPU per request.
        self._subscriptions = [
            await self._runtime.subscribe("kv", KvEventBatch, on_event=router.apply_kv_batch),
            await self._runtime.subscribe("load", LoadReport, on_event=router.apply_load_report),
            await self._runtime.subscribe(PLACEMENT_TOPIC, PlacementMessage, on_event=self._apply_placements),
        ]
        workers = await self._runtime.discovery.watch_instances(VllmWorker.__name__, "generate")
        workers.add_listener(self._on_worker_change)
        await self._workers.watch()
        self._tunables = await self._runtime.discovery.watch_tunables()
        self._tunables.add_listener(self._on_tunable)
        if ROUTER_POLICY in self._tunables.values:
            self._on_tunable(ROUTER_POLICY, self._tunables.values[ROUTER_POLICY])
        log.info("routing with policy %s, block size %d", self._config.router, block_size)

    def live_workers(self) -> list[str]:
        return self._workers.instance_ids()

    def route(self, request_id: str, token_ids: list[int]) -> RouteDecision:
        """The worker for a request, accounted as placed; NoRoutableWorkerError if none is live."""
        live = self.live_workers()
        if not live:
            raise NoRoutableWorkerError("no VllmWorker is serving")
        return self.router.route(request_id, token_ids, live)

    async def close(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self._tunables is not None:
            await self._tunables.close()
        for subscription in self._subscriptions:
            await subscription.close()

    async def _block_size_from_models(self) -> int:
        watch = await self._runtime.discovery.watch_models()
        try:
            await watch.wait_until(lambda models: any(models.values()), timeout=None)
            for records in watch.models.values():
                for record in records:
                    if self._config.model in ("", record.name):
                        return int(record.metadata["block_size"])
        finally:
            await watch.close()
        raise ServiceError(f"no worker serves model {self._config.model!r}")

    def _apply_placements(self, message: PlacementEvent | list[PlacementEvent]) -> None:
        for event in message if isinstance(message, list) else (message,):
            self.router.apply_placement(event)

    def _on_worker_change(self, instance_id: str, record: InstanceRecord | None) -> None:
        if record is None and self._router is not None:
            self._router.remove_worker(instance_id)

    def _on_tunable(self, key: str, value: Any) -> None:
        if key != ROUTER_POLICY or self._router is None:
            return
        policy, knobs = (self._config.router, self._config.knobs) if value is None else (value["policy"], value.get("knobs"))
        try:
            self._router.set_policy(policy, knobs)
        except Exception:
            # A bad live value must not take routing down: keep the current policy.
            log.exception("router policy %r from etcd rejected; keeping %s", value, self._router.policy.name)
            return
        log.info("router policy now %s %s", policy, knobs or "")


@service(config=RouterConfig)
class Router:
    """Each replica builds the whole KV index from the event stream and shares its
    placements, so replicas neither miss cached prefixes nor pile onto one worker."""

    config: RouterConfig
    runtime: Runtime
    ctx: ServiceContext
    worker = depends(VllmWorker)

    def __init__(self) -> None:
        self._fleet = FleetRouter(self.runtime, self.config, self.worker.generate, self.ctx.replica)

    @on_start
    async def start(self) -> None:
        await self._fleet.start()

    @endpoint(request=RouteRequest)
    async def route(self, request: RouteRequest) -> AsyncIterator[RouteDecision]:
        yield self._fleet.route(request.request_id, request.token_ids)

    @on_shutdown
    async def stop(self) -> None:
        await self._fleet.close()
