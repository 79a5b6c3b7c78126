"""The narrow interface between a router replica and the fleet it routes for.

A replica needs seven things from the fleet and gives it two: it hears the workers' KV
events and load reports, the other replicas' placements, which workers are live (of
which model, and when one comes or goes), the live routing policy, the block size the
workers' engines use, and on demand a worker's whole cache (app/router/kv_resync.py);
it publishes its own placements, and now and then a report of itself for operators.
`FleetFeed` is that interface, so that the replica (app/router/replica.py) knows nothing
of NATS, etcd or the runtime.

Implementations:
- `RuntimeFleetFeed` (app/router/runtime_feed.py): topics and discovery watches through
  the process's `Runtime`; what Router services and `embed-router` Frontends use.
- the unit tests' in-memory fleet (tests/unit/router/fleet.py).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Protocol

from app.protocol import KvEventBatch, LoadReport, PlacementEvent, RouterReport
from app.router.tunables import LivePolicy


class FleetListener(Protocol):
    """What a feed tells its replica, each as it happens (on the event loop, never concurrently)."""

    def on_kv_events(self, batch: KvEventBatch) -> None: ...

    def on_load_report(self, report: LoadReport) -> None: ...

    def on_placements(self, events: Sequence[PlacementEvent]) -> None:
        """Placements of any replica, this one's own echoes included (the replica skips those)."""

    def on_worker_up(self, worker_id: str) -> None:
        """A worker's record is there (it registered, came back, or changed): it is among
        `live_workers()`."""

    def on_worker_gone(self, worker_id: str) -> None:
        """A worker left (its lease went): it is no longer among `live_workers()`."""

    def on_policy(self, policy: LivePolicy) -> None:
        """The live policy changed (validated already), or went back to the configured one."""


class FleetFeed(abc.ABC):
    @abc.abstractmethod
    async def block_size(self) -> int:
        """The KV block size of the workers' engines; waits until a worker says."""

    @abc.abstractmethod
    async def follow(self, listener: FleetListener, configured_policy: LivePolicy) -> None:
        """From now until `close`, tell `listener` what happens in the fleet.

        `configured_policy` applies while no valid live policy is set; a live one that is
        set already reaches `listener.on_policy` before this returns.
        """

    @abc.abstractmethod
    def live_workers(self, model: str = "") -> Sequence[str]:
        """The workers a request for `model` may go to now: those whose model record names
        it ("": every live worker)."""

    @abc.abstractmethod
    async def kv_blocks(self, worker_id: str) -> list[KvEventBatch]:
        """Every block the worker caches, from the worker: a clear, then the blocks, all as
        of the seq of its last batch (app/engines/kv_mirror.py). Raises if it cannot answer."""

    @abc.abstractmethod
    async def publish_placements(self, events: list[PlacementEvent]) -> None:
        """Tell every replica (this one too) of these placements, as one message."""

    @abc.abstractmethod
    async def publish_report(self, report: RouterReport) -> None:
        """Tell whoever listens (`tandem status`) how this replica routes."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop following the fleet; the listener hears nothing more."""
