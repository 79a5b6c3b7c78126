"""Requests plane: serve an endpoint, call one, stream the replies back.

A call is one NATS message to the instance's subject; every reply frame is one NATS
message to the caller's inbox (see `wire.py`). The callee answers as soon as its handler
first pauses (ACCEPTED if it has nothing to send yet), so a caller learns within
`request_ack_timeout_s` that an instance whose record still lives in etcd is in fact
dead (and NATS tells it at once with a no-responders status when nothing subscribes to
the subject at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import random
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from app.errors import ErrorCode, InternalError, InvalidRequestError, PayloadTooLargeError, TandemError, error_for_code
from app.logs import Throttled
from app.protocol import InstanceRecord, names
from app.runtime import wire
from app.runtime.connect import NatsLink, confirm_subscriptions
from app.runtime.discovery import Discovery, PrefixWatch
from app.runtime.errors import (
    CallTimeoutError,
    ConnectionLostError,
    FramesLostError,
    InstanceGoneError,
    NatsUnavailableError,
    NoInstancesError,
)

log = logging.getLogger(__name__)
# A NATS outage loses the frames of every call at once: one line for them all.
_reply_lost_log = Throttled(log)
# ... and resumes all its calls at once, on both sides of each.
_resumed_log = Throttled(log, logging.INFO)
_replayed_log = Throttled(log, logging.INFO)
_not_replayed_log = Throttled(log, logging.INFO)

Handler = Callable[[Any, "RequestContext"], AsyncGenerator[Any, None]]

# Markers a caller's queue may hold besides frames (bytes).
_NO_RESPONDERS = object()
_ACK_TIMEOUT = object()
_DEADLINE = object()
_INSTANCE_GONE = object()
_CONNECTION_LOST = object()
_SILENT = object()
_RESUME_TIMEOUT = object()
# A no-responders answer within this of a reconnect is retried (this often): the callee
# may not have subscribed again yet (each process reconnects at its own pace, every 0.25 s).
_RESUBSCRIBE_WINDOW_S = 3.0
_RESUBSCRIBE_POLL_S = 0.1
# A callee whose record left discovery runs the call still if it is heard from within
# this (it sends a heartbeat every HEARTBEAT_S while the call runs).
_PROOF_OF_LIFE_S = 1.5 * wire.HEARTBEAT_S
# A callee that heartbeats but has not been heard from for this long (no frame, no
# heartbeat: four missed in a row) is taken for dead even while its record lives: a stopped
# process (SIGSTOP, a hung host), or one whose frames NATS drops. Not after one or two: a
# loaded callee's event loop may be late with them.
_SILENCE_S = 5 * wire.HEARTBEAT_S
_NATS_STATUS = "Status"
_NO_RESPONDERS_STATUS = "503"
# A callee cancels a call whose caller's inbox has no subscriber for this many heartbeats
# in a row (its process is gone): not for one, which a caller reconnecting to NATS (it
# subscribes again within a second) could cause.
_CALLER_GONE_AFTER = 3
# A call that ended stays resumable (wire.py) this long: its last frames may have been on
# their way when the connection dropped, and the look for drops comes once a HEARTBEAT_S.
_ENDED_KEPT_S = 2 * wire.HEARTBEAT_S
# Every call that ended stays resumable this long after the connection was last seen down
# (or back): its caller asks once its own connection is back, which it waits for up to its
# `outage_wait_s` (10 s by default) from the drop.
_RESUME_WINDOW_S = 15.0
# What ended calls may keep at most, the oldest going first: under load most of what an
# outage leaves to resume is the frames of calls still running.
_ENDED_KEPT_BYTES = 32 * 1024 * 1024


def _is_no_responders(msg: Msg) -> bool:
    return not msg.data and msg.headers is not None and msg.headers.get(_NATS_STATUS) == _NO_RESPONDERS_STATUS


class RequestContext:
    """What a handler knows about the call it serves."""

    __slots__ = ("request_id", "cancelled")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.cancelled = asyncio.Event()  # set when the caller went away


class ServedEndpoint:
    """An endpoint this process serves; `stop()` stops taking calls, drains, deregisters."""

    def __init__(
        self,
        nc: NatsClient,
        discovery: Discovery,
        record: InstanceRecord,
        handler: Handler,
        request_type: Any = None,
    ) -> None:
        self.record = record
        self._nc = nc
        self._discovery = discovery
        self._handler = handler
        self._request_decoder = wire.decoder_for(request_type)
        self._key = discovery.instance_key(record.service, record.endpoint, record.instance_id)
        self._requests_sub: Subscription | None = None
        self._control_sub: Subscription | None = None
        self._heartbeats: asyncio.Task[None] | None = None
        # Keyed by the caller's reply subject: unique per call, unlike request ids.
        self._inflight: dict[str, tuple[asyncio.Task[None], RequestContext]] = {}
        # Each call's heartbeats carry a reply subject of this endpoint's own (`_on_probe`):
        # what answers there says the caller is gone. By token, and the token of each call.
        self._probe_prefix = names.inbox_prefix(uuid.uuid4().hex)
        self._probe_sub: Subscription | None = None
        self._probe_tokens = itertools.count()
        self._token_of: dict[str, str] = {}
        self._reply_of: dict[str, str] = {}
        # token -> (first and last no-responders of the streak, how many in it)
        self._missed: dict[str, tuple[float, float, int]] = {}
        # Calls the end of a drain cancelled (not their callers): they get an error frame.
        self._cut_off: set[asyncio.Task[None]] = set()
        # The frames of each call, for a caller that resumes it: those running, by reply
        # subject, and those that ended lately (when, and their frames; oldest first).
        self._frames_of: dict[str, _ReplyFrames] = {}
        self._ended: dict[str, tuple[float, _ReplyFrames]] = {}
        self._ended_bytes = 0
        self._reconnects = 0  # the connection's reconnects when last looked at
        self._resumable_until = -math.inf  # ended calls stay resumable until then at least

    async def start(self) -> None:
        self._control_sub = await self._nc.subscribe(names.control_subject(self.record.subject), cb=self._on_control)
        self._probe_sub = await self._nc.subscribe(self._probe_prefix + "*", cb=self._on_probe)
        self._requests_sub = await self._nc.subscribe(self.record.subject, cb=self._on_request)
        await confirm_subscriptions(self._nc)
        await self._discovery.register(self._key, self.record)
        self._heartbeats = asyncio.create_task(self._send_heartbeats(), name=f"heartbeats {self.record.subject}")
        log.info("serving %s/%s as %s", self.record.service, self.record.endpoint, self.record.subject)

    async def _send_heartbeats(self) -> None:
        while True:
            await asyncio.sleep(wire.HEARTBEAT_S)
            self._forget_ended()
            for reply, token in list(self._token_of.items()):
                with contextlib.suppress(NatsError):
                    await self._nc.publish(reply, wire.HEARTBEAT, reply=self._probe_prefix + token)

    def _forget_ended(self) -> None:
        """Forget the frames of calls that ended more than _ENDED_KEPT_S ago, unless the
        connection dropped since (a blip between two looks shows as a reconnect): then every
        ended call stays resumable until _RESUME_WINDOW_S after it was last seen down."""
        now = time.monotonic()
        reconnects = self._nc.stats["reconnects"]
        if not self._nc.is_connected or reconnects != self._reconnects:
            self._reconnects = reconnects
            self._resumable_until = now + _RESUME_WINDOW_S
        if now < self._resumable_until:
            return
        while self._ended:
            reply, (ended_at, _) = next(iter(self._ended.items()))
            if now - ended_at < _ENDED_KEPT_S:
                break
            self._drop_ended(reply)

    def _keep_ended(self, reply: str, frames: _ReplyFrames) -> None:
        assert frames.replayed is not None
        self._ended[reply] = (time.monotonic(), frames)
        self._ended_bytes += frames.replayed.size
        while self._ended_bytes > _ENDED_KEPT_BYTES:
            self._drop_ended(next(iter(self._ended)))

    def _drop_ended(self, reply: str) -> None:
        ended = self._ended.pop(reply, None)
        if ended is not None and ended[1].replayed is not None:
            self._ended_bytes -= ended[1].replayed.size

    async def _on_probe(self, msg: Msg) -> None:
        """What answered a heartbeat: NATS, where the caller's inbox has no subscriber (its
        process is gone, or for a moment reconnecting), or the caller, for a call it no longer
        awaits (its cancel was lost). Either way nobody reads the call's frames: it is
        cancelled, as a caller's cancel does, so its engine work stops."""
        token = msg.subject[len(self._probe_prefix) :]
        reply = self._reply_of.get(token)
        entry = self._inflight.get(reply) if reply is not None else None
        if entry is None:
            return
        if msg.data == wire.CALL_GONE:
            why = "its caller no longer awaits it"
        elif _is_no_responders(msg):
            now = time.monotonic()
            first, last, missed = self._missed.get(token, (now, now, 0))
            if now - last > 1.5 * wire.HEARTBEAT_S:  # heard between: a new streak
                first, missed = now, 0
            missed += 1
            self._missed[token] = (first, now, missed)
            # Over heartbeats' worth of time too, not just their count: after a NATS outage the
            # reconnect buffer sends a burst of them, before the caller has subscribed again.
            if missed < _CALLER_GONE_AFTER or now - first < (_CALLER_GONE_AFTER - 1.5) * wire.HEARTBEAT_S:
                return
            why = f"its caller's inbox has had no subscriber for {now - first:.1f} s"
        else:
            return
        task, ctx = entry
        log.debug("request %s: cancelled: %s", ctx.request_id, why)
        ctx.cancelled.set()
        task.cancel()

    async def withdraw(self) -> None:
        """Leave discovery now, still answering: callers stop picking this instance at once.

        For an instance that can serve nothing more. `stop()` follows, which ends the calls
        in flight (their callers still hear this instance's heartbeats until then).
        """
        await self._discovery.deregister(self._key)

    async def drain(self, timeout_s: float) -> None:
        """Out of routing, still answering: the record says `draining`, so callers pick
        other instances while the calls in flight go on; then wait (at most `timeout_s`)
        for them to finish. `stop()` follows."""
        self.record = msgspec.structs.replace(self.record, draining=True)
        await self._discovery.register(self._key, self.record)
        if self._inflight:
            log.info("%s/%s draining %d call(s)", self.record.service, self.record.endpoint, len(self._inflight))
        deadline = time.monotonic() + timeout_s
        # Until none is left: a caller that picked this instance before it saw the record
        # change may still send one.
        while self._inflight and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait([task for task, _ in self._inflight.values()], timeout=left)

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """New calls get no-responders (callers pick another instance); in-flight ones
        finish within `drain_timeout_s`, the rest end with a worker_unavailable error
        (a caller's pipeline moves such a stream to another worker)."""
        if self._requests_sub is None:
            return
        await self._requests_sub.unsubscribe()
        self._requests_sub = None
        tasks = [task for task, _ in self._inflight.values()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=drain_timeout_s)
            if pending:
                log.warning(
                    "%s/%s: %d call(s) still running at the end of the drain: ending them",
                    self.record.service,
                    self.record.endpoint,
                    len(pending),
                )
            for task in pending:
                self._cut_off.add(task)
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            self._heartbeats = None
        with contextlib.suppress(NatsError):
            await self._nc.flush()  # the last frames leave before the record does
        await self._discovery.deregister(self._key)
        if self._control_sub is not None:
            await self._control_sub.unsubscribe()
            self._control_sub = None
        if self._probe_sub is not None:
            with contextlib.suppress(NatsError):
                await self._probe_sub.unsubscribe()
            self._probe_sub = None
        log.info("stopped serving %s/%s", self.record.service, self.record.endpoint)

    async def _on_request(self, msg: Msg) -> None:
        if not msg.reply:
            log.warning("%s: request without a reply subject dropped", self.record.subject)
            return
        try:
            envelope = wire.envelope_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            await self._nc.publish(
                msg.reply, wire.encode_error(ErrorCode.INVALID_REQUEST, f"undecodable request: {exc}")
            )
            return
        ctx = RequestContext(envelope.request_id)
        task = asyncio.create_task(self._handle(msg.reply, envelope.payload, envelope.numbered, ctx))
        reply, token = msg.reply, format(next(self._probe_tokens), "x")
        self._inflight[reply] = (task, ctx)
        self._token_of[reply], self._reply_of[token] = token, reply
        task.add_done_callback(lambda _: self._forget(reply, token))

    def _forget(self, reply: str, token: str) -> None:
        entry = self._inflight.pop(reply, None)
        self._token_of.pop(reply, None)
        self._reply_of.pop(token, None)
        self._missed.pop(token, None)
        frames = self._frames_of.pop(reply, None)
        # Its caller may not have all of its frames yet, unless it cancelled the call.
        if frames is not None and frames.replayed is not None and entry is not None and not entry[1].cancelled.is_set():
            self._keep_ended(reply, frames)

    async def _on_control(self, msg: Msg) -> None:
        """A caller's cancel (the call's reply subject) or resume (wire.py) of a call."""
        if msg.reply and (seq := wire.resume_from(msg.data)) is not None:
            await self._resume(msg.reply, seq)
            return
        reply = msg.data.decode(errors="replace")
        self._drop_ended(reply)
        entry = self._inflight.get(reply)
        if entry is not None:
            task, ctx = entry
            ctx.cancelled.set()
            task.cancel()

    async def _resume(self, reply: str, seq: int) -> None:
        """Send the frames of call `reply` from number `seq` on again, or NOT_RESUMABLE
        where this process no longer has them (a call of an earlier process, one that ended
        long ago, or one whose buffer overflowed): its caller then fails the call as lost."""
        frames = self._frames_of.get(reply)
        if frames is None and (ended := self._ended.get(reply)) is not None:
            frames = ended[1]
        try:
            if frames is not None and await frames.replay(seq):
                _replayed_log.log("request %s: resumed from frame %d for its caller", frames.request_id, seq)
                return
            _not_replayed_log.log(
                "%s: a call cannot be resumed from frame %d: its frames are gone", self.record.subject, seq
            )
            await self._nc.publish(reply, wire.NOT_RESUMABLE)
        except NatsError as exc:  # the connection dropped again: the caller asks again
            log.info("%s: resume of a call not answered (%s)", self.record.subject, exc)

    async def _handle(self, reply: str, payload: msgspec.Raw, numbered: bool, ctx: RequestContext) -> None:
        frames = _ReplyFrames(self._nc, reply, ctx.request_id, numbered)
        self._frames_of[reply] = frames
        try:
            try:
                request = self._request_decoder.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise InvalidRequestError(f"invalid request: {exc}") from exc
            stream = self._handler(request, ctx)
            async with contextlib.aclosing(stream):
                async for item in stream:
                    if frames.add(wire.encoder.encode(item)):
                        await frames.flush()  # a full batch leaves at once
            await frames.finish()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task not in self._cut_off:
                log.debug("request %s cancelled by its caller", ctx.request_id)
                return
            self._cut_off.discard(task)
            with contextlib.suppress(NatsError):
                message = f"{self.record.service} instance {self.record.instance_id} stopped before the call ended"
                await frames.fail(ErrorCode.WORKER_UNAVAILABLE, message)
        except NatsError as exc:
            _reply_lost_log.log("request %s: reply lost (%s)", ctx.request_id, exc)
        except Exception as exc:
            # A coded error (this handler's, or one that came from further down the chain:
            # Processor -> worker, say) travels on as it is; anything else is a failure
            # here, logged here, and the caller learns only that it happened.
            if isinstance(exc, TandemError):
                error = exc
            else:
                error = InternalError(f"{self.record.service}/{self.record.endpoint} failed ({type(exc).__name__})")
                log.error("request %s: handler of %s failed", ctx.request_id, self.record.subject, exc_info=exc)
            with contextlib.suppress(NatsError):
                await frames.fail(error.code, error.message, error.param)


