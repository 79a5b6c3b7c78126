"""What a callee keeps of a call for a resume, and how a caller takes the replay, without NATS."""

from __future__ import annotations

from app.protocol import EngineOutput
from app.runtime import wire


def _frames(count: int) -> list[bytes]:
    item = wire.encoder.encode(EngineOutput(token_ids=[7]))
    return [wire.numbered_head(wire.FRAME_DATA, seq) + item for seq in range(count)]


def test_the_replay_holds_every_frame_from_the_one_asked_for() -> None:
    replayed = wire.ReplayBuffer()
    frames = _frames(10)
    for frame in frames:
        replayed.add(frame)
    assert replayed.since(4) == frames[4:]
    assert replayed.since(10) == []  # the caller has them all
    assert replayed.since(11) is None  # a frame never sent


def test_the_oldest_frames_make_room_and_a_resume_from_them_is_refused() -> None:
    replayed = wire.ReplayBuffer()
    big = b"d" + bytes(wire.REPLAY_MAX_BYTES // 4)
    for _ in range(6):
        replayed.add(big)
    assert replayed.size <= wire.REPLAY_MAX_BYTES
    assert replayed.since(0) is None
    assert replayed.since(3) is not None and len(replayed.since(3) or []) == 3
    small = wire.ReplayBuffer()
    for frame in _frames(wire.REPLAY_MAX_FRAMES + 5):
        small.add(frame)
    assert small.since(4) is None and small.since(5) is not None


def test_a_resume_message_is_told_apart_from_a_cancel() -> None:
    assert wire.resume_from(wire.encode_resume(123456)) == 123456
    assert wire.resume_from(b"_INBOX.abc.1f") is None  # a cancel: the call's reply subject
    assert wire.resume_from(b"_INBO") is None  # as long as a resume message, still a subject


def test_while_resyncing_frames_past_a_gap_are_dropped_until_the_replay_brings_the_one_due() -> None:
    frames = _frames(6)
    sequence = wire.FrameSequence()
    for frame in frames[:2]:
        sequence.open(frame)
    sequence.resyncing = True
    # Frames 2 and 3 were lost in the outage; 4 arrives (the callee's buffer flushed at its reconnect).
    assert sequence.open(frames[4])[0] == wire.FRAME_SKIPPED
    assert sequence.open(wire.RESUMED)[0] == wire.FRAME_RESUMED  # unnumbered: passes
    sequence.resyncing = False
    kinds = [sequence.open(frame)[0] for frame in frames[2:]]  # the replay, from the one due
    assert kinds == [wire.FRAME_DATA] * 4 and sequence.due == 6
