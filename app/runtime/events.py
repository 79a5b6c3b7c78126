"""Events plane: typed fire-and-forget pub/sub on NATS core (`tandem.<ns>.events.<topic>`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Generic, TypeVar

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from app.runtime.connect import confirm_subscriptions
from app.runtime.wire import decoder_for

log = logging.getLogger(__name__)

T = TypeVar("T")

_CLOSED = object()


def event_subject(namespace: str, topic: str) -> str:
    return f"tandem.{namespace}.events.{topic}"


class EventSubscription(Generic[T]):
    """Async iterator of decoded events; an undecodable event is logged and skipped."""

    def __init__(self, nc: NatsClient, subject: str, event_type: Any = None) -> None:
        self.subject = subject
        self._nc = nc
        self._decoder = decoder_for(event_type)
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self.subject, cb=self._on_msg)
        await confirm_subscriptions(self._nc)

    async def _on_msg(self, msg: Msg) -> None:
        self._queue.put_nowait(msg.data)

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
                log.warning("event on %s undecodable, skipped: %s", self.subject, exc)
