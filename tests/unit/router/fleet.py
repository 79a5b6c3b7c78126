"""An in-memory fleet for router replicas: the `FleetFeed` interface without NATS or etcd.

One `InMemoryFleet` is what the planes would carry: its live workers (and their models), their KV events and
load reports, the live policy. Each replica gets its own feed from `fleet.feed()`; what one
replica publishes reaches every feed of the fleet, its own too, as the placement topic
would deliver it (at once here, where NATS takes a round trip).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from app.protocol import BlockStored, EngineBlockHash, KvEventBatch, LoadReport, PlacementEvent, RouterReport
from app.router import FleetFeed, FleetListener
from app.router.tunables import LivePolicy


class InMemoryFleet:
    def __init__(self, workers: Sequence[str], block_size: int, models: Mapping[str, str] | None = None) -> None:
        """`models`: each worker's model, as its model record names it (unnamed: "tiny-llama")."""
        self.workers = list(workers)
        self.models = dict(models or {})
        self.block_size = block_size
        self.feeds: list[InMemoryFeed] = []
        self.published: list[PlacementEvent] = []

    def feed(self) -> InMemoryFeed:
        feed = InMemoryFeed(self)
        self.feeds.append(feed)
        return feed

    def _listeners(self) -> list[tuple[InMemoryFeed, FleetListener]]:
        return [(feed, feed.listener) for feed in self.feeds if feed.listener is not None]

    # --- what the workers and the operator do ------------------------------------------------

    def store(self, worker: str, token_ids: list[int], seq: int = 0) -> None:
        """`worker`'s engine cached these tokens' blocks (a whole number of them)."""
        # Only removals would use them.
        engine_hashes: list[EngineBlockHash] = list(range(len(token_ids) // self.block_size))
        batch = KvEventBatch(
            worker_id=worker,
            seq=seq,
            block_size=self.block_size,
            events=[BlockStored(token_ids=token_ids, block_hashes=engine_hashes)],
        )
        for _, listener in self._listeners():
            listener.on_kv_events(batch)

    def report_load(self, report: LoadReport) -> None:
        for _, listener in self._listeners():
            listener.on_load_report(report)

    def lose(self, worker: str) -> None:
        """`worker`'s lease went: its instance record with it."""
        self.workers.remove(worker)
        for _, listener in self._listeners():
            listener.on_worker_gone(worker)

    def set_policy(self, policy: LivePolicy | None) -> None:
        """`tandem router set` (None: `tandem router reset`, back to each replica's configured one)."""
        for feed, listener in self._listeners():
            listener.on_policy(policy or feed.configured_policy)

    def _deliver(self, events: list[PlacementEvent]) -> None:
        self.published.extend(events)
        for _, listener in self._listeners():
            listener.on_placements(events)


class InMemoryFeed(FleetFeed):
    def __init__(self, fleet: InMemoryFleet) -> None:
        self._fleet = fleet
        self.listener: FleetListener | None = None
        self.configured_policy = LivePolicy(policy="kv")
        self.reports: list[RouterReport] = []
        self.closed = False

    async def block_size(self) -> int:
        return self._fleet.block_size

    async def follow(self, listener: FleetListener, configured_policy: LivePolicy) -> None:
        self.listener = listener
        self.configured_policy = configured_policy

    def live_workers(self, model: str = "") -> Sequence[str]:
        models = self._fleet.models
        return [w for w in self._fleet.workers if not model or models.get(w, "tiny-llama") == model]

    async def publish_placements(self, events: list[PlacementEvent]) -> None:
        self._fleet._deliver(events)

    async def publish_report(self, report: RouterReport) -> None:
        self.reports.append(report)

    async def close(self) -> None:
        self.listener = None
        self.closed = True
