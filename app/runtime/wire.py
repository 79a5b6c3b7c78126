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
"""

from __future__ import annotations

import struct
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
    """A caller's check of one call's reply frames: the number the next one must bear."""

    __slots__ = ("due",)

    def __init__(self) -> None:
        self.due = 0

    def open(self, frame: bytes) -> tuple[int, int]:
        """`frame`'s kind (unnumbered letter) and where its body starts. Raises FrameGapError
        for a numbered frame that is not the one due; an unnumbered frame (a callee from
        before numbering, or one that could not read the request) passes unchecked."""
        kind = frame[0]
        if not kind & NUMBERED:
            return kind, 1
        kind, seq = _NUMBERED_HEAD.unpack_from(frame)
        if seq != self.due:
            raise FrameGapError(self.due, seq)
        self.due = seq + 1
        return kind ^ NUMBERED, NUMBERED_BODY


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
