"""`RuntimeFleetFeed`: a router replica's `FleetFeed` over the process's `Runtime`.

KV events, load reports and placements arrive on their topics (app/protocol/names.py);
which workers are live comes from the workers' endpoint client, whose one etcd watch
also tells when a worker goes; which model each serves, from one watch of the model
records (kept for the feed's life: a request's candidates are a set lookup, not an etcd
read); the live policy is the `router/policy` tunable; the block size is the workers'
model records'. A worker's whole cache comes from its `kv_blocks` endpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.protocol import (
    InstanceRecord,
    KvBlocksWanted,
    KvEventBatch,
    LoadReport,
    ModelRecord,
    PlacementEvent,
    PlacementMessage,
    RouterReport,
    names,
)
from app.router.feed import FleetFeed, FleetListener
from app.router.tunables import ROUTER_POLICY, LivePolicy
from app.runtime import EndpointClient, EventSubscription, Runtime
from app.runtime.discovery import ModelsWatch
from app.tunables import LiveTunables

# A worker streams its whole cache at NATS speed (90k blocks of 16 tokens: 7.5 MB in 88 batches).
_KV_BLOCKS_TIMEOUT_S = 30.0


class RuntimeFleetFeed(FleetFeed):
    def __init__(self, runtime: Runtime, workers: EndpointClient, model: str = "") -> None:
        """`workers`: the client of the workers' `generate` endpoint, shared with whoever
        streams from them in this process. `model`: take the block size of this model's
        workers ("": any worker's)."""
        self._runtime = runtime
        self._workers = workers
        self._model = model
        self._listener: FleetListener | None = None
        self._subscriptions: list[EventSubscription[Any]] = []
        self._live_policy: LiveTunables | None = None
        self._models: ModelsWatch | None = None

    async def _models_watch(self) -> ModelsWatch:
        if self._models is None:
            self._models = await self._runtime.discovery.watch_models()
        return self._models

    async def block_size(self) -> int:
        watch = await self._models_watch()
        await watch.wait_until(lambda models: self._record(models) is not None, timeout=None)
        record = self._record(watch.models)
        assert record is not None
        return int(record.metadata["block_size"])

    def _record(self, models: dict[str, list[ModelRecord]]) -> ModelRecord | None:
        """A record of the configured model. Configs pass it the Common section's `model`, a
        path or a hub id, while records are named by the served name: either matches."""
        for name, records in models.items():
            for record in records:
                if self._model in ("", name) or self._model == record.metadata.get("model_path"):
                    return record
        return None

    async def follow(self, listener: FleetListener, configured_policy: LivePolicy) -> None:
        self._listener = listener
        # Callbacks, not consumer tasks: every replica gets every event of the fleet, and
        # a task hop per event was a good part of a Router's CPU per request.
        self._subscriptions = [
            await self._runtime.subscribe(names.KV_EVENTS_TOPIC, KvEventBatch, on_event=listener.on_kv_events),
            await self._runtime.subscribe(names.LOAD_TOPIC, LoadReport, on_event=listener.on_load_report),
            await self._runtime.subscribe(names.PLACEMENT_TOPIC, PlacementMessage, on_event=self._on_placements),
        ]
        await self._models_watch()
        await self._workers.watch(on_change=self._on_worker_change)
        self._live_policy = LiveTunables(
            {ROUTER_POLICY: configured_policy}, on_change=lambda _tunable, value: listener.on_policy(value)
        )
        await self._live_policy.start(self._runtime.discovery)

    def live_workers(self, model: str = "") -> Sequence[str]:
        assert self._models is not None, "live_workers before follow()"
        return self._models.serving(model, self._workers.instance_ids())

    async def kv_blocks(self, worker_id: str) -> list[KvEventBatch]:
        client = self._runtime.client(names.VLLM_WORKER, names.KV_BLOCKS)
        wanted = KvBlocksWanted(router_id=self._runtime.instance_id)
        stream = client.stream(wanted, target=worker_id, timeout=_KV_BLOCKS_TIMEOUT_S, response_type=KvEventBatch)
        return [batch async for batch in stream]

    async def publish_placements(self, events: list[PlacementEvent]) -> None:
        await self._runtime.publish(names.PLACEMENT_TOPIC, events)

    async def publish_report(self, report: RouterReport) -> None:
        await self._runtime.publish(names.ROUTER_REPORT_TOPIC, report)

    async def close(self) -> None:
        # The workers' client (and its watch) outlives this feed; its listener stays, idle.
        self._listener = None
        if self._live_policy is not None:
            await self._live_policy.close()
        for subscription in self._subscriptions:
            await subscription.close()
        if self._models is not None:
            await self._models.close()

    def _on_placements(self, message: PlacementEvent | list[PlacementEvent]) -> None:
        if self._listener is not None:
            self._listener.on_placements(message if isinstance(message, list) else (message,))

    def _on_worker_change(self, worker_id: str, record: InstanceRecord | None) -> None:
        if self._listener is None:
            return
        if record is None:
            self._listener.on_worker_gone(worker_id)
        else:
            self._listener.on_worker_up(worker_id)
