"""`RoutingCore`: the KV index, the load view and a policy behind one call per request.

It only decides which worker a request should go to; it does not send it there. A router
replica (app/router/replica.py) owns one: it feeds it the KV event batches, load reports
and other replicas' placement events of the fleet, and asks `route()` for each request.
Nothing here touches NATS: the placement events the core makes go to `on_placement` for
the replica to publish.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app.errors import NoWorkerError
from app.protocol import KvEventBatch, LoadReport, PlacementEvent, RouteDecision
from app.router.hashing import block_hashes
from app.router.index import BlockSizeMismatchError, KvIndex
from app.router.kv_health import KvFeedHealth
from app.router.load import LoadTracker
from app.router.policies import RoutingContext, RoutingPolicy, create_policy

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RoutingCounters:
    decisions: int = 0
    prompt_blocks: int = 0
    hit_blocks: int = 0  # prompt blocks the chosen worker already held
    rejected_batches: int = 0
    stray_events: int = 0  # KV batches and load reports of workers not registered: dropped (replica.py)

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.prompt_blocks if self.prompt_blocks else 0.0


class RoutingCore:
    def __init__(
        self,
        block_size: int,
        policy: str = "kv",
        knobs: Mapping[str, Any] | None = None,
        *,
        router_id: str = "router",  # the source named in its placement events
        on_placement: Callable[[PlacementEvent], None] | None = None,
        observe_decision_seconds: Callable[[float], None] | None = None,
        request_ttl_s: float = 600.0,
        kv_silence_s: float = 60.0,
    ) -> None:
        """`kv_silence_s`: a worker running requests this long without KV events is reported
        (app/router/kv_health.py)."""
        self.block_size = block_size
        # The index is kept up to date whatever the policy, so that switching to a
        # KV-aware policy at run time starts warm.
        self.index = KvIndex(block_size)
        self.load = LoadTracker(router_id, request_ttl_s=request_ttl_s)
        self.policy: RoutingPolicy = create_policy(policy, knobs)
        self.counters = RoutingCounters()
        self.last_decision_seconds = 0.0
        self._on_placement = on_placement
        self._observe_decision_seconds = observe_decision_seconds
        self.kv_health = KvFeedHealth(kv_silence_s)

    def set_policy(self, policy: str, knobs: Mapping[str, Any] | None = None) -> None:
        """Switch policy (e.g. a live tunable changed); raises PolicyConfigError."""
        self.policy = create_policy(policy, knobs)

    # --- per request ----------------------------------------------------------

    def route(self, request_id: str, token_ids: Sequence[int], live_workers: Iterable[str]) -> RouteDecision:
        """Pick a worker for the request and account for it; NoWorkerError if none is live."""
        started = time.perf_counter()
        workers = sorted(live_workers)
        if not workers:
            raise NoWorkerError(f"no live worker to route request {request_id} to")
        hashes = block_hashes(token_ids, self.block_size)
        overlaps: dict[str, int] = {}
        if self.policy.needs_kv_index:
            live = set(workers)
            overlaps = {w: n for w, n in self.index.find_matches(hashes).items() if w in live}
        ctx = RoutingContext(
            request_id=request_id,
            block_hashes=hashes,
            overlaps=overlaps,
            load=self.load.views(workers),
            workers=workers,
        )
        decision = self.policy.select_worker(ctx)
        self.counters.decisions += 1
        self.counters.prompt_blocks += decision.prompt_blocks
        self.counters.hit_blocks += decision.overlap_blocks
        self._publish(
            self.load.on_routed(request_id, decision.worker_id, decision.prompt_blocks, decision.overlap_blocks)
        )
        elapsed = time.perf_counter() - started
        self.last_decision_seconds = elapsed
        if self._observe_decision_seconds is not None:
            self._observe_decision_seconds(elapsed)
        log.debug(
            "request %s -> worker %s (overlap %d/%d blocks, %.0f us)",
            request_id,
            decision.worker_id,
            decision.overlap_blocks,
            decision.prompt_blocks,
            elapsed * 1e6,
        )
        return decision

    def on_prefill_done(self, request_id: str) -> None:
        self._publish(self.load.on_prefill_done(request_id))

    def on_finished(self, request_id: str) -> None:
        worker_id = self.load.placed_worker(request_id)
        self._publish(self.load.on_finished(request_id))
        if worker_id is not None:
            self.policy.on_request_finished(request_id, worker_id)

    def _publish(self, event: PlacementEvent | None) -> None:
        if event is not None and self._on_placement is not None:
            self._on_placement(event)

    # --- fleet state ----------------------------------------------------------

    def apply_kv_batch(self, batch: KvEventBatch) -> bool:
        """Apply a worker's KV events; False (counted, logged once per worker) if rejected."""
        try:
            self.index.apply_batch(batch)
        except BlockSizeMismatchError as exc:
            self.counters.rejected_batches += 1
            self.kv_health.on_batch(batch.worker_id, rejected_because=str(exc))
            return False
        self.kv_health.on_batch(batch.worker_id)
        return True

    def apply_kv_dump(self, worker_id: str, dump: Sequence[KvEventBatch]) -> bool:
        """Replace a worker's blocks by a dump of its cache (app/router/kv_resync.py); False
        (counted) if rejected."""
        try:
            self.index.replace_worker(worker_id, dump)
        except BlockSizeMismatchError as exc:
            self.counters.rejected_batches += 1
            self.kv_health.on_batch(worker_id, rejected_because=str(exc))
            return False
        return True

    def apply_load_report(self, report: LoadReport) -> None:
        self.load.apply_report(report)
        self.kv_health.on_load(report.worker_id, report.running)

    def apply_placement(self, event: PlacementEvent) -> None:
        """Another router replica's placement (our own echoes are ignored)."""
        self.load.apply_remote(event)

    def remove_worker(self, worker_id: str) -> None:
        self.index.remove_worker(worker_id)
        self.load.remove_worker(worker_id)
        self.kv_health.remove_worker(worker_id)

    @property
    def seq_gaps(self) -> int:
        return self.index.seq_gaps

    @property
    def orphan_blocks(self) -> int:
        return self.index.orphan_blocks
