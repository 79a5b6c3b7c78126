"""KvIndex against a brute-force model, plus its error paths."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.protocol import AllBlocksCleared, BlockRemoved, BlockStored, EngineBlockHash, KvEvent, KvEventBatch
from app.router.hashing import block_hashes
from app.router.index import BlockSizeMismatchError, KvIndex

BLOCK = 2
WORKERS = ["w0", "w1", "w2"]


class EngineHashes:
    """Engine hashes as a worker would make them: one per (worker, prefix, variant).

    `variant` plays vLLM's extra keys (LoRA, salt): same tokens, another engine hash."""

    def __init__(self) -> None:
        self._ids: dict[tuple, int] = {}

    def __call__(self, worker: str, prefix: tuple[int, ...], variant: int) -> int:
        return self._ids.setdefault((worker, prefix, variant), len(self._ids) + 1000)


class Model:
    """What each worker holds, as multisets of engine hashes naming token prefixes."""

    def __init__(self) -> None:
        self.held: dict[str, dict[EngineBlockHash, list]] = {w: {} for w in WORKERS}  # eh -> [prefix, copies]

    def store(self, worker: str, parent: EngineBlockHash | None, blocks: list[tuple[EngineBlockHash, tuple]]) -> None:
        held = self.held[worker]
        if parent is not None and parent not in held:
            return
        for engine_hash, prefix in blocks:
            if engine_hash in held:
                held[engine_hash][1] += 1
            else:
                held[engine_hash] = [prefix, 1]

    def remove(self, worker: str, engine_hashes: list[EngineBlockHash]) -> None:
        held = self.held[worker]
        for engine_hash in engine_hashes:
            if engine_hash in held:
                held[engine_hash][1] -= 1
                if held[engine_hash][1] == 0:
                    del held[engine_hash]

    def overlaps(self, prompt: list[int]) -> dict[str, int]:
        out = {}
        for worker, held in self.held.items():
            prefixes = {prefix for prefix, _ in held.values()}
            count = 0
            while (count + 1) * BLOCK <= len(prompt) and tuple(prompt[: (count + 1) * BLOCK]) in prefixes:
                count += 1
            if count:
                out[worker] = count
        return out


# A small world (few tokens, workers, prompts) so that random operations often hit the
# same blocks: shared prefixes, duplicate stores, removals of held blocks.
prompts_strategy = st.lists(st.lists(st.integers(0, 2), min_size=BLOCK, max_size=5 * BLOCK), min_size=1, max_size=3)
op_strategy = st.tuples(
    st.sampled_from(["store", "store", "store", "remove", "clear", "drop_worker", "query"]),
    st.sampled_from(WORKERS),
    st.integers(0, 2),  # prompt index (mod the number of prompts)
    st.integers(0, 2),  # first block
    st.integers(1, 4),  # block count
    st.integers(0, 1),  # variant
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts=prompts_strategy, ops=st.lists(op_strategy, max_size=50))
def test_index_matches_a_brute_force_model(prompts: list[list[int]], ops: list[tuple]) -> None:
    index = KvIndex(BLOCK)
    model = Model()
    engine_hash = EngineHashes()
    seq = {w: 0 for w in WORKERS}

    def send(worker: str, event: KvEvent) -> None:
        index.apply_batch(KvEventBatch(worker_id=worker, seq=seq[worker], block_size=BLOCK, events=[event]))
        seq[worker] += 1

    for kind, worker, p, first, count, variant in ops:
        prompt = prompts[p % len(prompts)]
        full = len(prompt) // BLOCK
        first = min(first, full - 1)
        last = min(first + count, full)
        prefixes = [tuple(prompt[: (i + 1) * BLOCK]) for i in range(first, last)]
        hashes: list[EngineBlockHash] = [engine_hash(worker, prefix, variant) for prefix in prefixes]
        if kind == "store":
            parent = engine_hash(worker, tuple(prompt[: first * BLOCK]), variant) if first else None
            model.store(worker, parent, list(zip(hashes, prefixes, strict=True)))
            send(
                worker,
                BlockStored(
                    token_ids=prompt[first * BLOCK : last * BLOCK], block_hashes=hashes, parent_block_hash=parent
                ),
            )
        elif kind == "remove":
            model.remove(worker, hashes)
            send(worker, BlockRemoved(block_hashes=hashes))
        elif kind == "clear":
            model.held[worker] = {}
            send(worker, AllBlocksCleared())
        elif kind == "drop_worker":
            model.held[worker] = {}
            index.remove_worker(worker)
            seq[worker] = 0
        else:
            assert index.find_matches_for_tokens(prompt) == model.overlaps(prompt)
    for prompt in prompts:
        assert index.find_matches(block_hashes(prompt, BLOCK)) == model.overlaps(prompt)
    assert index.seq_gaps == 0


def _stored(tokens: list[int], hashes: list[EngineBlockHash], parent: int | None = None) -> BlockStored:
    return BlockStored(token_ids=tokens, block_hashes=hashes, parent_block_hash=parent)


