"""Work queue on JetStream: a WORK_QUEUE-retention stream and one durable pull consumer.

Every process that opens the same queue shares the consumer, so each job goes to exactly
one of them; a job not acked within `ack_wait_s` (its consumer died) is redelivered.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api
from nats.js.errors import BadRequestError, NotFoundError

from app.protocol.names import queue_subject
from app.runtime.wire import decoder_for, encoder

log = logging.getLogger(__name__)

_STREAM_NAME_IN_USE = 10058
_NO_SUCH_MESSAGE = 10043


class Job:
    """One delivery of a job; ack it when done, nak it to hand it back."""

    __slots__ = ("data", "redeliveries", "_msg")

    def __init__(self, data: Any, msg: Msg) -> None:
        self.data = data
        self.redeliveries = msg.metadata.num_delivered - 1
        self._msg = msg

    async def ack(self) -> None:
        # Confirmed (nats-py's default wait is 1 s, short on a loaded node): a job acked
        # without it may be redelivered, which costs a prefill, not a request.
        await self._msg.ack_sync(timeout=_ACK_CONFIRM_S)

    async def nak(self, delay: float = 0) -> None:
        await self._msg.nak(delay=delay or None)

    async def in_progress(self) -> None:
        """Restart the ack_wait clock for a long job."""
        await self._msg.in_progress()


_ACK_CONFIRM_S = 5.0


def stream_name(namespace: str, name: str) -> str:
    """The JetStream stream that holds the queue `name` of `namespace`."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{namespace}_{name}")


@dataclass(frozen=True)
class QueueSettings:
    """What a queue's contract rests on (each job to one consumer, redelivered when not
    acked within `ack_wait_s`, however often): what `WorkQueue.start` asks JetStream for,
    and what `tandem doctor` expects `queue_state` to read back. JetStream keeps the
    settings of whoever created the stream and consumer first (an older build, a hand)."""

    stream: str
    subjects: tuple[str, ...]
    retention: str  # JetStream's word: "workqueue"
    consumer: str  # the durable pull consumer every process shares
    ack_policy: str  # "explicit"
    ack_wait_s: float
    max_deliver: int  # -1: no limit


def queue_settings(namespace: str, name: str, ack_wait_s: float) -> QueueSettings:
    return QueueSettings(
        stream=stream_name(namespace, name),
        subjects=(queue_subject(namespace, name),),
        retention=api.RetentionPolicy.WORK_QUEUE.value,
        consumer="workers",
        ack_policy=api.AckPolicy.EXPLICIT.value,
        ack_wait_s=ack_wait_s,
        max_deliver=-1,
    )


@dataclass(frozen=True)
class ConsumerState:
    """One consumer of a queue's stream, as JetStream reports it."""

    name: str
    num_pending: int  # jobs not delivered yet
    num_ack_pending: int  # delivered, not acked yet
    num_waiting: int  # pull requests waiting for a job (idle pullers)
    num_redelivered: int
    # Its settings (None: JetStream did not say).
    ack_policy: str | None = None
    ack_wait_s: float | None = None
    max_deliver: int | None = None


@dataclass(frozen=True)
class QueueState:
    stream: str
    messages: int  # jobs the stream holds (a work queue deletes a job when it is acked)
    consumers: list[ConsumerState]
    # The stream's settings.
    subjects: tuple[str, ...] = ()
    retention: str | None = None
    max_msg_size: int | None = None  # the largest job it stores (-1: the server's max_payload)


async def queue_state(nc: NatsClient, namespace: str, name: str) -> QueueState | None:
    """The queue's stream and consumers, read-only (None if no process opened it yet)."""
    js = nc.jetstream()
    stream = stream_name(namespace, name)
    try:
        info = await js.stream_info(stream)
        consumers = await js.consumers_info(stream)
    except NotFoundError:
        return None
    return QueueState(
        stream=stream,
        messages=info.state.messages,
        consumers=[
            ConsumerState(
                name=consumer.name,
                num_pending=consumer.num_pending or 0,
                num_ack_pending=consumer.num_ack_pending or 0,
                num_waiting=consumer.num_waiting or 0,
                num_redelivered=consumer.num_redelivered or 0,
                ack_policy=_word(consumer.config.ack_policy),
                ack_wait_s=consumer.config.ack_wait,
                max_deliver=consumer.config.max_deliver,
            )
            for consumer in consumers
        ],
        subjects=tuple(info.config.subjects or ()),
        retention=_word(info.config.retention),
        max_msg_size=info.config.max_msg_size,
    )


