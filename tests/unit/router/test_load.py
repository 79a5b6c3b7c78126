"""Load accounting: reports blended with this and other replicas' placements."""

from __future__ import annotations

import msgspec

from app.protocol import LoadReport, PlacementEvent
from app.router.load import LoadTracker


def test_placements_count_until_finished() -> None:
    tracker = LoadTracker("r1")
    event = tracker.on_routed("q1", "w", prompt_blocks=10, overlap_blocks=4)
    assert event == PlacementEvent(
        router_id="r1", request_id="q1", worker_id="w", kind="routed", prompt_blocks=10, overlap_blocks=4
    )
    tracker.on_routed("q2", "w", prompt_blocks=3, overlap_blocks=0)
    assert (tracker.view("w").active_requests, tracker.view("w").pending_prefill_blocks) == (2, 9)
    done = tracker.on_prefill_done("q1")
    assert done is not None and done.kind == "prefill_done"
    assert (tracker.view("w").active_requests, tracker.view("w").pending_prefill_blocks) == (2, 3)
    tracker.on_finished("q1")
    tracker.on_finished("q2")  # finished without a prefill_done: its pending blocks go too
    assert (tracker.view("w").active_requests, tracker.view("w").pending_prefill_blocks) == (0, 0)
    assert tracker.on_finished("unknown") is None


def test_reports_blend_with_placements() -> None:
    tracker = LoadTracker("r1")
    tracker.apply_report(LoadReport(worker_id="w", running=5, waiting=2, kv_used_blocks=50, kv_total_blocks=100))
    view = tracker.view("w")
    assert (view.active_requests, view.waiting, view.kv_usage) == (7, 2, 0.5)
    # A burst placed after the report raises the view before the next report does.
    for i in range(9):
        tracker.on_routed(f"q{i}", "w", prompt_blocks=5, overlap_blocks=0)
    view = tracker.view("w")
    assert view.active_requests == 9
    assert view.kv_usage == 0.95
    tracker.on_routed("q-big", "w", prompt_blocks=50, overlap_blocks=0)
    assert tracker.view("w").kv_usage == 1.0


def test_remote_replica_events_apply_and_own_echoes_do_not() -> None:
    mine, theirs = LoadTracker("r1"), LoadTracker("r2")
    event = theirs.on_routed("q1", "w", prompt_blocks=8, overlap_blocks=2)
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(event), type=PlacementEvent)
    mine.apply_remote(wire)
    mine.apply_remote(wire)  # a redelivered placement counts once
    assert (mine.view("w").active_requests, mine.view("w").pending_prefill_blocks) == (1, 6)
    prefilled = theirs.on_prefill_done("q1")
    assert prefilled is not None
    mine.apply_remote(prefilled)
    assert mine.view("w").pending_prefill_blocks == 0
    finished = theirs.on_finished("q1")
    assert finished is not None
    mine.apply_remote(finished)
    assert mine.view("w").active_requests == 0
    own = mine.on_routed("q2", "w", prompt_blocks=1, overlap_blocks=0)
    mine.apply_remote(own)
    assert mine.view("w").active_requests == 1


def test_placements_without_a_finish_expire() -> None:
    now = [0.0]
    tracker = LoadTracker("r1", request_ttl_s=60, clock=lambda: now[0])
    tracker.on_routed("lost", "w", prompt_blocks=4, overlap_blocks=0)
    now[0] = 30.0
    tracker.on_routed("fresh", "w", prompt_blocks=4, overlap_blocks=0)
    now[0] = 61.0
    assert tracker.views(["w"])["w"].active_requests == 1
    assert tracker.expired_requests == 1


def test_removed_worker_is_forgotten() -> None:
    tracker = LoadTracker("r1")
    tracker.apply_report(LoadReport(worker_id="w", running=5, waiting=0, kv_used_blocks=1, kv_total_blocks=10))
    tracker.on_routed("q", "w", prompt_blocks=4, overlap_blocks=0)
    tracker.remove_worker("w")
    assert tracker.view("w").active_requests == 0
    assert tracker.placed_worker("q") is None