class _ReplyFrames:
    """The reply frames of one call. Items the handler yields within one turn of the
    event loop leave as one frame: a flush is scheduled (as a task, so it runs once the
    handler pauses) when the first of them arrives, and the handler's end takes what is
    still pending into the last frame. A flush that finds nothing to send, before
    anything was sent, sends ACCEPTED. Numbered where the caller asked (wire.py): a frame
    that NATS refuses to send keeps its number, so the caller sees the gap; numbered
    frames also go to a replay buffer, from which `replay` sends them again to a caller
    that resumes the call."""

    __slots__ = (
        "_nc",
        "_reply",
        "request_id",
        "_pending",
        "_pending_bytes",
        "_flush_scheduled",
        "_flush_task",
        "_sent",
        "_seq",
        "replayed",
        "_replaying",
    )

    def __init__(self, nc: NatsClient, reply: str, request_id: str, numbered: bool) -> None:
        self._nc = nc
        self._reply = reply
        self.request_id = request_id
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._sent = False
        self._seq = 0 if numbered else -1  # the next frame's number; -1: not numbered
        self.replayed = wire.ReplayBuffer() if numbered else None
        # Set while a replay is being sent: live frames wait, so that none overtakes it.
        self._replaying: asyncio.Event | None = None
        self._flush_scheduled = False
        self._schedule_flush()  # ACCEPTED, unless the handler has items by its first pause

    def add(self, encoded_item: bytes) -> bool:
        """Queue an item; True when the batch is full and should be flushed now."""
        self._pending.append(encoded_item)
        self._pending_bytes += len(encoded_item)
        if not self._flush_scheduled:
            self._schedule_flush()
        return self._pending_bytes >= wire.MAX_BATCH_BYTES

    def _schedule_flush(self) -> None:
        self._flush_scheduled = True
        # Held so that the task is not collected while it waits; one flush is ever due.
        self._flush_task = asyncio.get_running_loop().create_task(self.flush(scheduled=True))

    def _head(self, kind: int) -> bytes:
        """The next frame's kind byte, or its numbered head (which takes the next number)."""
        seq = self._seq
        if seq < 0:
            return bytes((kind,))
        self._seq = seq + 1
        return wire.numbered_head(kind, seq)

    async def flush(self, scheduled: bool = False) -> None:
        if scheduled:
            self._flush_scheduled = False
        pending = self._take()
        if len(pending) == 1:
            frame = self._head(wire.FRAME_DATA) + pending[0]
        elif pending:
            frame = wire.encode_batch(self._head(wire.FRAME_BATCH), pending)
        elif not self._sent:
            frame = self._head(wire.FRAME_ACCEPTED)
        else:
            return
        self._sent = True
        try:
            await self._publish(frame)
        except NatsError as exc:
            # The handler's own end or failure will find the connection gone too; a caller
            # that numbers frames sees the gap, or resumes the call once NATS is back.
            _reply_lost_log.log("request %s: reply frame lost (%s)", self.request_id, exc)

    async def _publish(self, frame: bytes) -> None:
        # Into the replay buffer before anything can fail: a frame NATS refuses is replayed too.
        if self.replayed is not None:
            self.replayed.add(frame)
        if self._replaying is not None:
            await self._replaying.wait()
        await self._nc.publish(self._reply, frame)

    async def replay(self, seq: int) -> bool:
        """Send RESUMED, then every frame from number `seq` on again; False (nothing sent)
        where the buffer no longer has them all."""
        frames = self.replayed.since(seq) if self.replayed is not None else None
        if frames is None:
            return False
        # The handler may stream on meanwhile: its frames, numbered after these, wait.
        self._replaying = replaying = asyncio.Event()
        try:
            await self._nc.publish(self._reply, wire.RESUMED)
            for frame in frames:
                await self._nc.publish(self._reply, frame)
        finally:
            self._replaying = None
            replaying.set()
        return True

    def _take(self) -> list[bytes]:
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        return pending

    async def finish(self) -> None:
        """The last frame: what is pending, and the end of the stream."""
        pending = self._take()
        self._sent = True
        frame = wire.encode_batch(self._head(wire.FRAME_LAST), pending) if pending else self._head(wire.FRAME_END)
        await self._publish(frame)

    async def fail(self, code: str, message: str, param: str | None = None) -> None:
        """Items yielded before the failure still reach the caller, then the error."""
        pending = self._take()
        self._sent = True
        if pending:
            # Refused or not, the error frame follows it (into the replay buffer at least).
            with contextlib.suppress(NatsError):
                await self._publish(wire.encode_batch(self._head(wire.FRAME_BATCH), pending))
        await self._publish(wire.encode_error(code, message, param, self._head(wire.FRAME_ERROR)))


