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
    frame = wire.encode_batch(bytes((wire.FRAME_LAST,)), items)
    assert frame[0] == wire.FRAME_LAST
    decoded = wire.batch_decoder_for(EngineOutput).decode(memoryview(frame)[1:])
    assert [output.token_ids for output in decoded] == [[i] for i in range(count)]


def _numbered_stream() -> list[bytes]:
    """A call's frames as a callee that numbers them sends them: accepted, items, the end."""
    item = wire.encoder.encode(EngineOutput(token_ids=[7]))
    return [
        wire.numbered_head(wire.FRAME_ACCEPTED, 0),
        wire.numbered_head(wire.FRAME_DATA, 1) + item,
        wire.encode_batch(wire.numbered_head(wire.FRAME_BATCH, 2), [item, item]),
        wire.encode_error("worker_unavailable", "stopped", None, wire.numbered_head(wire.FRAME_ERROR, 3)),
    ]


def test_numbered_frames_in_order_open_to_their_kinds_and_bodies() -> None:
    sequence = wire.FrameSequence()
    opened = [sequence.open(frame) for frame in _numbered_stream()]
    assert [kind for kind, _ in opened] == [wire.FRAME_ACCEPTED, wire.FRAME_DATA, wire.FRAME_BATCH, wire.FRAME_ERROR]
    frames = _numbered_stream()
    assert wire.decoder_for(EngineOutput).decode(frames[1][opened[1][1] :]).token_ids == [7]
    assert len(wire.batch_decoder_for(EngineOutput).decode(frames[2][opened[2][1] :])) == 2
    assert wire.error_decoder.decode(frames[3][opened[3][1] :]).code == "worker_unavailable"


@pytest.mark.parametrize("lost", [0, 1, 2])
def test_a_lost_frame_is_a_gap_the_next_frame_reveals(lost: int) -> None:
    """(A lost last frame has none after it to tell: the caller's silence rule does.)"""
    frames = _numbered_stream()
    del frames[lost]
    sequence = wire.FrameSequence()
    for frame in frames[:lost]:
        sequence.open(frame)
    with pytest.raises(wire.FrameGapError) as gap:
        sequence.open(frames[lost])
    assert (gap.value.due, gap.value.came) == (lost, lost + 1)


def test_a_repeated_frame_is_dropped() -> None:
    """A resumed call's replay sends again frames the caller may have (wire.py)."""
    frames = _numbered_stream()
    sequence = wire.FrameSequence()
    sequence.open(frames[0])
    sequence.open(frames[1])
    assert sequence.open(frames[1]) == (wire.FRAME_SKIPPED, 0)
    assert sequence.due == 2


def test_unnumbered_frames_of_a_callee_from_before_numbering_pass_unchecked() -> None:
    sequence = wire.FrameSequence()
    item = wire.encoder.encode(EngineOutput(token_ids=[7]))
    for frame in (bytes((wire.FRAME_ACCEPTED,)), bytes((wire.FRAME_DATA,)) + item, bytes((wire.FRAME_END,))):
        assert sequence.open(frame) == (frame[0], 1)
    assert sequence.due == 0


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
    assert not envelope.numbered


def test_the_numbered_flag_is_one_more_field_that_peers_from_before_it_read_past() -> None:
    assert wire.envelope_decoder.decode(wire.encode_request("req-1", None, numbered=True)).numbered
    # A caller from before the field: a two-field envelope, frames not numbered.
    old = msgspec.msgpack.encode(["req-1", None])
    assert not wire.envelope_decoder.decode(old).numbered

    class EnvelopeBeforeNumbering(msgspec.Struct, array_like=True):
        request_id: str
        payload: msgspec.Raw

    # A callee from before it decodes the new envelope (and sends unnumbered frames).
    before = msgspec.msgpack.Decoder(EnvelopeBeforeNumbering).decode(wire.encode_request("req-1", 3, numbered=True))
    assert msgspec.msgpack.decode(before.payload) == 3
