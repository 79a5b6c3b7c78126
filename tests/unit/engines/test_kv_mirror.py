"""The worker's mirror of its engine's cache (app/engines/kv_mirror.py): a router index made
from its dump routes exactly as one made from every KV event the worker ever published."""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.engines.kv_mirror import DUMP_TOKENS_PER_BATCH, KvMirror
from app.engines.mocker_kv import BlockPool
from app.protocol import AllBlocksCleared, BlockRemoved, BlockStored, EngineBlockHash, KvEvent, KvEventBatch
from app.router.hashing import block_hashes
from app.router.index import KvIndex

BLOCK = 2
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 6, 6, 7, 7, 8, 8]]


class Engine:
    """What an engine may report: a block is stored only while its parent is held (its request
    holds the parent), and may be stored twice (vLLM does)."""

    def __init__(self) -> None:
        self.held: dict[EngineBlockHash, int] = {}  # engine hash -> copies
        self.seq = 0

    def batch(self, events: list[KvEvent]) -> KvEventBatch:
        batch = KvEventBatch(worker_id="w", seq=self.seq, block_size=BLOCK, events=events)
        self.seq += 1
        return batch

    @staticmethod
    def hash_of(prompt: int, block: int) -> EngineBlockHash:
        return hash(tuple(PROMPTS[prompt][: (block + 1) * BLOCK]))

    def op(self, kind: str, prompt: int, first: int, count: int) -> list[KvEvent]:
        tokens = PROMPTS[prompt]
        last = min(first + count, len(tokens) // BLOCK)
        hashes = [self.hash_of(prompt, block) for block in range(first, last)]
        if kind == "store":
            parent = self.hash_of(prompt, first - 1) if first else None
            if parent is not None and parent not in self.held:
                return []
            for block_hash in hashes:
                self.held[block_hash] = self.held.get(block_hash, 0) + 1
            return [
                BlockStored(
                    token_ids=tokens[first * BLOCK : last * BLOCK], block_hashes=hashes, parent_block_hash=parent
                )
            ]
        if kind == "remove":
            gone = [block_hash for block_hash in hashes if block_hash in self.held]
            for block_hash in gone:
                self.held[block_hash] -= 1
                if not self.held[block_hash]:
                    del self.held[block_hash]
            return [BlockRemoved(block_hashes=gone)] if gone else []
        self.held.clear()
        return [AllBlocksCleared()]


def every_prefix_match(index: KvIndex) -> list[dict[str, int]]:
    return [index.find_matches(block_hashes(prompt, BLOCK)[:n]) for prompt in PROMPTS for n in range(1, 5)]


ops = st.lists(
    st.tuples(
        st.sampled_from(["store", "store", "store", "remove", "remove", "clear"]),
        st.integers(0, len(PROMPTS) - 1),
        st.integers(0, 3),  # first block
        st.integers(1, 4),  # block count
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=ops, after=ops)
# A parent removed while its child stays cached, then cached again after the dump.
@example(before=[("store", 0, 0, 2), ("remove", 0, 0, 1)], after=[("store", 0, 0, 1)])
def test_an_index_made_from_the_dump_routes_as_one_made_from_every_event(
    before: list[tuple], after: list[tuple]
) -> None:
    engine, mirror = Engine(), KvMirror("w", BLOCK, capacity_blocks=1000)
    live, resynced = KvIndex(BLOCK), KvIndex(BLOCK)

    def publish(events: list[KvEvent], indexes: list[KvIndex]) -> None:
        if events:
            batch = engine.batch(events)
            mirror.apply(batch)
            for index in indexes:
                index.apply_batch(batch)

    for op in before:
        publish(engine.op(*op), [live])
    resynced.replace_worker("w", mirror.dump())
    assert every_prefix_match(resynced) == every_prefix_match(live)
    # The events after the dump follow it: copies and removals still add up.
    for op in after:
        publish(engine.op(*op), [live, resynced])
    assert every_prefix_match(resynced) == every_prefix_match(live)
    assert resynced.seq_gaps == resynced.stale_batches == 0


def test_a_parent_cached_again_after_its_child_is_dumped_before_it() -> None:
    engine, mirror = Engine(), KvMirror("w", BLOCK)
    for op in [("store", 0, 0, 2), ("remove", 0, 0, 1), ("store", 0, 0, 1)]:
        mirror.apply(engine.batch(engine.op(*op)))
    index = KvIndex(BLOCK)
    index.replace_worker("w", mirror.dump())
    assert index.find_matches(block_hashes(PROMPTS[0], BLOCK)) == {"w": 2}
    assert index.orphan_blocks == 0


def test_a_large_cache_is_dumped_in_batches_of_one_seq_the_first_a_clear() -> None:
    pool = BlockPool(num_blocks=4096, enable_caching=True)
    mirror = KvMirror("w", 16, capacity_blocks=pool.num_blocks)
    prompt = list(range(3 * DUMP_TOKENS_PER_BATCH))
    blocks = pool.allocate(len(prompt) // 16)
    assert blocks is not None
    hashes = block_hashes(prompt, 16)
    pool.cache_full_blocks(blocks, hashes, None, prompt)
    mirror.apply(KvEventBatch(worker_id="w", seq=7, block_size=16, events=pool.take_events()))

    dump = mirror.dump()
    assert len(dump) == 3 and {batch.seq for batch in dump} == {7}
    assert [isinstance(event, AllBlocksCleared) for batch in dump for event in batch.events].count(True) == 1
    assert isinstance(dump[0].events[0], AllBlocksCleared)
    index = KvIndex(16)
    index.apply_batch(
        KvEventBatch(worker_id="w", seq=0, block_size=16, events=[BlockStored(token_ids=[0] * 16, block_hashes=[-1])])
    )
    index.replace_worker("w", dump)  # what the index held of the worker before goes
    assert index.find_matches(hashes) == {"w": len(hashes)} and index.worker_blocks("w") == len(hashes)
    # The batch the dump accounts for is not applied twice; the next one follows.
    index.apply_batch(KvEventBatch(worker_id="w", seq=7, block_size=16, events=[BlockRemoved(block_hashes=[0])]))
    assert index.stale_batches == 1 and index.worker_blocks("w") == len(hashes)


def test_the_mirror_holds_no_more_blocks_than_the_engine() -> None:
    mirror = KvMirror("w", BLOCK, capacity_blocks=3)
    tokens = list(range(20))
    # Removals lost (vLLM dropped batches): the oldest make room, as the engine evicted them.
    mirror.apply(
        KvEventBatch(
            worker_id="w", seq=0, block_size=BLOCK, events=[BlockStored(token_ids=tokens, block_hashes=list(range(10)))]
        )
    )
    assert len(mirror) == 3
    index = KvIndex(BLOCK)
    index.replace_worker("w", mirror.dump())
    assert index.find_matches(block_hashes(tokens, BLOCK)) == {}  # the kept blocks' parents are gone
