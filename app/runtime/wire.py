"""Frames of the requests plane, and cached msgpack codecs.

A request is one NATS message: a msgpack `RequestEnvelope`. Each response frame is one
NATS message whose first byte says what it is and whose rest is the msgpack body, so a
data frame decodes straight into the caller's `response_type` without an envelope pass.

Items a handler yields within one turn of the event loop travel together, as a batch
frame (a msgpack array of items); the last batch of a stream is a last frame, which
also ends it. So a unary reply is one message, and a token stream needs one message
per engine wake-up rather than one per item. ACCEPTED goes out only when the handler
has nothing to send by its first pause: any frame tells the caller that the callee lives.

A caller that asks for it (`RequestEnvelope.numbered`) gets every frame but heartbeats
numbered: its kind's lower-case letter, a 4-byte big-endian sequence number (0, 1, ... per
call), then the body. A gap is frames NATS lost (a slow consumer's drops, an overflowing
reconnect buffer) while the connection stayed up: the caller raises rather than stream on
with items missing from the middle. Callers from before numbering ask for none and get
the frames they know.

A numbered call can be resumed: the callee keeps the last frames it sent (`ReplayBuffer`),
and for a while after the call ended where the connection may have taken them. A caller
whose NATS connection dropped mid-call sends, once it is back, a resume message (the number
of the frame it is due) to the instance's control subject with the call's reply subject as
its reply; the callee answers RESUMED and sends again every frame from that one on, then
goes on with the live ones, or NOT_RESUMABLE where it no longer has them (restarted, the
buffer overflowed, kept past its time). Frames the caller already has are dropped by number.
"""

from __future__ import annotations

import itertools
import struct
from collections import deque
from functools import lru_cache
from typing import Any

import msgspec

FRAME_ACCEPTED = 0x41  # "A": the callee took the request, nothing to send yet
FRAME_DATA = 0x44  # "D": one streamed item
FRAME_BATCH = 0x42  # "B": a msgpack array of streamed items
FRAME_LAST = 0x4C  # "L": a msgpack array of streamed items, then the handler finished
FRAME_END = 0x45  # "E": the handler finished
FRAME_ERROR = 0x58  # "X": the handler raised; body is an ErrorBody (code, message)
FRAME_HEARTBEAT = 0x48  # "H": the handler still runs (every HEARTBEAT_S while it does)
# The caller's answer to a heartbeat of a call it no longer awaits (the heartbeat carries a
# reply subject for it): the callee cancels the call.
FRAME_CALL_GONE = 0x47  # "G"
# The callee's answers to a resume (unnumbered): the frames from the one asked for follow,
# or it no longer has them.
FRAME_RESUMED = 0x52  # "R"
FRAME_NOT_RESUMABLE = 0x55  # "U"
# A frame the caller drops: one it already has, or one a resume will send again.
FRAME_SKIPPED = 0x00

# How often a callee tells each of its callers that their calls still run: a caller whose
# callee's record left discovery goes on with a call it still hears from (etcd lost the
# lease, not the process).
HEARTBEAT_S = 1.0

# A batch this large leaves at once, whether or not the handler pauses: frames stay far
# below NATS's message size limit (1 MiB by default) and the caller gets going.
MAX_BATCH_BYTES = 64 * 1024

# A kind with this bit set (its lower-case letter) is a numbered frame; no unnumbered kind has it.
NUMBERED = 0x20
NUMBERED_BODY = 5  # where a numbered frame's body starts: after its kind and sequence number
_NUMBERED_HEAD = struct.Struct(">BI")

HEARTBEAT = bytes([FRAME_HEARTBEAT])
CALL_GONE = bytes([FRAME_CALL_GONE])
RESUMED = bytes([FRAME_RESUMED])
NOT_RESUMABLE = bytes([FRAME_NOT_RESUMABLE])
# A resume message on the control subject: a zero byte (no subject, hence no cancel message,
# starts with one), "R", the number of the frame the caller is due.
_RESUME = struct.Struct(">2sI")
_RESUME_TAG = b"\x00R"

# What a callee keeps of one call for a resume: its last frames, up to this many bytes and
# frames. A token stream sends one frame per engine step (~10-60 bytes of token ids to a
# Processor, a few hundred bytes of chat chunk to a Frontend): this holds well over the
# 5 s of an outage that the request plane rides out at a few hundred frames a second.
REPLAY_MAX_BYTES = 256 * 1024
REPLAY_MAX_FRAMES = 4096
ERROR_PREFIX = bytes([FRAME_ERROR])


class RequestEnvelope(msgspec.Struct, array_like=True):
    request_id: str
    payload: msgspec.Raw
    # The caller checks sequence numbers: number the reply frames (a callee from before the
    # field ignores it, and a caller from before sends none).
    numbered: bool = False


class ErrorBody(msgspec.Struct, array_like=True):
    """What crosses for an error: its stable code (app.errors.ErrorCode), message and the
    request field at fault (a worker's 400 names it to the client as the worker's own)."""

    code: str
    message: str
    param: str | None = None