class _Call:
    """One outstanding call of this process: the queue its reply frames land in, when
    the callee was last heard from (any frame, heartbeats included), and whether its
    silence counts (the callee has shown it heartbeats: one from before heartbeats may be
    silent for as long as its handler pauses)."""

    __slots__ = ("token", "reply", "queue", "heard_at", "silence_counts")

    def __init__(self, token: str, reply: str) -> None:
        self.token = token
        self.reply = reply
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.heard_at = -math.inf
        self.silence_counts = False


class ReplyRouter:
    """One wildcard inbox subscription for every call of the process (no subscribe per call).

    When the connection drops, every open call is told at once: frames its callee publishes
    until this side has subscribed again are lost, so none of them may wait for more. Once a
    second, a call whose callee has been silent for `_SILENCE_S` is told (one timer for every
    call, not one reset per frame)."""

    def __init__(self, nc: NatsClient, link: NatsLink) -> None:
        self._nc = nc
        link.on_lost(self._connection_lost)
        self._prefix = names.inbox_prefix(uuid.uuid4().hex)
        self._calls: dict[str, _Call] = {}
        self._tokens = itertools.count()
        self._sub: Subscription | None = None
        self._silence_timer: asyncio.TimerHandle | None = None
        self._looked_at = 0.0

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)
        await confirm_subscriptions(self._nc)
        self._looked_at = time.monotonic()
        self._silence_timer = asyncio.get_running_loop().call_later(wire.HEARTBEAT_S, self._look_for_silence)

    def _look_for_silence(self) -> None:
        now = time.monotonic()
        late = now - self._looked_at - wire.HEARTBEAT_S
        self._looked_at = now
        # Run late, this process's own event loop stalled: the frames it has not read yet are
        # no callee's silence. Look again next time, once they are read.
        if late < wire.HEARTBEAT_S:
            for call in self._calls.values():
                if call.silence_counts and now - call.heard_at > _SILENCE_S:
                    call.silence_counts = False  # told once
                    call.queue.put_nowait(_SILENT)
        self._silence_timer = asyncio.get_running_loop().call_later(wire.HEARTBEAT_S, self._look_for_silence)

    async def close(self) -> None:
        if self._silence_timer is not None:
            self._silence_timer.cancel()
            self._silence_timer = None
        if self._sub is not None:
            with contextlib.suppress(NatsError):
                await self._sub.unsubscribe()
            self._sub = None

    def open(self) -> _Call:
        token = format(next(self._tokens), "x")
        call = _Call(token, self._prefix + token)
        self._calls[token] = call
        return call

    def close_call(self, call: _Call) -> None:
        self._calls.pop(call.token, None)

    def _connection_lost(self) -> None:
        for call in self._calls.values():
            call.queue.put_nowait(_CONNECTION_LOST)

    async def _on_reply(self, msg: Msg) -> None:
        call = self._calls.get(msg.subject[len(self._prefix) :])
        if call is None:
            if msg.reply and msg.data == wire.HEARTBEAT:
                # The callee still runs a call this process gave up (its cancel was lost).
                with contextlib.suppress(NatsError):
                    await self._nc.publish(msg.reply, wire.CALL_GONE)
            return  # a late frame of a call already given up
        call.heard_at = time.monotonic()
        if msg.data == wire.HEARTBEAT:
            call.silence_counts = True
            return
        if _is_no_responders(msg):
            call.queue.put_nowait(_NO_RESPONDERS)
        else:
            call.queue.put_nowait(msg.data)


