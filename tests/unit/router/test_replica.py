"""A router replica driven by an in-memory fleet (tests/unit/router/fleet.py): no NATS, no etcd.

What the replica must do with what the fleet tells it: route a prefix to the worker that
holds it, count the placements of the other replicas, drop a worker whose lease went,
follow the live policy. tests/integration/test_router_replica.py runs the same replica
over the runtime's feed on real NATS and etcd.
"""

from __future__ import annotations

import asyncio

import pytest

from app.errors import NoWorkerError
from app.protocol import KV_HASH_SCHEME, BlockStored, KvEventBatch, LoadReport
from app.router import RouterReplica
from app.router.placements import PLACEMENT_WINDOW_S
from app.router.tunables import LivePolicy
from tests.unit.router.fleet import InMemoryFleet

BLOCK = 4
PREFIX = list(range(8 * BLOCK))


async def started(fleet: InMemoryFleet, name: str, policy: str = "kv", block_size: int | None = BLOCK) -> RouterReplica:
    replica = RouterReplica(fleet.feed(), policy=policy, knobs={"seed": 0}, block_size=block_size, replica_id=name)
    await replica.start()
    return replica


async def placements_delivered() -> None:
    await asyncio.sleep(2 * PLACEMENT_WINDOW_S)  # a replica sends the placements of a window at its end


async def test_kv_events_route_a_prefix_to_the_worker_that_holds_it() -> None:
    fleet = InMemoryFleet(["w1", "w2", "w3"], BLOCK)
    replica = await started(fleet, "r1")
    fleet.store("w2", PREFIX)
    decision = replica.route("q1", [*PREFIX, 7, 7, 7, 7])
    assert (decision.worker_id, decision.overlap_blocks, decision.prompt_blocks) == ("w2", 8, 9)
    assert replica.core.counters.hit_blocks == 8


async def test_without_a_configured_block_size_the_replica_takes_the_workers() -> None:
    fleet = InMemoryFleet(["w1"], block_size=16)
    replica = await started(fleet, "r1", block_size=None)
    assert replica.core.block_size == 16


async def test_placements_of_another_replica_count_until_they_finish() -> None:
    fleet = InMemoryFleet(["w1", "w2"], BLOCK)
    frontend, router = await started(fleet, "frontend"), await started(fleet, "router")
    fleet.store("w1", PREFIX)
    assert frontend.route("q1", PREFIX).worker_id == "w1"
    await placements_delivered()
    assert [(e.router_id, e.kind) for e in fleet.published] == [("frontend", "routed")]
    assert router.core.load.view("w1").active_requests == 1
    # A request with nothing cached goes where the other replica placed nothing.
    assert router.route("q2", list(range(500, 500 + 8 * BLOCK))).worker_id == "w2"
    frontend.on_prefill_done("q1")
    frontend.on_finished("q1")
    await placements_delivered()
    assert router.core.load.view("w1").active_requests == 0
    # Its own placements, echoed back, count once.
    assert frontend.core.load.view("w1").active_requests == 0


async def test_load_reports_steer_the_choice() -> None:
    fleet = InMemoryFleet(["w1", "w2"], BLOCK)
    replica = await started(fleet, "r1", policy="least-loaded")
    fleet.report_load(LoadReport(worker_id="w1", running=5, waiting=2, kv_used_blocks=10, kv_total_blocks=100))
    assert replica.route("q", PREFIX).worker_id == "w2"


async def test_a_worker_whose_lease_goes_is_no_longer_picked() -> None:
    fleet = InMemoryFleet(["w1", "w2"], BLOCK)
    replica = await started(fleet, "r1")
    fleet.store("w1", PREFIX)
    fleet.lose("w1")
    assert replica.core.index.num_blocks() == 0  # its cached blocks are forgotten with it
    assert {replica.route(f"q{i}", PREFIX).worker_id for i in range(4)} == {"w2"}
    fleet.lose("w2")
    with pytest.raises(NoWorkerError, match="no VllmWorker is serving"):
        replica.route("q5", PREFIX)


async def test_workers_that_failed_a_request_are_not_offered_it_again() -> None:
    fleet = InMemoryFleet(["w1", "w2"], BLOCK)
    replica = await started(fleet, "r1")
    fleet.store("w1", PREFIX)
    assert replica.route("q1", PREFIX, exclude=["w1"]).worker_id == "w2"
    with pytest.raises(NoWorkerError, match="but the ones that failed this request"):
        replica.route("q2", PREFIX, exclude=["w1", "w2"])


