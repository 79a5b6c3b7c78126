"""The requests plane's frames, without NATS: what a callee sends is what a caller decodes."""

from __future__ import annotations

import msgspec
import pytest

from app.errors import ErrorCode, InvalidRequestError, error_for_code
from app.protocol import EngineOutput
from app.runtime import wire


@pytest.mark.parametrize("count", [0, 1, 15, 16, 70_000])
def test_a_batch_of_any_size_decodes_to_its_items_in_order(count: int) -> None:
    items = [wire.encoder.encode(EngineOutput(token_ids=[i])) for i in range(count)]
    frame = wire.encode_batch(wire.FRAME_LAST, items)
    assert frame[0] == wire.FRAME_LAST
    decoded = wire.batch_decoder_for(EngineOutput).decode(memoryview(frame)[1:])
    assert [output.token_ids for output in decoded] == [[i] for i in range(count)]


def test_an_error_frame_carries_the_code_the_message_and_the_field_at_fault() -> None:
    frame = wire.encode_error(ErrorCode.INVALID_REQUEST, "prompt too long", "prompt")
    assert frame[0] == wire.FRAME_ERROR
    body = wire.error_decoder.decode(frame[1:])
    rebuilt = error_for_code(body.code, body.message, body.param)
    assert isinstance(rebuilt, InvalidRequestError) and rebuilt.message == "prompt too long"
    assert rebuilt.param == "prompt"
    assert msgspec.msgpack.decode(frame[1:]) == ["invalid_request", "prompt too long", "prompt"]
    # A frame of a peer from before the field: no param.
    old = wire.ERROR_PREFIX + msgspec.msgpack.encode(["invalid_request", "prompt too long"])
    assert wire.error_decoder.decode(old[1:]).param is None


def test_a_request_envelope_keeps_the_payload_bytes_for_the_callee_to_decode() -> None:
    body = wire.encode_request("req-1", {"n": 3})
    envelope = wire.envelope_decoder.decode(body)
    assert envelope.request_id == "req-1"
    assert msgspec.msgpack.decode(envelope.payload) == {"n": 3}
