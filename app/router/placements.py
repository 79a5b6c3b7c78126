"""`PlacementPublisher`: a router replica's (or a Processor's) placement events, those of a
short window sent as one message.

Every router replica applies every placement event, so each message costs every replica
a delivery, and a message per event loop turn still meant about one per request under
load. Placements are a load hint the replicas share: one that hears of another's request
10 ms late routes as well as one that heard at once (a request lives far longer than that,
and the load reports correct the view every second). So the first event of a message
arms a flush PLACEMENT_WINDOW_S later, and the events that come meanwhile join it: at high
request rates one message carries many events, at low rates an event waits 10 ms at most.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from app.protocol import PlacementEvent

log = logging.getLogger(__name__)

SendPlacements = Callable[[list[PlacementEvent]], Awaitable[None]]

# How long the first event of a message waits for others to join it.
PLACEMENT_WINDOW_S = 0.01


class PlacementPublisher:
    def __init__(self, send: SendPlacements, window_s: float = PLACEMENT_WINDOW_S) -> None:
        """`send`: puts one message of events on the placement topic (a replica's
        `FleetFeed.publish_placements`; a Processor's runtime.publish)."""
        self._send = send
        self._window_s = window_s
        self._pending: list[PlacementEvent] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sends: set[asyncio.Task[None]] = set()

    def publish(self, event: PlacementEvent) -> None:
        if not self._pending:
            self._timer = asyncio.get_running_loop().call_later(self._window_s, self.flush)
        self._pending.append(event)

    def flush(self) -> None:
        """Send the pending events now, as one message (the window's timer calls it)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        events, self._pending = self._pending, []
        # Sends start in the order of their flushes (tasks start in FIFO order), and each
        # connection keeps the order of its publishes: a request's events stay in order.
        task = asyncio.get_running_loop().create_task(self._send_logged(events))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def close(self) -> None:
        """Send what is pending and wait for the sends on the way: an owner that stops
        should call it, or the last window's events (a request's end) never reach the
        other replicas."""
        self.flush()
        if self._sends:
            await asyncio.gather(*self._sends, return_exceptions=True)

    async def _send_logged(self, events: list[PlacementEvent]) -> None:
        try:
            await self._send(events)
        except Exception:
            log.exception("publishing %d placement events failed", len(events))