def _pickable(records: dict[str, InstanceRecord]) -> list[str]:
    """The instances a caller may pick: not those draining (a named target may still be)."""
    return sorted(instance_id for instance_id, record in records.items() if not record.draining)


class EndpointClient:
    """Calls one endpoint of one service; the instance list is watch-fed and started lazily."""

    def __init__(
        self,
        nc: NatsClient,
        link: NatsLink,
        replies: ReplyRouter,
        watch_instances: Callable[[], Awaitable[PrefixWatch[InstanceRecord]]],
        service: str,
        endpoint: str,
        ack_timeout_s: float,
        suspect_for_s: float,
        outage_wait_s: float,
    ) -> None:
        self.service = service
        self.endpoint = endpoint
        self._nc = nc
        self._link = link
        self._outage_wait_s = outage_wait_s
        self._replies = replies
        self._watch_instances = watch_instances
        self._ack_timeout_s = ack_timeout_s
        self._suspect_for_s = suspect_for_s
        self._watch: PrefixWatch[InstanceRecord] | None = None
        self._watch_lock = asyncio.Lock()
        self._ids: list[str] = []
        self._round_robin = itertools.count()
        # Instances whose record lives but whose subject did not answer, until a deadline.
        self._suspects: dict[str, float] = {}
        self._calls_by_instance: dict[str, set[_Call]] = {}

    @property
    def _name(self) -> str:
        return f"{self.service}/{self.endpoint}"

    async def _instances(self) -> PrefixWatch[InstanceRecord]:
        if self._watch is None:
            async with self._watch_lock:
                if self._watch is None:
                    watch = await self._watch_instances()
                    watch.add_listener(self._on_instance_change)
                    self._ids = _pickable(watch.items)
                    self._watch = watch
        return self._watch

    def _on_instance_change(self, instance_id: str, record: InstanceRecord | None) -> None:
        assert self._watch is not None
        self._ids = _pickable(self._watch.items)
        if record is None:
            self._suspects.pop(instance_id, None)
            for call in self._calls_by_instance.pop(instance_id, ()):
                call.queue.put_nowait(_INSTANCE_GONE)

    def _look_again(self, instance_id: str, call: _Call) -> asyncio.TimerHandle:
        """Tell `call` again if `instance_id` still has no record after _PROOF_OF_LIFE_S,
        or when its record next goes (it came back, then went)."""
        self._calls_by_instance.setdefault(instance_id, set()).add(call)

        def look() -> None:
            if self._watch is not None and instance_id not in self._watch.items:
                call.queue.put_nowait(_INSTANCE_GONE)

        return asyncio.get_running_loop().call_later(_PROOF_OF_LIFE_S, look)

    def instance_ids(self) -> list[str]:
        """Live instance ids, not draining ones (empty until the first call, `watch` or
        `wait_for_instances`)."""
        return list(self._ids)

    def suspects(self) -> list[str]:
        """Instances that did not answer a call lately (no subscriber for their subject, no
        accept in time) while their record lives: likely dead, not yet out of etcd."""
        if not self._suspects:
            return []
        now = time.monotonic()
        return [instance_id for instance_id, until in self._suspects.items() if until > now]

    async def watch(self, on_change: Callable[[str, InstanceRecord | None], None] | None = None) -> list[str]:
        """Start following the endpoint's instances now; the live ids so far.

        `on_change(instance_id, record)` then runs on every change (record None: the instance
        left), after `instance_ids()` has taken it in: one etcd watch serves the client and
        whoever else follows the same instances in this process.
        """
        watch = await self._instances()
        if on_change is not None:
            watch.add_listener(on_change)
        return self.instance_ids()

    async def wait_for_instances(self, timeout: float = 30.0) -> list[InstanceRecord]:
        watch = await self._instances()
        try:
            await watch.wait_until(bool, timeout)
        except TimeoutError:
            raise NoInstancesError(f"no instance of {self._name} appeared within {timeout:g}s") from None
        return list(watch.items.values())

    def _pick(self, watch: PrefixWatch[InstanceRecord], target: str | None, excluded: set[str]) -> InstanceRecord:
        if target not in (None, "random", "round_robin"):
            record = watch.items.get(target)
            if record is None or target in excluded:
                raise InstanceGoneError(f"instance {target} of {self._name} is not live")
            return record
        live = [i for i in self._ids if i not in excluded]
        if not live:
            raise NoInstancesError(f"no live instance of {self._name}")
        now = time.monotonic()
        # Suspects are tried only when nothing else is left: after a NATS outage every
        # instance may have looked dead for a moment.
        candidates = [i for i in live if self._suspects.get(i, 0.0) <= now] or live
        if target == "round_robin":
            chosen = candidates[next(self._round_robin) % len(candidates)]
        else:
            chosen = random.choice(candidates)
        return watch.items[chosen]

    async def call(
        self,
        payload: Any,
        target: str | None = None,
        timeout: float | None = None,
        response_type: Any = None,
        request_id: str | None = None,
        accept_timeout: float | None = None,
    ) -> Any:
        """A unary call: the one item the handler yields (None if it yields nothing)."""
        result = None
        async for item in self.stream(payload, target, timeout, response_type, request_id, accept_timeout):
            result = item
        return result

    async def stream(
        self,
        payload: Any,
        target: str | None = None,
        timeout: float | None = None,
        response_type: Any = None,
        request_id: str | None = None,
        accept_timeout: float | None = None,
    ) -> AsyncGenerator[Any, None]:
        """Stream the handler's items. Closing the iterator early cancels the callee.

        `accept_timeout` (default: the runtime's `request_ack_timeout_s`) bounds the wait for
        the callee to accept the request before it is taken for dead. A caller that must
        reach one named instance, with nobody else to try, may wait longer for it.
        """
        accept_timeout = self._ack_timeout_s if accept_timeout is None else accept_timeout
        watch = await self._instances()
        loop = asyncio.get_running_loop()
        decoder = wire.decoder_for(response_type)
        batch_decoder = wire.batch_decoder_for(response_type)
        request_id = request_id or uuid.uuid4().hex
        body = wire.encode_request(request_id, payload, numbered=True)
        if len(body) > self._nc.max_payload:
            raise PayloadTooLargeError(
                f"request of {len(body)} bytes exceeds the {self._nc.max_payload}-byte message limit of the NATS server"
            )
        excluded: set[str] = set()
        outage = _Outage(self._link, self._outage_wait_s, request_id, self._name)
        yielded = False
        while True:
            await outage.wait()
            record = self._pick(watch, target, excluded)
            call = self._replies.open()
            self._calls_by_instance.setdefault(record.instance_id, set()).add(call)
            timers = [loop.call_later(accept_timeout, call.queue.put_nowait, _ACK_TIMEOUT)]
            if timeout is not None:
                timers.append(loop.call_later(timeout, call.queue.put_nowait, _DEADLINE))
            finished = False
            gone_at: float | None = None  # when the callee's record last went
            sequence = wire.FrameSequence()
            resume: _Resume | None = None  # once the connection dropped mid-call
            try:
                try:
                    await self._nc.publish(record.subject, body, reply=call.reply)
                except NatsError as exc:
                    # Closed, or the reconnect buffer is full: a 503 that says so, not a 500.
                    finished = True
                    why = f"NATS refused it ({exc})"
                    raise NatsUnavailableError(f"{self._name}: request {request_id} not sent: {why}") from exc
                first = await call.queue.get()
                if first is _NO_RESPONDERS:
                    finished = True
                    if outage.settling():
                        await asyncio.sleep(_RESUBSCRIBE_POLL_S)
                        continue
                    # The record outlived its process (crash, lease not yet expired): try another.
                    self._suspects[record.instance_id] = time.monotonic() + self._suspect_for_s
                    excluded.add(record.instance_id)
                    continue
                if first is _ACK_TIMEOUT:
                    self._suspects[record.instance_id] = time.monotonic() + self._suspect_for_s
                    raise InstanceGoneError(
                        f"instance {record.instance_id} of {self._name} did not accept "
                        f"request {request_id} within {accept_timeout:g}s"
                    )
                timers[0].cancel()
                if isinstance(first, bytes) and first[0] & wire.NUMBERED:
                    call.silence_counts = True  # a callee that numbers frames sends heartbeats
                frame = first
                while True:
                    if frame is _CONNECTION_LOST or (frame is _NO_RESPONDERS and resume is not None):
                        if not yielded:
                            break  # nothing reached our caller yet: send the call again once NATS is back
                        lost = (
                            f"the NATS connection dropped during request {request_id} to {record.instance_id} "
                            f"of {self._name}"
                        )
                        if resume is None:
                            resume = _Resume(self._nc, names.control_subject(record.subject), call, accept_timeout)
                        if frame is _NO_RESPONDERS:  # nothing listens for the resume
                            if not outage.settling():
                                raise ConnectionLostError(f"{lost}, which no longer serves") from None
                            await asyncio.sleep(_RESUBSCRIBE_POLL_S)  # it has not subscribed again yet
                        try:
                            await outage.wait()
                        except NatsUnavailableError:
                            raise ConnectionLostError(
                                f"{lost} and was not back within {self._outage_wait_s:g}s"
                            ) from None
                        _resumed_log.log(
                            "request %s to %s of %s: resuming from frame %d after the NATS connection dropped",
                            request_id,
                            record.instance_id,
                            self._name,
                            sequence.due,
                        )
                        if not await resume.ask(sequence):
                            raise ConnectionLostError(f"{lost}: the resume could not be sent") from None
                    elif frame is _RESUME_TIMEOUT and resume is not None and resume.asked:
                        raise ConnectionLostError(
                            f"the NATS connection dropped during request {request_id} to {record.instance_id} of "
                            f"{self._name}, which did not answer its resume within {accept_timeout:g}s"
                        )
                    if frame is _DEADLINE:
                        raise CallTimeoutError(f"request {request_id} to {self._name} exceeded {timeout:g}s")
                    if frame is _SILENT and resume is not None and resume.asked:
                        pass  # silent while NATS was away, which says nothing of it; the resume's wait is bounded
                    elif frame is _SILENT:
                        self._suspects[record.instance_id] = time.monotonic() + self._suspect_for_s
                        raise InstanceGoneError(
                            f"instance {record.instance_id} of {self._name} has not been heard from for "
                            f"{_SILENCE_S:g}s during request {request_id}"
                        )
                    if frame is _INSTANCE_GONE:
                        if gone_at is not None and call.heard_at < gone_at:
                            raise InstanceGoneError(
                                f"instance {record.instance_id} of {self._name} left during request {request_id}"
                            )
                        # Its record went: it died, or etcd lost its lease (an outage, a
                        # partition) while it runs on. A heartbeat before the next look
                        # tells which.
                        gone_at = time.monotonic()
                        timers.append(self._look_again(record.instance_id, call))
                    if isinstance(frame, bytes):
                        try:
                            kind, body_at = sequence.open(frame)
                        except wire.FrameGapError as gap:
                            raise FramesLostError(
                                f"request {request_id} from {record.instance_id} of {self._name}: {gap}: "
                                "frames were lost"
                            ) from None
                        if kind == wire.FRAME_SKIPPED:
                            pass
                        elif kind == wire.FRAME_DATA:
                            yielded = True
                            yield decoder.decode(memoryview(frame)[body_at:])
                        elif kind == wire.FRAME_BATCH or kind == wire.FRAME_LAST:
                            items = batch_decoder.decode(memoryview(frame)[body_at:])
                            yielded = yielded or bool(items)
                            if kind == wire.FRAME_LAST:
                                finished = True  # the callee is done: nothing to cancel
                                for item in items:
                                    yield item
                                return
                            for item in items:
                                yield item
                        elif kind == wire.FRAME_END:
                            finished = True
                            return
                        elif kind == wire.FRAME_ERROR:
                            finished = True
                            error = wire.error_decoder.decode(memoryview(frame)[body_at:])
                            raise error_for_code(error.code, error.message, error.param)
                        elif kind == wire.FRAME_RESUMED and resume is not None:
                            resume.answered(sequence)
                        elif kind == wire.FRAME_NOT_RESUMABLE:
                            raise ConnectionLostError(
                                f"the NATS connection dropped during request {request_id} to {record.instance_id} "
                                f"of {self._name}, which no longer has the call's frames"
                            )
                    frame = await call.queue.get()
            finally:
                if resume is not None:
                    resume.close()
                for timer in timers:
                    timer.cancel()
                self._replies.close_call(call)
                calls = self._calls_by_instance.get(record.instance_id)
                if calls is not None:
                    calls.discard(call)
                if not finished:
                    with contextlib.suppress(NatsError):
                        await self._nc.publish(names.control_subject(record.subject), call.reply.encode())


