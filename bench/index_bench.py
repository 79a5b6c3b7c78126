"""KvIndex throughput and latency in CPU time of this process (docs/benchmarks.md, "KV index"): block
events ingested per second, find_matches p50/p99 with and without hashing the prompt."""

from __future__ import annotations

import argparse
import gc
import random
import time

from app.protocol import BlockRemoved, BlockStored, KvEvent, KvEventBatch
from app.router.hashing import block_hashes
from app.router.index import KvIndex
from bench.harness.load import percentile

WORKERS, PROMPT_TOKENS, BLOCKS_PER_EVENT, QUERIES = 64, 4096, 16, 2000
SHARED_PREFIXES = 16  # system prompts: the first half of every prompt is one of them


def prompt_tokens(prompt_id: int, shared_id: int) -> list[int]:
    # Distinct ranges per prompt keep token generation cheap; hashing cost doesn't depend on the values.
    half, own = PROMPT_TOKENS // 2, 1_000_000 + prompt_id * PROMPT_TOKENS
    return [*range(shared_id * 10_000, shared_id * 10_000 + half), *range(own, own + PROMPT_TOKENS - half)]


def stored(worker: str, seq: int, tokens: list[int], block_size: int) -> KvEventBatch:
    """A cached prompt as vLLM reports it: a BlockStored per few blocks, chained by parent hash."""
    blocks = len(tokens) // block_size
    hashes: list[int | bytes] = [hash((worker, seq, i)) for i in range(blocks)]
    events: list[KvEvent] = [
        BlockStored(
            token_ids=tokens[start * block_size : min(start + BLOCKS_PER_EVENT, blocks) * block_size],
            block_hashes=hashes[start : start + BLOCKS_PER_EVENT],
            parent_block_hash=hashes[start - 1] if start else None,
        )
        for start in range(0, blocks, BLOCKS_PER_EVENT)
    ]
    return KvEventBatch(worker_id=worker, seq=seq, block_size=block_size, events=events)


def bench(block_size: int, cached_blocks: int) -> None:
    rng, index, blocks_per_prompt = random.Random(0), KvIndex(block_size), PROMPT_TOKENS // block_size
    per_worker = max(1, cached_blocks // WORKERS // blocks_per_prompt)
    catalog = [(i, rng.randrange(SHARED_PREFIXES)) for i in range(WORKERS * per_worker)]  # (prompt, prefix)
    ingest_s = 0.0
    gc.freeze()
    for w in range(WORKERS):
        prompts = catalog[w * per_worker : (w + 1) * per_worker]
        batches = [stored(f"worker-{w}", seq, prompt_tokens(*p), block_size) for seq, p in enumerate(prompts)]
        started = time.process_time()
        for batch in batches:
            index.apply_batch(batch)
        ingest_s += time.process_time() - started

    removal = [
        KvEventBatch(
            worker_id="worker-0",
            seq=per_worker + seq,
            block_size=block_size,
            events=[BlockRemoved(block_hashes=[hash(("worker-0", seq, b)) for b in range(blocks_per_prompt)])],
        )
        for seq in range(per_worker)
    ]
    started = time.process_time()
    for batch in removal:
        index.apply_batch(batch)
    removal_s = time.process_time() - started

    match_us, with_hashing_us = [], []
    for _ in range(QUERIES):
        cached_id, shared_id = rng.choice(catalog)
        # Either a cached prompt with a new tail, or a new prompt on a shared system prompt.
        base = prompt_tokens(cached_id if rng.random() < 0.5 else len(catalog) + 1, shared_id)
        tokens = base[: PROMPT_TOKENS - 3 * block_size] + [7] * (3 * block_size)
        started = time.process_time()
        hashes = block_hashes(tokens, block_size)
        hashed = time.process_time()
        index.find_matches(hashes)
        done = time.process_time()
        match_us.append((done - hashed) * 1e6)
        with_hashing_us.append((done - started) * 1e6)
    gc.unfreeze()

    def p50_p99(samples: list[float]) -> str:
        return f"p50 {percentile(samples, 50):.0f} us, p99 {percentile(samples, 99):.0f} us"

    blocks = WORKERS * per_worker * blocks_per_prompt
    print(f"block_size {block_size}: {WORKERS} workers, {blocks:,} cached blocks ({index.num_blocks():,} distinct)")
    print(
        f"  ingest  : {blocks / ingest_s:,.0f} stored blocks/s ({blocks // BLOCKS_PER_EVENT / ingest_s:,.0f} events/s)"
    )
    print(f"  remove  : {per_worker * blocks_per_prompt / removal_s:,.0f} removed blocks/s")
    print(f"  find_matches (hashes given): {p50_p99(match_us)}")
    print(f"  hash + find_matches        : {p50_p99(with_hashing_us)}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.index_bench", description=__doc__)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--cached-blocks", type=int, default=1_000_000, help="(worker, block) entries")
    args = parser.parse_args()
    for block_size in args.block_sizes:
        bench(block_size, args.cached_blocks)


if __name__ == "__main__":
    main()