def _word(value: Any) -> str | None:
    """A JetStream enum setting as its word on the wire."""
    return None if value is None else str(getattr(value, "value", value))


class WorkQueue:
    def __init__(self, nc: NatsClient, namespace: str, name: str, ack_wait_s: float) -> None:
        self._js = nc.jetstream()
        self._settings = queue_settings(namespace, name, ack_wait_s)
        self.stream = self._settings.stream
        (self.subject,) = self._settings.subjects
        self._psub: Any = None

    async def start(self) -> None:
        settings = self._settings
        config = api.StreamConfig(
            name=self.stream,
            subjects=list(settings.subjects),
            retention=api.RetentionPolicy(settings.retention),
            storage=api.StorageType.FILE,
        )
        try:
            await self._js.add_stream(config)
        except BadRequestError as exc:
            # Another process created it first (with its own, possibly older, settings).
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise
        self._psub = await self._js.pull_subscribe(
            self.subject,
            durable=settings.consumer,
            stream=self.stream,
            config=api.ConsumerConfig(
                ack_policy=api.AckPolicy(settings.ack_policy),
                ack_wait=settings.ack_wait_s,
                max_deliver=settings.max_deliver,
            ),
        )

    async def push(self, job: Any) -> int:
        """Store a job; returns once JetStream has it (it survives a server restart), with
        its sequence number in the stream (what `withdraw` takes)."""
        ack = await self._js.publish(self.subject, encoder.encode(job), stream=self.stream)
        return int(ack.seq)

    async def withdraw(self, seq: int) -> bool:
        """Take back a job nobody waits for any more, delivered or not: no consumer gets it
        (again) and `depth` no longer counts it; a consumer that holds it still acks it
        without an error. False where it was gone already (acked, or withdrawn)."""
        try:
            return bool(await self._js.delete_msg(self.stream, seq))
        except BadRequestError as exc:
            if exc.err_code != _NO_SUCH_MESSAGE:
                raise
            return False

    async def pull(self, timeout: float = 1.0, job_type: Any = None) -> Job | None:
        """The next job, or None if none arrives within `timeout`."""
        try:
            msgs = await self._psub.fetch(1, timeout=timeout)
        except NatsTimeoutError:
            return None
        msg = msgs[0]
        try:
            data = decoder_for(job_type).decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # Redelivering a job nobody can read would loop forever: drop it, loudly.
            log.error("queue %s: undecodable job dropped: %s", self.stream, exc)
            await msg.term()
            return None
        return Job(data, msg)

    async def depth(self) -> int:
        """Jobs not yet acked: waiting for a consumer plus delivered but unacknowledged (a
        withdrawn job counts no more; one whose waiter died without withdrawing it counts
        until a consumer takes it, app/disagg/prefill.py skips it then)."""
        info = await self._js.consumer_info(self.stream, self._settings.consumer)
        return info.num_pending + info.num_ack_pending

    async def close(self) -> None:
        if self._psub is not None:
            await self._psub.unsubscribe()
            self._psub = None


class RecentDepth:
    """A queue's depth, read at most once per `max_age_s`: one read, shared by whoever asks
    while it is on the way, answers every ask until it is `max_age_s` old. A decode worker
    asks for every long prompt, and a burst of them would each cost a JetStream round trip
    (a consumer info request, answered by the server's JetStream API). A read that fails
    fails every ask that shared it, and the next ask reads again."""

    def __init__(self, read: Callable[[], Awaitable[int]], max_age_s: float) -> None:
        self._read = read
        self._max_age_s = max_age_s
        self._value = 0
        self._read_at = -float("inf")
        self._reading: asyncio.Task[int] | None = None

    async def __call__(self) -> int:
        if time.monotonic() - self._read_at < self._max_age_s:
            return self._value
        if self._reading is None:
            self._reading = asyncio.get_running_loop().create_task(self._read_now())
        # Shielded: an ask cancelled (its request gone) must not cancel the others' read.
        return await asyncio.shield(self._reading)

    async def _read_now(self) -> int:
        try:
            started = time.monotonic()
            self._value = await self._read()
            self._read_at = started  # as old as the moment it was asked for
            return self._value
        finally:
            self._reading = None
