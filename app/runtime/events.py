"""Events plane: typed fire-and-forget pub/sub on NATS core (subjects: app/protocol/names.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from app.logs import Throttled
from app.runtime.connect import confirm_subscriptions
from app.runtime.wire import decoder_for

log = logging.getLogger(__name__)
# Events come by the thousand a second (KV events, load reports): a publisher of another
# version, or a handler's bug, fails each of them. One line per kind for them all.
_undecodable_log = Throttled(log)
_handler_failed_log = Throttled(log, logging.ERROR)

T = TypeVar("T")

_CLOSED = object()


class EventSubscription(Generic[T]):
    """Async iterator of decoded events; an undecodable event is logged and skipped.

    With `on_event`, each event goes to that callback as it arrives instead: no queue and
    no consumer task in between, the cheaper way for a busy topic. A callback that raises
    is logged; the next event still comes.
    """

    def __init__(
        self, nc: NatsClient, subject: str, event_type: Any = None, on_event: Callable[[T], Any] | None = None
    ) -> None:
        self.subject = subject
        self._nc = nc
        self._decoder = decoder_for(event_type)
        self._on_event = on_event
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self.subject, cb=self._on_msg)
        await confirm_subscriptions(self._nc)

    async def _on_msg(self, msg: Msg) -> None:
        if self._on_event is None:
            self._queue.put_nowait(msg.data)
            return
        try:
            event = self._decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            _undecodable_log.log("event on %s undecodable, skipped: %s", self.subject, exc)
            return
        try:
            self._on_event(event)
        except Exception:
            _handler_failed_log.log("handling an event on %s failed", self.subject, exc_info=True)

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(NatsError):
                await self._sub.unsubscribe()
            self._sub = None
            self._queue.put_nowait(_CLOSED)

    def __aiter__(self) -> EventSubscription[T]:
        return self

    async def __anext__(self) -> T:
        while True:
            data = await self._queue.get()
            if data is _CLOSED:
                raise StopAsyncIteration
            try:
                return self._decoder.decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                _undecodable_log.log("event on %s undecodable, skipped: %s", self.subject, exc)
