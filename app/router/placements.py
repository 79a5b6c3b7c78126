"""`PlacementPublisher`: a router replica's (or a Processor's) placement events, those of one
turn of the event loop sent as one message.

Every router replica applies every placement event, so each message costs every replica
a delivery; a busy process makes several events per turn (one request's first token and
its end often arrive in one frame, other requests' alongside).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from app.protocol import PlacementEvent

log = logging.getLogger(__name__)

SendPlacements = Callable[[list[PlacementEvent]], Awaitable[None]]


class PlacementPublisher:
    def __init__(self, send: SendPlacements) -> None:
        """`send`: puts one message of events on the placement topic (a replica's
        `FleetFeed.publish_placements`; a Processor's runtime.publish)."""
        self._send = send
        self._pending: list[PlacementEvent] = []
        self._sends: set[asyncio.Task[None]] = set()

    def publish(self, event: PlacementEvent) -> None:
        if not self._pending:
            # A task runs after the current turn's callbacks: by then the turn's events are in.
            task = asyncio.get_running_loop().create_task(self._flush())
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)
        self._pending.append(event)

    async def _flush(self) -> None:
        events, self._pending = self._pending, []
        try:
            await self._send(events)
        except Exception:
            log.exception("publishing %d placement events failed", len(events))
