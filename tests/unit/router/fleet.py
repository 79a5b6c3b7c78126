"""An in-memory fleet for router replicas: the `FleetFeed` interface without NATS or etcd.

One `InMemoryFleet` is what the planes would carry: its live workers (and their models), their KV events and
load reports, the live policy, and what each worker's `kv_blocks` would answer (its host's mirror of
the events it published, app/engines/kv_mirror.py). Each replica gets its own feed from `fleet.feed()`; what one
replica publishes reaches every feed of the fleet, its own too, as the placement topic
would deliver it (at once here, where NATS takes a round trip).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from app.engines.kv_mirror import KvMirror
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
        self.mirrors: dict[str, KvMirror] = {}
        # While cleared, a `kv_blocks` answer is on its way (taken, not delivered); set by default.
        self.answering = asyncio.Event()
        self.answering.set()
        self.kv_blocks_calls: list[str] = []
        self.without_kv_blocks: set[str] = set()  # workers of a build that has no `kv_blocks`

    def feed(self) -> InMemoryFeed:
        feed = InMemoryFeed(self)
        self.feeds.append(feed)
        return feed

    def _listeners(self) -> list[tuple[InMemoryFeed, FleetListener]]:
        return [(feed, feed.listener) for feed in self.feeds if feed.listener is not None]

    # --- what the workers and the operator do ------------------------------------------------

    def store(self, worker: str, token_ids: list[int], seq: int | None = None) -> KvEventBatch:
        """`worker`'s engine cached these tokens' blocks (a whole number of them), its next
        batch unless `seq` says; each of its stores names its own engine hashes."""
        mirror = self._mirror(worker)
        first = len(mirror)
        engine_hashes: list[EngineBlockHash] = list(range(first, first + len(token_ids) // self.block_size))
        batch = KvEventBatch(
            worker_id=worker,
            seq=mirror.last_seq + 1 if seq is None else seq,
            block_size=self.block_size,
            events=[BlockStored(token_ids=token_ids, block_hashes=engine_hashes)],
        )
        self.publish(batch)
        return batch

    def publish(self, batch: KvEventBatch, delivered: bool = True) -> None:
        """`batch.worker_id`'s host publishes `batch` (into its mirror first); `delivered`
        False: the batch is lost on the way to every replica."""
        self._mirror(batch.worker_id).apply(batch)
        if delivered:
            for _, listener in self._listeners():
                listener.on_kv_events(batch)

    def join(self, worker: str) -> None:
        """`worker` registers (or registers again after its lease went)."""
        if worker not in self.workers:
            self.workers.append(worker)
        for _, listener in self._listeners():
            listener.on_worker_up(worker)

    def _mirror(self, worker: str) -> KvMirror:
        mirror = self.mirrors.get(worker)
        if mirror is None:
            mirror = self.mirrors[worker] = KvMirror(worker, self.block_size)
        return mirror

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

    async def kv_blocks(self, worker_id: str) -> list[KvEventBatch]:
        self._fleet.kv_blocks_calls.append(worker_id)
        if worker_id not in self._fleet.workers or worker_id in self._fleet.without_kv_blocks:
            raise LookupError(f"worker {worker_id} does not serve kv_blocks")
        dump = self._fleet._mirror(worker_id).dump()
        await self._fleet.answering.wait()
        return dump

    async def publish_placements(self, events: list[PlacementEvent]) -> None:
        self._fleet._deliver(events)

    async def publish_report(self, report: RouterReport) -> None:
        self.reports.append(report)

    async def close(self) -> None:
        self.listener = None
        self.closed = True
