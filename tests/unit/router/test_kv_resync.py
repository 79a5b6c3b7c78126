"""A router replica re-syncs its view of a worker from the worker's dump of its cache
(app/router/kv_resync.py): when it starts, on a gap in the worker's KV events, and when the
worker registers again. The in-memory fleet (tests/unit/router/fleet.py) answers `kv_blocks`
from each worker's real mirror (app/engines/kv_mirror.py)."""

from __future__ import annotations

import asyncio
from typing import get_args

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app.protocol import BlockStored, KvEventBatch
from app.router import RouterReplica, kv_resync
from tests.unit.router.fleet import InMemoryFleet

BLOCK = 4
PREFIX = list(range(8 * BLOCK))
PROMPT = [*PREFIX, 7, 7, 7, 7]
REASONS = get_args(kv_resync.Reason)


async def started(fleet: InMemoryFleet) -> RouterReplica:
    replica = RouterReplica(fleet.feed(), policy="kv", knobs={"seed": 0}, block_size=BLOCK, replica_id="r")
    await replica.start()
    return replica


async def until(condition: object, what: str) -> None:
    for _ in range(200):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting until {what}")


def extend(
    fleet: InMemoryFleet, worker: str, tokens: list[int], parent: int, hashes: list[int], delivered: bool = True
) -> None:
    """`worker` cached `tokens` (blocks `hashes`) after its block `parent`, its next batch."""
    batch = KvEventBatch(
        worker_id=worker,
        seq=fleet.mirrors[worker].last_seq + 1,
        block_size=BLOCK,
        events=[BlockStored(token_ids=tokens, block_hashes=list(hashes), parent_block_hash=parent)],
    )
    fleet.publish(batch, delivered=delivered)


async def test_a_replica_that_starts_after_a_worker_cached_a_prefix_sees_it() -> None:
    fleet = InMemoryFleet(["w1", "w2", "w3"], BLOCK)
    fleet.store("w2", PREFIX)  # before any replica listened
    replica = await started(fleet)
    decision = replica.route("q", PROMPT)
    assert (decision.worker_id, decision.overlap_blocks) == ("w2", 8)
    # A block chained to the prefix is no orphan either.
    extend(fleet, "w2", [9] * BLOCK, parent=7, hashes=[100])
    assert replica.core.index.find_matches_for_tokens([*PREFIX, 9, 9, 9, 9]) == {"w2": 9}
    assert replica.core.orphan_blocks == 0


async def test_a_gap_in_a_workers_events_is_repaired_from_its_dump() -> None:
    fleet = InMemoryFleet(["w1", "w2"], BLOCK)
    replica = await started(fleet)
    fleet.store("w1", PREFIX[: 4 * BLOCK])
    extend(fleet, "w1", PREFIX[4 * BLOCK :], parent=3, hashes=[100, 101, 102, 103], delivered=False)  # lost
    extend(fleet, "w1", [9] * BLOCK, parent=103, hashes=[200])  # a gap, and its parent was in the lost batch
    await until(lambda: replica.core.index.find_matches_for_tokens([*PREFIX, 9, 9, 9, 9]) == {"w1": 9}, "re-synced")
    assert replica.core.seq_gaps == 1 and fleet.kv_blocks_calls.count("w1") == 2  # at start, on the gap
    # The batches after the dump follow it: no gap, nothing stale.
    fleet.store("w1", [5] * BLOCK)
    assert replica.core.seq_gaps == 1 and replica.core.index.stale_batches == 0


def coalesced(worker: str, first_seq: int, seq: int, events: list[BlockStored]) -> KvEventBatch:
    """The message of a worker that sent its batches first_seq..seq as one (app/engines/host.py)."""
    return KvEventBatch(worker_id=worker, seq=seq, first_seq=first_seq, block_size=BLOCK, events=list(events))


async def test_a_message_of_several_batches_that_follows_on_needs_no_resync() -> None:
    fleet = InMemoryFleet(["w1"], BLOCK)
    replica = await started(fleet)
    fleet.store("w1", PREFIX[:BLOCK])  # seq 0
    stores = [BlockStored(token_ids=[i] * BLOCK, block_hashes=[100 + i], parent_block_hash=99 + i) for i in (1, 2)]
    stores[0].parent_block_hash = 0
    fleet.publish(coalesced("w1", 1, 3, stores))  # batches 1..3
    fleet.store("w1", [5] * BLOCK)  # seq 4
    await asyncio.sleep(0.02)
    assert replica.core.seq_gaps == 0 and fleet.kv_blocks_calls == ["w1"]  # at start only
    assert replica.core.index.find_matches_for_tokens([*PREFIX[:BLOCK], 1, 1, 1, 1, 2, 2, 2, 2]) == {"w1": 3}


