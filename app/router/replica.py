"""`RouterReplica`: one router replica, a `RoutingCore` kept current from the fleet.

The Router service runs one per process; a Frontend with `embed-router` runs one in its
own process and routes without a NATS round trip. Either way every replica builds the
whole KV index from the workers' events and shares its placements with the others, so
replicas neither miss cached prefixes nor pile onto one worker; what the events did not
tell it (it started late, lost some, forgot a worker) it asks the worker for
(app/router/kv_resync.py). What the replica hears and says goes through a `FleetFeed`
(app/router/feed.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from app.aio import cancel_and_wait
from app.errors import NoWorkerError
from app.metrics import serve_metrics
from app.protocol import (
    KV_HASH_SCHEME,
    KvEventBatch,
    LoadReport,
    PlacementEvent,
    RouteDecision,
    RouterReport,
    names,
)
from app.router.core import RoutingCore
from app.router.feed import FleetFeed
from app.router.kv_resync import KvResync
from app.router.metrics import RouterMetrics
from app.router.placements import PlacementPublisher
from app.router.tunables import LivePolicy

log = logging.getLogger(__name__)

# How long a starting replica waits for the workers' dumps of their caches (app/router/kv_resync.py).
_START_RESYNC_WAIT_S = 5.0


class RouterReplica:
    """Implements `FleetListener` for its feed; `route` and the placement hooks serve requests."""

    def __init__(
        self,
        feed: FleetFeed,
        *,
        policy: str,
        knobs: Mapping[str, Any] | None = None,
        block_size: int | None = None,
        model: str = "",
        replica_id: str,
        registry: CollectorRegistry | None = None,
        metrics_port: int | None = None,
        report_interval_s: float = 2.0,
        kv_silence_s: float = 60.0,
    ) -> None:
        """`block_size`: None takes the workers' (from the feed). `model`: the model whose
        workers' block size it takes ("": any's), said in its reports. `replica_id`: the source
        its placement events name (the process's instance id). `registry`: where its metrics
        go (the Frontend's, when embedded); they are also served on `metrics_port` if set.
        `report_interval_s`: how often it publishes its `RouterReport`. `kv_silence_s`: a
        worker running requests this long without KV events is reported (kv_health.py)."""
        self._feed = feed
        self._configured = LivePolicy(policy=policy, knobs=dict(knobs or {}))
        self._live_knobs = self._configured.knobs
        self._block_size = block_size
        self._model = model
        self._replica_id = replica_id
        self._metrics = RouterMetrics(registry)
        self._metrics_port = metrics_port
        self._metrics_server: Any = None
        self._core: RoutingCore | None = None
        self._kv_resync: KvResync | None = None
        self._report_interval_s = report_interval_s
        self._kv_silence_s = kv_silence_s
        self._reporting: asyncio.Task[None] | None = None
        # The workers whose records discovery lists: only their KV events and load reports
        # count. A late one from a worker that left would otherwise put it back in the index
        # and the load view, for good; a new worker's events that beat its record here are
        # in the dump of its cache that its registration brings (kv_resync.py).
        self._registered: set[str] = set()
        self._placements = PlacementPublisher(self._feed.publish_placements)

    @property
    def core(self) -> RoutingCore:
        """The index, load view and policy this replica routes with."""
        assert self._core is not None, "used before start()"
        return self._core

    async def start(self) -> None:
        block_size = self._block_size or await self._feed.block_size()
        self._core = RoutingCore(
            block_size,
            policy=self._configured.policy,
            knobs=self._configured.knobs,
            router_id=self._replica_id,
            on_placement=self._placements.publish,
            observe_decision_seconds=self._metrics.observe_decision,
            kv_silence_s=self._kv_silence_s,
        )
        self._metrics.core = self._core
        self._metrics_server = serve_metrics(self._metrics.registry, self._metrics_port)
        self._kv_resync = KvResync(self._core, self._feed.kv_blocks)
        self._metrics.kv_resync = self._kv_resync
        await self._feed.follow(self, self._configured)
        # Workers that cached before this replica started: what they hold comes from them,
        # before the replica takes requests (a worker slow to answer is waited for no longer).
        for worker_id in self._feed.live_workers():
            self._registered.add(worker_id)
            self._kv_resync.resync(worker_id, "start")
        await self._kv_resync.settled(timeout=_START_RESYNC_WAIT_S)
        self._reporting = asyncio.create_task(self._report_periodically(), name="router-report")
        log.info("routing with policy %s, block size %d", self._core.policy.name, block_size)

    def report(self) -> RouterReport:
        """How this replica routes now: its policy, counters and the workers it cannot see."""
        core = self.core
        counters = core.counters
        resync = self._kv_resync
        assert resync is not None
        return RouterReport(
            router_id=self._replica_id,
            policy=core.policy.name,
            knobs=dict(self._live_knobs),
            decisions=counters.decisions,
            prompt_blocks=counters.prompt_blocks,
            hit_blocks=counters.hit_blocks,
            rejected_kv_batches=counters.rejected_batches,
            indexed_blocks=core.index.num_blocks(),
            kv_silent_workers=sorted(core.kv_health.silent),
            kv_rejected_workers=sorted(core.kv_health.rejected),
            timestamp=time.time(),
            block_size=core.block_size,
            hash_scheme=KV_HASH_SCHEME,
            model=self._model,
            kv_resyncs={reason: count for reason, count in resync.resyncs.items()},
            kv_resync_failures={reason: count for reason, count in resync.failures.items()},
        )

    async def _report_periodically(self) -> None:
        while True:
            try:
                await self._feed.publish_report(self.report())
            except Exception:
                log.exception("publishing the router report failed")
            await asyncio.sleep(self._report_interval_s)

    async def close(self) -> None:
        await cancel_and_wait(self._reporting)
        await self._placements.close()  # the last window's events (requests' ends) still go out
        if self._kv_resync is not None:
            await self._kv_resync.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        await self._feed.close()

    # --- requests -------------------------------------------------------------------------

    def live_workers(self, model: str = "") -> Sequence[str]:
        return self._feed.live_workers(model)

    def route(
        self, request_id: str, token_ids: Sequence[int], exclude: Sequence[str] = (), model: str = ""
    ) -> RouteDecision:
        """The worker for a request, accounted as placed; NoWorkerError if none is live.

        `exclude`: workers that failed this request before its first token. `model`: the
        request's; only its workers are candidates ("": any worker).
        """
        live = [worker for worker in self._feed.live_workers(model) if worker not in exclude]
        if not live:
            of_model = f" model `{model}`" if model else ""
            but = " but the ones that failed this request" if exclude else ""
            raise NoWorkerError(f"no {names.VLLM_WORKER} is serving{of_model}{but}")
        return self.core.route(request_id, token_ids, live)

    def on_prefill_done(self, request_id: str) -> None:
        """The request's first token came back: its prompt is in the worker's KV now."""
        self.core.on_prefill_done(request_id)

    def on_finished(self, request_id: str) -> None:
        self.core.on_finished(request_id)

    # --- FleetListener --------------------------------------------------------------------

    def on_kv_events(self, batch: KvEventBatch) -> None:
        assert self._kv_resync is not None
        if batch.worker_id not in self._registered:
            self.core.counters.stray_events += 1
            return
        self._kv_resync.on_batch(batch)

    def on_load_report(self, report: LoadReport) -> None:
        if report.worker_id not in self._registered:
            self.core.counters.stray_events += 1
            return
        self.core.apply_load_report(report)

    def on_placements(self, events: Sequence[PlacementEvent]) -> None:
        for event in events:
            self.core.apply_placement(event)

    def on_worker_up(self, worker_id: str) -> None:
        assert self._kv_resync is not None
        self._registered.add(worker_id)
        self._kv_resync.on_worker_up(worker_id)

    def on_worker_gone(self, worker_id: str) -> None:
        self._registered.discard(worker_id)
        self.core.remove_worker(worker_id)
        assert self._kv_resync is not None
        self._kv_resync.on_worker_gone(worker_id)

    def on_policy(self, policy: LivePolicy) -> None:
        self.core.set_policy(policy.policy, policy.knobs)
        self._live_knobs = dict(policy.knobs)