encoder = msgspec.msgpack.Encoder()
envelope_decoder = msgspec.msgpack.Decoder(RequestEnvelope)
error_decoder = msgspec.msgpack.Decoder(ErrorBody)


@lru_cache(maxsize=256)
def decoder_for(type_: Any) -> msgspec.msgpack.Decoder:
    """One decoder per target type (None gives builtins), built once."""
    return msgspec.msgpack.Decoder() if type_ is None else msgspec.msgpack.Decoder(type_)


def encode_request(request_id: str, payload: Any, numbered: bool = False) -> bytes:
    return encoder.encode(RequestEnvelope(request_id, msgspec.Raw(encoder.encode(payload)), numbered))


def numbered_head(kind: int, seq: int) -> bytes:
    """The head of the numbered frame `seq` of a call (its body follows)."""
    return _NUMBERED_HEAD.pack(kind | NUMBERED, seq)


class FrameGapError(Exception):
    """A numbered frame came where another was due: those between were lost."""

    def __init__(self, due: int, came: int) -> None:
        super().__init__(f"reply frame {came} came where {due} was due")
        self.due = due
        self.came = came


class FrameSequence:
    """A caller's check of one call's reply frames: the number the next one must bear, and
    whether a resume is under way (`resyncing`: frames past a gap are dropped, not an error,
    as the replay brings them again, in order)."""

    __slots__ = ("due", "resyncing")

    def __init__(self) -> None:
        self.due = 0
        self.resyncing = False

    def open(self, frame: bytes) -> tuple[int, int]:
        """`frame`'s kind (unnumbered letter) and where its body starts; FRAME_SKIPPED for a
        numbered frame already taken (a replay sends some again) or, while resyncing, one
        past a gap. Raises FrameGapError for a frame past a gap otherwise; an unnumbered frame
        (a callee from before numbering, one that could not read the request, a resume's
        answer) passes unchecked."""
        kind = frame[0]
        if not kind & NUMBERED:
            return kind, 1
        kind, seq = _NUMBERED_HEAD.unpack_from(frame)
        if seq != self.due:
            if seq < self.due or self.resyncing:
                return FRAME_SKIPPED, 0
            raise FrameGapError(self.due, seq)
        self.due = seq + 1
        return kind ^ NUMBERED, NUMBERED_BODY


def encode_resume(due: int) -> bytes:
    """A caller's resume message: send again every frame from number `due` on."""
    return _RESUME.pack(_RESUME_TAG, due)


def resume_from(message: bytes) -> int | None:
    """The frame number a resume message asks from; None for any other control message."""
    if len(message) != _RESUME.size or not message.startswith(_RESUME_TAG):
        return None
    return int(_RESUME.unpack(message)[1])


class ReplayBuffer:
    """The last frames a callee sent on one numbered call (numbers 0, 1, ... in order),
    at most REPLAY_MAX_BYTES and REPLAY_MAX_FRAMES of them: the oldest make room."""

    __slots__ = ("_frames", "_first", "size")

    def __init__(self) -> None:
        self._frames: deque[bytes] = deque()
        self._first = 0  # the number of the oldest frame kept
        self.size = 0  # bytes kept

    def add(self, frame: bytes) -> None:
        frames = self._frames
        frames.append(frame)
        self.size += len(frame)
        while self.size > REPLAY_MAX_BYTES or len(frames) > REPLAY_MAX_FRAMES:
            self.size -= len(frames.popleft())
            self._first += 1

    def since(self, seq: int) -> list[bytes] | None:
        """Every frame from number `seq` on (none: the caller has them all); None where the
        oldest of them made room for later ones."""
        offset = seq - self._first
        if offset < 0 or offset > len(self._frames):
            return None
        return list(itertools.islice(self._frames, offset, None))


@lru_cache(maxsize=256)
def batch_decoder_for(type_: Any) -> msgspec.msgpack.Decoder:
    """Decodes the array of a batch or last frame into a list of `type_` (None: builtins)."""
    return msgspec.msgpack.Decoder() if type_ is None else msgspec.msgpack.Decoder(list[type_])


def encode_batch(head: bytes, items: list[bytes]) -> bytes:
    """A batch or last frame (`head`: its kind byte, or its numbered head) from items
    msgpack-encoded one by one (as they were yielded: encoding at once keeps what the
    handler yielded, whatever it mutates later)."""
    count = len(items)
    if count < 16:
        array = bytes((0x90 | count,))  # fixarray
    elif count < 1 << 16:
        array = b"\xdc" + count.to_bytes(2, "big")  # array 16
    else:
        array = b"\xdd" + count.to_bytes(4, "big")  # array 32
    return head + array + b"".join(items)


def encode_error(code: str, message: str, param: str | None = None, head: bytes = ERROR_PREFIX) -> bytes:
    return head + encoder.encode(ErrorBody(code, message, param))
