"""Per-worker load: what workers report, plus what the routers placed since.

Workers publish a `LoadReport` every so often; between two reports a burst of requests
would all see the same stale numbers and pile onto one worker. So the router also
counts the requests it placed itself (`on_routed` ... `on_prefill_done` ... `on_finished`)
and blends both: active requests are the larger of the reported and the tracked
count, and KV usage adds the blocks the placed-but-not-yet-prefilled requests will take.

Several router replicas share their placements: every local call returns a
`PlacementEvent` for the caller to publish, and `apply_remote` applies another
replica's (its own, echoed back by the bus, are ignored).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from app.logs import Throttled
from app.protocol import LoadReport, PlacementEvent, PlacementKind

log = logging.getLogger(__name__)
# A router replica that crashed leaves every placement it made to expire: one line for them.
_expired_log = Throttled(log)


@dataclass(slots=True, frozen=True)
class WorkerLoad:
    """The load view a policy sees for one worker."""

    active_requests: int = 0
    pending_prefill_blocks: int = 0  # uncached prompt blocks of placed requests not yet prefilled
    kv_usage: float = 0.0  # 0..1, reported usage plus what pending prefills will take
    waiting: int = 0  # the worker's reported queue
    kv_total_blocks: int = 0


@dataclass(slots=True)
class _Placed:
    worker_id: str
    new_blocks: int
    prefilling: bool
    placed_at: float


@dataclass(slots=True)
class _Tracked:
    active: int = 0
    pending_prefill_blocks: int = 0


class LoadTracker:
    """Blends LoadReports with the placements of this and the other router replicas."""

    def __init__(
        self,
        router_id: str,
        request_ttl_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router_id = router_id
        # A placement whose `finished` never arrives (its router crashed) stops counting
        # after this long, so lost events can't mark a worker busy forever.
        self.request_ttl_s = request_ttl_s
        self._clock = clock
        self._reports: dict[str, LoadReport] = {}
        self._placed: OrderedDict[str, _Placed] = OrderedDict()  # in placement order
        self._tracked: dict[str, _Tracked] = {}
        self.expired_requests = 0

    # --- inputs ---------------------------------------------------------------

    def apply_report(self, report: LoadReport) -> None:
        self._reports[report.worker_id] = report

    def on_routed(self, request_id: str, worker_id: str, prompt_blocks: int, overlap_blocks: int) -> PlacementEvent:
        event = PlacementEvent(
            router_id=self.router_id,
            request_id=request_id,
            worker_id=worker_id,
            kind="routed",
            prompt_blocks=prompt_blocks,
            overlap_blocks=overlap_blocks,
        )
        self._apply(event)
        return event

    def on_prefill_done(self, request_id: str) -> PlacementEvent | None:
        """The request's first token came back: its prompt is now in the worker's KV."""
        return self._local(request_id, "prefill_done")

    def on_finished(self, request_id: str) -> PlacementEvent | None:
        return self._local(request_id, "finished")

    def apply_remote(self, event: PlacementEvent) -> None:
        if event.router_id != self.router_id:
            self._apply(event)

    def remove_worker(self, worker_id: str) -> None:
        self._reports.pop(worker_id, None)
        self._tracked.pop(worker_id, None)
        for request_id in [rid for rid, placed in self._placed.items() if placed.worker_id == worker_id]:
            del self._placed[request_id]

    def _local(self, request_id: str, kind: PlacementKind) -> PlacementEvent | None:
        placed = self._placed.get(request_id)
        if placed is None:
            return None
        event = PlacementEvent(router_id=self.router_id, request_id=request_id, worker_id=placed.worker_id, kind=kind)
        self._apply(event)
        return event

    def _apply(self, event: PlacementEvent) -> None:
        self._expire()
        if event.kind == "routed":
            if event.request_id in self._placed:
                return  # a replayed placement must not count twice
            new_blocks = max(0, event.prompt_blocks - event.overlap_blocks)
            self._placed[event.request_id] = _Placed(event.worker_id, new_blocks, True, self._clock())
            tracked = self._tracked.setdefault(event.worker_id, _Tracked())
            tracked.active += 1
            tracked.pending_prefill_blocks += new_blocks
            return
        placed = self._placed.get(event.request_id)
        if placed is None:
            return  # finished before we saw it placed, or already expired
        if event.kind == "prefill_done":
            self._end_prefill(placed)
        else:
            self._forget(event.request_id, placed)

    def _end_prefill(self, placed: _Placed) -> None:
        if placed.prefilling:
            placed.prefilling = False
            self._tracked[placed.worker_id].pending_prefill_blocks -= placed.new_blocks

    def _forget(self, request_id: str, placed: _Placed) -> None:
        self._end_prefill(placed)
        del self._placed[request_id]
        self._tracked[placed.worker_id].active -= 1

    def _expire(self) -> None:
        horizon = self._clock() - self.request_ttl_s
        while self._placed:
            request_id, placed = next(iter(self._placed.items()))
            if placed.placed_at > horizon:
                return
            self.expired_requests += 1
            _expired_log.log(
                "placement of request %s on worker %s expired without a finish", request_id, placed.worker_id
            )
            self._forget(request_id, placed)

    # --- the view -------------------------------------------------------------

    def view(self, worker_id: str) -> WorkerLoad:
        tracked = self._tracked.get(worker_id) or _Tracked()
        report = self._reports.get(worker_id)
        if report is None:
            return WorkerLoad(active_requests=tracked.active, pending_prefill_blocks=tracked.pending_prefill_blocks)
        kv_usage = 0.0
        if report.kv_total_blocks > 0:
            used = report.kv_used_blocks + tracked.pending_prefill_blocks
            kv_usage = min(1.0, used / report.kv_total_blocks)
        return WorkerLoad(
            active_requests=max(tracked.active, report.running + report.waiting),
            pending_prefill_blocks=tracked.pending_prefill_blocks,
            kv_usage=kv_usage,
            waiting=report.waiting,
            kv_total_blocks=report.kv_total_blocks,
        )

    def views(self, worker_ids: Iterable[str]) -> dict[str, WorkerLoad]:
        self._expire()
        return {worker_id: self.view(worker_id) for worker_id in worker_ids}

    def placed_worker(self, request_id: str) -> str | None:
        placed = self._placed.get(request_id)
        return None if placed is None else placed.worker_id