def test_overlap_counts_leading_blocks_only() -> None:
    index = KvIndex(4)
    prompt = list(range(16))
    index.apply_batch(KvEventBatch(worker_id="a", seq=0, block_size=4, events=[_stored(prompt[:8], [1, 2])]))
    index.apply_batch(KvEventBatch(worker_id="b", seq=0, block_size=4, events=[_stored(prompt, [1, 2, 3, 4])]))
    # c holds blocks 2..3 of the prompt but not its start: no overlap.
    index.apply_batch(KvEventBatch(worker_id="c", seq=0, block_size=4, events=[_stored(prompt[:12], [5, 6, 7])]))
    index.apply_batch(KvEventBatch(worker_id="c", seq=1, block_size=4, events=[BlockRemoved(block_hashes=[5])]))
    assert index.find_matches_for_tokens([*prompt, 99]) == {"a": 2, "b": 4}
    assert index.find_matches_for_tokens([42] * 16) == {}


def test_block_size_mismatch_is_rejected_and_nothing_applied() -> None:
    index = KvIndex(16)
    batch = KvEventBatch(worker_id="w", seq=0, block_size=32, events=[_stored(list(range(32)), [1])])
    with pytest.raises(BlockSizeMismatchError, match=r"block_size 32.*16"):
        index.apply_batch(batch)
    assert index.num_blocks() == 0


def test_seq_gaps_are_counted_and_later_events_still_applied(caplog: pytest.LogCaptureFixture) -> None:
    index = KvIndex(2)
    index.apply_batch(KvEventBatch(worker_id="w", seq=0, block_size=2, events=[_stored([1, 2], [10])]))
    # DEBUG too: a gap logged by an earlier test in this process throttles the warning.
    with caplog.at_level(logging.DEBUG, logger="app.router.index"):
        index.apply_batch(KvEventBatch(worker_id="w", seq=5, block_size=2, events=[_stored([3, 4], [11], parent=10)]))
    index.apply_batch(KvEventBatch(worker_id="w", seq=6, block_size=2, events=[]))
    assert index.seq_gaps == 1
    assert "expected seq 1, got 5" in caplog.text
    assert index.find_matches_for_tokens([1, 2, 3, 4]) == {"w": 2}


def test_a_message_of_several_batches_follows_on_from_its_first_seq() -> None:
    index = KvIndex(2)
    index.apply_batch(KvEventBatch(worker_id="w", seq=0, block_size=2, events=[_stored([1, 2], [10])]))
    # Batches 1..3 in one message (a worker's window): they follow batch 0.
    events: list[KvEvent] = [_stored([3, 4], [11], parent=10), _stored([5, 6], [12], parent=11)]
    index.apply_batch(KvEventBatch(worker_id="w", seq=3, first_seq=1, block_size=2, events=events))
    index.apply_batch(KvEventBatch(worker_id="w", seq=4, block_size=2, events=[]))
    assert index.seq_gaps == 0 and index.stale_batches == 0
    assert index.find_matches_for_tokens([1, 2, 3, 4, 5, 6]) == {"w": 3}
    # Batches 2..4 again (already applied): stale, skipped whole.
    index.apply_batch(KvEventBatch(worker_id="w", seq=4, first_seq=2, block_size=2, events=[]))
    assert index.stale_batches == 1 and index.seq_gaps == 0
    # Batches 6..8 after batch 4: batch 5 was lost.
    index.apply_batch(KvEventBatch(worker_id="w", seq=8, first_seq=6, block_size=2, events=[]))
    assert index.seq_gaps == 1
    index.apply_batch(KvEventBatch(worker_id="w", seq=9, block_size=2, events=[]))
    assert index.seq_gaps == 1  # 9 follows 8, the message's last


def test_a_message_that_overlaps_what_was_applied_counts_as_a_gap() -> None:
    index = KvIndex(2)
    index.apply_batch(KvEventBatch(worker_id="w", seq=3, block_size=2, events=[]))
    index.apply_batch(KvEventBatch(worker_id="w", seq=5, first_seq=2, block_size=2, events=[]))
    assert index.seq_gaps == 1 and index.stale_batches == 0


def test_blocks_chained_from_an_unknown_parent_are_skipped_and_counted() -> None:
    index = KvIndex(2)
    index.apply_batch(
        KvEventBatch(worker_id="w", seq=0, block_size=2, events=[_stored([3, 4, 5, 6], [11, 12], parent=999)])
    )
    assert index.orphan_blocks == 2
    assert index.num_blocks() == 0


def test_removed_worker_no_longer_matches_and_its_slot_is_reused() -> None:
    index = KvIndex(2)
    for seq, worker in enumerate(["a", "b"]):
        index.apply_batch(KvEventBatch(worker_id=worker, seq=0, block_size=2, events=[_stored([1, 2], [seq])]))
    index.remove_worker("a")
    assert index.find_matches_for_tokens([1, 2]) == {"b": 1}
    index.apply_batch(KvEventBatch(worker_id="c", seq=0, block_size=2, events=[_stored([1, 2, 3, 4], [7, 8])]))
    assert index.find_matches_for_tokens([1, 2, 3, 4]) == {"b": 1, "c": 2}
    assert index.workers() == ["b", "c"]
