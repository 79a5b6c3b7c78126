"""Frames of the requests plane, and cached msgpack codecs.

A request is one NATS message: a msgpack `RequestEnvelope`. Each response frame is one
NATS message whose first byte says what it is and whose rest is the msgpack body, so a
data frame decodes straight into the caller's `response_type` without an envelope pass.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import msgspec

FRAME_ACCEPTED = 0x41  # "A": the callee took the request; sent before the handler runs
FRAME_DATA = 0x44  # "D": one streamed item
FRAME_END = 0x45  # "E": the handler finished
FRAME_ERROR = 0x58  # "X": the handler raised; body is an ErrorBody

ACCEPTED = bytes([FRAME_ACCEPTED])
END = bytes([FRAME_END])
DATA_PREFIX = bytes([FRAME_DATA])
ERROR_PREFIX = bytes([FRAME_ERROR])


class RequestEnvelope(msgspec.Struct, array_like=True):
    request_id: str
    payload: msgspec.Raw


class ErrorBody(msgspec.Struct, array_like=True):
    type_name: str
    message: str
    status: int = 500


encoder = msgspec.msgpack.Encoder()
envelope_decoder = msgspec.msgpack.Decoder(RequestEnvelope)
error_decoder = msgspec.msgpack.Decoder(ErrorBody)


@lru_cache(maxsize=256)
def decoder_for(type_: Any) -> msgspec.msgpack.Decoder:
    """One decoder per target type (None gives builtins), built once."""
    return msgspec.msgpack.Decoder() if type_ is None else msgspec.msgpack.Decoder(type_)


def encode_request(request_id: str, payload: Any) -> bytes:
    return encoder.encode(RequestEnvelope(request_id, msgspec.Raw(encoder.encode(payload))))


def encode_data(item: Any) -> bytes:
    return DATA_PREFIX + encoder.encode(item)


def encode_error(type_name: str, message: str, status: int) -> bytes:
    return ERROR_PREFIX + encoder.encode(ErrorBody(type_name, message, status))