async def test_a_message_of_several_batches_after_a_lost_one_is_a_gap_and_resyncs() -> None:
    fleet = InMemoryFleet(["w1"], BLOCK)
    replica = await started(fleet)
    for seq in range(4):  # seq 0..3
        fleet.store("w1", [seq] * BLOCK)
    lost = KvEventBatch(worker_id="w1", seq=4, block_size=BLOCK, events=[])
    fleet.publish(lost, delivered=False)
    stored = BlockStored(token_ids=[9] * BLOCK, block_hashes=[900])
    fleet.publish(coalesced("w1", 5, 7, [stored]))  # 5..7 after 3: 4 is missing
    await until(lambda: replica.report().kv_resyncs.get("seq_gap") == 1, "re-synced on the gap")
    assert replica.core.seq_gaps == 1
    fleet.store("w1", [8] * BLOCK)  # seq 8 follows the dump (as of 7)
    assert replica.core.seq_gaps == 1 and replica.core.index.stale_batches == 0


async def test_batches_that_arrive_while_the_dump_is_on_its_way_apply_once_after_it() -> None:
    fleet = InMemoryFleet(["w1"], BLOCK)
    replica = await started(fleet)
    fleet.store("w1", PREFIX[:BLOCK])
    fleet.answering.clear()
    fleet.publish(KvEventBatch(worker_id="w1", seq=3, block_size=BLOCK, events=[]))  # a gap: 1 and 2 lost
    extend(fleet, "w1", PREFIX[BLOCK : 2 * BLOCK], parent=0, hashes=[1])  # seq 4: held, and in the dump
    await until(lambda: fleet.kv_blocks_calls.count("w1") == 2, "the dump was taken")
    extend(fleet, "w1", PREFIX[2 * BLOCK : 3 * BLOCK], parent=1, hashes=[2])  # seq 5: held, after the dump
    assert replica.core.index.worker_blocks("w1") == 1
    fleet.answering.set()  # the dump arrives
    await until(lambda: replica.core.index.worker_blocks("w1") == 3, "the held batch applied")
    assert replica.core.index.stale_batches == 1  # seq 4: in the dump, not applied twice
    assert replica.core.index.find_matches_for_tokens(PREFIX[: 3 * BLOCK]) == {"w1": 3}


async def test_a_worker_that_registers_again_after_its_lease_went_is_seen_whole_again() -> None:
    fleet = InMemoryFleet(["w1", "w2"], BLOCK)
    replica = await started(fleet)
    fleet.store("w1", PREFIX)
    fleet.lose("w1")  # a lease blip: the replica forgets what w1 holds
    assert replica.core.index.num_blocks() == 0
    fleet.join("w1")  # the same worker, the same cache
    await until(lambda: replica.core.index.find_matches_for_tokens(PROMPT) == {"w1": 8}, "re-synced")
    assert replica.route("q", PROMPT).worker_id == "w1"


async def test_a_worker_that_cannot_send_its_blocks_is_routed_by_its_events_meanwhile() -> None:
    fleet = InMemoryFleet(["w1"], BLOCK)
    fleet.without_kv_blocks.add("w1")  # an older build
    replica = await started(fleet)
    fleet.store("w1", PREFIX)
    assert replica.core.index.find_matches_for_tokens(PROMPT) == {"w1": 8}
    await replica.close()


async def test_resyncs_and_failures_are_counted_by_reason_in_the_metrics_and_the_report() -> None:
    fleet = InMemoryFleet(["w1", "w2"], BLOCK)
    fleet.without_kv_blocks.add("w2")  # never answers: given up on
    replica = await started(fleet)
    fleet.store("w1", PREFIX[:BLOCK])
    fleet.publish(KvEventBatch(worker_id="w1", seq=5, block_size=BLOCK, events=[]))  # a gap
    await until(lambda: replica.report().kv_resyncs.get("seq_gap") == 1, "re-synced on the gap")
    fleet.lose("w1")
    fleet.join("w1")  # registers again
    await until(lambda: replica.report().kv_resyncs.get("registered") == 1, "re-synced on registration")
    assert replica.report().kv_resyncs == {"start": 1, "seq_gap": 1, "registered": 1}
    values = scrape(replica)
    assert {reason: values[("tandem_router_kv_resyncs_total", reason)] for reason in REASONS} == {
        "start": 1,
        "seq_gap": 1,
        "registered": 1,
    }
    assert values[("tandem_router_kv_resync_failures_total", "start")] == 0  # still asking w2
    await replica.close()


async def test_a_worker_given_up_on_counts_as_a_resync_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_resync, "_GIVE_UP_AFTER_S", 0.05)
    fleet = InMemoryFleet(["w1"], BLOCK)
    fleet.without_kv_blocks.add("w1")
    replica = await started(fleet)
    await until(lambda: replica.report().kv_resync_failures == {"start": 1}, "w1 given up on")
    assert scrape(replica)[("tandem_router_kv_resync_failures_total", "start")] == 1
    assert replica.report().kv_resyncs == {}


def scrape(replica: RouterReplica) -> dict[tuple[str, str], float]:
    text = generate_latest(replica._metrics.registry).decode()
    return {
        (sample.name, sample.labels.get("reason", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
