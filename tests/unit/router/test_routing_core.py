"""The RoutingCore: index + load + policy behind one call, counters and placement events."""

from __future__ import annotations

import pytest

from app.errors import NoWorkerError
from app.protocol import BlockStored, EngineBlockHash, KvEventBatch, LoadReport, PlacementEvent
from app.router import RoutingCore

BLOCK = 4


def stored(worker: str, tokens: list[int], seq: int = 0, block_size: int = BLOCK) -> KvEventBatch:
    hashes: list[EngineBlockHash] = list(range(1000, 1000 + len(tokens) // block_size))
    return KvEventBatch(
        worker_id=worker, seq=seq, block_size=block_size, events=[BlockStored(token_ids=tokens, block_hashes=hashes)]
    )


def test_routes_to_the_cache_holder_and_counts_hits() -> None:
    published: list[PlacementEvent] = []
    timings: list[float] = []
    core = RoutingCore(
        BLOCK, "kv", {"seed": 0}, router_id="r1", on_placement=published.append, observe_decision_seconds=timings.append
    )
    prompt = list(range(40))
    assert core.apply_kv_batch(stored("w2", prompt[:32]))
    decision = core.route("q1", [*prompt, 7, 7], ["w1", "w2", "w3"])
    assert (decision.worker_id, decision.overlap_blocks, decision.prompt_blocks) == ("w2", 8, 10)
    assert core.counters.decisions == 1 and core.counters.hit_rate == 0.8
    assert published == [
        PlacementEvent(
            router_id="r1", request_id="q1", worker_id="w2", kind="routed", prompt_blocks=10, overlap_blocks=8
        )
    ]
    assert len(timings) == 1 and 0 < timings[0] == core.last_decision_seconds
    core.on_prefill_done("q1")
    core.on_finished("q1")
    assert [e.kind for e in published] == ["routed", "prefill_done", "finished"]


def test_a_burst_spreads_before_any_load_report() -> None:
    core = RoutingCore(BLOCK, "kv", {"seed": 0})
    workers = ["w1", "w2", "w3", "w4"]
    chosen = {core.route(f"q{i}", list(range(i * 100, i * 100 + 64)), workers).worker_id for i in range(8)}
    assert chosen == set(workers)


def test_dead_workers_are_never_chosen_even_if_they_hold_the_prefix() -> None:
    core = RoutingCore(BLOCK, "kv")
    prompt = list(range(32))
    core.apply_kv_batch(stored("gone", prompt))
    assert core.route("q", prompt, ["w1"]).worker_id == "w1"
    core.remove_worker("gone")
    assert core.index.workers() == []
    with pytest.raises(NoWorkerError):
        core.route("q2", prompt, [])


def test_rejected_batches_and_gaps_are_counted() -> None:
    core = RoutingCore(BLOCK, "kv")
    assert not core.apply_kv_batch(stored("w", list(range(16)), block_size=16))
    assert core.counters.rejected_batches == 1
    core.apply_kv_batch(stored("w", list(range(8)), seq=0))
    core.apply_kv_batch(KvEventBatch(worker_id="w", seq=3, block_size=BLOCK, events=[]))
    assert core.seq_gaps == 1


def test_remote_placements_and_reports_steer_the_choice() -> None:
    core = RoutingCore(BLOCK, "least-loaded", router_id="r1")
    core.apply_load_report(LoadReport(worker_id="w1", running=0, waiting=0, kv_used_blocks=0, kv_total_blocks=100))
    for i in range(3):
        core.apply_placement(PlacementEvent(router_id="r2", request_id=f"x{i}", worker_id="w1", kind="routed"))
    assert core.route("q", list(range(8)), ["w1", "w2"]).worker_id == "w2"
    core.set_policy("round-robin")
    assert [core.route(f"r{i}", [1], ["w1", "w2"]).worker_id for i in range(2)] == ["w1", "w2"]
