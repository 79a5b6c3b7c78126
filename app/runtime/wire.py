"""Frames of the requests plane, and cached msgpack codecs.

A request is one NATS message: a msgpack `RequestEnvelope`. Each response frame is one
NATS message whose first byte says what it is and whose rest is the msgpack body, so a
data frame decodes straight into the caller's `response_type` without an envelope pass.

Items a handler yields within one turn of the event loop travel together, as a batch
frame (a msgpack array of items); the last batch of a stream is a last frame, which
also ends it. So a unary reply is one message, and a token stream needs one message
per engine wake-up rather than one per item. ACCEPTED goes out only when the handler
has nothing to send by its first pause: any frame tells the caller that the callee lives.
"""

from __future__ import annotations

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

ACCEPTED = bytes([FRAME_ACCEPTED])
HEARTBEAT = bytes([FRAME_HEARTBEAT])
CALL_GONE = bytes([FRAME_CALL_GONE])
END = bytes([FRAME_END])
DATA_PREFIX = bytes([FRAME_DATA])
ERROR_PREFIX = bytes([FRAME_ERROR])


class RequestEnvelope(msgspec.Struct, array_like=True):
    request_id: str
    payload: msgspec.Raw


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


def encode_request(request_id: str, payload: Any) -> bytes:
    return encoder.encode(RequestEnvelope(request_id, msgspec.Raw(encoder.encode(payload))))


@lru_cache(maxsize=256)
def batch_decoder_for(type_: Any) -> msgspec.msgpack.Decoder:
    """Decodes the array of a batch or last frame into a list of `type_` (None: builtins)."""
    return msgspec.msgpack.Decoder() if type_ is None else msgspec.msgpack.Decoder(list[type_])


def encode_batch(kind: int, items: list[bytes]) -> bytes:
    """A batch or last frame from items msgpack-encoded one by one (as they were yielded:
    encoding at once keeps what the handler yielded, whatever it mutates later)."""
    count = len(items)
    if count < 16:
        header = bytes((kind, 0x90 | count))  # fixarray
    elif count < 1 << 16:
        header = bytes((kind, 0xDC)) + count.to_bytes(2, "big")  # array 16
    else:
        header = bytes((kind, 0xDD)) + count.to_bytes(4, "big")  # array 32
    return header + b"".join(items)


def encode_error(code: str, message: str, param: str | None = None) -> bytes:
    return ERROR_PREFIX + encoder.encode(ErrorBody(code, message, param))