class _Resume:
    """A call's resume after its connection dropped (wire.py): asked of the callee's control
    subject, with the call's reply subject for the answer (RESUMED, then the frames from the
    one due; NOT_RESUMABLE; or a no-responders status), which is due within `answer_s`."""

    __slots__ = ("_nc", "_subject", "_call", "_answer_s", "_timer")

    def __init__(self, nc: NatsClient, subject: str, call: _Call, answer_s: float) -> None:
        self._nc = nc
        self._subject = subject
        self._call = call
        self._answer_s = answer_s
        self._timer: asyncio.TimerHandle | None = None

    @property
    def asked(self) -> bool:
        """Asked, not answered yet."""
        return self._timer is not None

    async def ask(self, sequence: wire.FrameSequence) -> bool:
        """Ask for every frame from the one due; False where NATS refused to send it. Until
        the answer, frames past a gap are dropped (the replay sends them again), and the
        callee's silence while NATS was away does not count."""
        self.close()
        sequence.resyncing = True
        self._call.silence_counts = False
        try:
            await self._nc.publish(self._subject, wire.encode_resume(sequence.due), reply=self._call.reply)
        except NatsError:
            return False
        self._timer = asyncio.get_running_loop().call_later(
            self._answer_s, self._call.queue.put_nowait, _RESUME_TIMEOUT
        )
        return True

    def answered(self, sequence: wire.FrameSequence) -> None:
        """RESUMED came: from here every frame is the one due, or one already taken."""
        sequence.resyncing = False
        self.close()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Outage:
    """One call's view of NATS outages: it waits for a lost connection to return, for at
    most `wait_s` from the first loss, and takes no-responders answers just after a
    reconnect as a callee not subscribed again yet, not as a dead one."""

    __slots__ = ("_link", "_wait_s", "_request_id", "_endpoint", "_since")

    def __init__(self, link: NatsLink, wait_s: float, request_id: str, endpoint: str) -> None:
        # Named only in the error: nothing is formatted on the way of a call that meets no outage.
        self._link = link
        self._wait_s = wait_s
        self._request_id = request_id
        self._endpoint = endpoint
        self._since: float | None = None

    def _left(self) -> float:
        now = time.monotonic()
        self._since = now if self._since is None else self._since
        return self._since + self._wait_s - now

    async def wait(self) -> None:
        if self._link.up:
            return
        if not await self._link.wait_up(max(self._left(), 0.0)):
            raise NatsUnavailableError(
                f"NATS unreachable for {self._wait_s:g}s: request {self._request_id} to {self._endpoint} not sent"
            )

    def settling(self) -> bool:
        return self._link.restored_within(_RESUBSCRIBE_WINDOW_S) and self._left() > 0


def instance_record(
    namespace: str, service: str, endpoint: str, instance_id: str, host: str, metadata: dict[str, Any]
) -> InstanceRecord:
    return InstanceRecord(
        namespace=namespace,
        service=service,
        endpoint=endpoint,
        instance_id=instance_id,
        subject=names.endpoint_subject(namespace, service, endpoint, instance_id),
        host=host,
        pid=os.getpid(),
        metadata=metadata,
    )