async def test_a_request_goes_only_to_workers_of_its_model_even_where_another_holds_its_prefix() -> None:
    fleet = InMemoryFleet(["a1", "a2", "b1"], BLOCK, models={"a1": "model-a", "a2": "model-a", "b1": "model-b"})
    replica = await started(fleet, "r1")
    fleet.store("b1", PREFIX)  # model-b's worker cached the same tokens
    assert {replica.route(f"q{i}", PREFIX, model="model-a").worker_id for i in range(6)} <= {"a1", "a2"}
    assert replica.route("q-b", PREFIX, model="model-b").worker_id == "b1"
    with pytest.raises(NoWorkerError, match="no VllmWorker is serving model `model-c`"):
        replica.route("q-c", PREFIX, model="model-c")
    with pytest.raises(NoWorkerError, match="model `model-b` but the ones that failed"):
        replica.route("q-b2", PREFIX, exclude=["b1"], model="model-b")


async def test_a_live_policy_change_applies_and_a_reset_restores_the_configured_one() -> None:
    fleet = InMemoryFleet(["w1", "w2"], BLOCK)
    replica = await started(fleet, "r1")
    fleet.store("w1", PREFIX)
    fleet.set_policy(LivePolicy(policy="round-robin"))
    assert [replica.route(f"q{i}", PREFIX).worker_id for i in range(4)] == ["w1", "w2", "w1", "w2"]
    fleet.set_policy(None)
    assert replica.core.policy.name == "kv"
    assert replica.route("q5", PREFIX).worker_id == "w1"


async def test_a_closed_replica_hears_nothing_more() -> None:
    fleet = InMemoryFleet(["w1"], BLOCK)
    replica = await started(fleet, "r1")
    await replica.close()
    assert fleet.feeds[0].closed
    fleet.store("w1", PREFIX)
    assert replica.core.index.num_blocks() == 0


async def test_the_replica_reports_its_policy_counters_and_the_workers_it_cannot_see() -> None:
    fleet = InMemoryFleet(["w1", "w2", "w3"], BLOCK)
    replica = RouterReplica(
        fleet.feed(),
        policy="kv",
        block_size=BLOCK,
        model="m",
        replica_id="r1",
        report_interval_s=0.01,
        kv_silence_s=0.05,
    )
    await replica.start()
    feed = fleet.feeds[0]
    fleet.store("w1", PREFIX)
    replica.route("q1", PREFIX)
    # w2 runs requests and publishes no KV events; w3's events have another block size.
    busy = LoadReport(worker_id="w2", running=1, waiting=0, kv_used_blocks=1, kv_total_blocks=10)
    fleet.report_load(busy)
    await asyncio.sleep(0.1)
    fleet.report_load(busy)
    assert feed.listener is not None
    feed.listener.on_kv_events(
        KvEventBatch(worker_id="w3", seq=0, block_size=2 * BLOCK, events=[BlockStored(token_ids=[], block_hashes=[])])
    )
    fleet.set_policy(LivePolicy(policy="round-robin", knobs={}))
    reports_before = len(feed.reports)
    await asyncio.sleep(0.05)
    assert len(feed.reports) > reports_before, "no report published since"
    report = feed.reports[-1]
    assert (report.router_id, report.policy, report.decisions) == ("r1", "round-robin", 1)
    assert (report.prompt_blocks, report.hit_blocks, report.indexed_blocks) == (8, 8, 8)
    assert report.kv_silent_workers == ["w2"] and report.kv_rejected_workers == ["w3"]
    assert report.rejected_kv_batches == 1
    # What its index takes, for `tandem doctor` to hold the workers' model records against.
    assert (report.block_size, report.hash_scheme, report.model) == (BLOCK, KV_HASH_SCHEME, "m")
    await replica.close()
    published = len(feed.reports)
    await asyncio.sleep(0.05)
    assert len(feed.reports) == published, "a closed replica still reports"


async def test_a_late_batch_or_load_report_of_a_worker_that_left_does_not_bring_it_back() -> None:
    fleet = InMemoryFleet(["w1", "w2"], BLOCK)
    replica = await started(fleet, "r1", policy="least-loaded")
    fleet.store("w1", PREFIX)
    fleet.lose("w1")
    # What w1 sent before it left, delivered after: a KV batch and a load report.
    fleet.store("w1", list(range(100, 100 + 4 * BLOCK)))
    fleet.report_load(LoadReport(worker_id="w1", running=9, waiting=9, kv_used_blocks=50, kv_total_blocks=100))
    assert replica.core.index.num_blocks() == 0 and replica.core.index.worker_blocks("w1") == 0
    assert replica.core.load.view("w1").active_requests == 0  # no report kept for it
    assert replica.report().indexed_blocks == 0
    assert replica.core.counters.stray_events == 2
    # Registered again, it counts again: its dump, then its events and reports.
    fleet.join("w1")
    for _ in range(100):
        if replica.core.index.worker_blocks("w1") == 12:
            break
        await asyncio.sleep(0.005)
    assert replica.core.index.worker_blocks("w1") == 12
    fleet.report_load(LoadReport(worker_id="w1", running=3, waiting=0, kv_used_blocks=5, kv_total_blocks=100))
    assert replica.core.load.view("w1").active_requests == 3
