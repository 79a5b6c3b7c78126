"""KvIndex throughput and latency: block events ingested per second, find_matches p50/p99.

Fills an index with `--cached-blocks` (worker, block) entries over `--workers` workers, as
prompts of `--prompt-tokens` tokens whose first half is one of a few shared system prompts,
stored the way vLLM reports them (a BlockStored per few blocks, chained by parent hash); then
times queries for prompts that share a prefix with what is cached, with and without hashing
the prompt. Targets: >= 200k block events/s ingested; find_matches p99 < 500 us. Figures are
CPU time of this process, and wall time too: on a shared machine the wall clock also counts
other processes' turns.

    .venv/bin/python -m bench.index_bench                 # 64 workers, 1M blocks, block sizes 16 and 64
    .venv/bin/python -m bench.index_bench --block-sizes 16 --cached-blocks 200000
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time

from app.protocol import BlockRemoved, BlockStored, KvEvent, KvEventBatch
from app.router.hashing import block_hashes
from app.router.index import KvIndex
from bench.harness.stats import percentile

SHARED_PREFIXES = 16


def prompt_tokens(prompt_id: int, shared_id: int, length: int) -> list[int]:
    # Distinct ranges per prompt keep token generation cheap; hashing cost doesn't depend on the values.
    half, own = length // 2, 1_000_000 + prompt_id * length
    return list(range(shared_id * 10_000, shared_id * 10_000 + half)) + list(range(own, own + length - half))


def worker_batches(worker: str, prompts: list[list[int]], block_size: int, blocks_per_event: int) -> list[KvEventBatch]:
    batches = []
    for seq, tokens in enumerate(prompts):
        num_blocks = len(tokens) // block_size
        engine_hashes: list[int | bytes] = [hash((worker, seq, i)) for i in range(num_blocks)]
        events: list[KvEvent] = [
            BlockStored(
                token_ids=tokens[start * block_size : min(start + blocks_per_event, num_blocks) * block_size],
                block_hashes=engine_hashes[start : start + blocks_per_event],
                parent_block_hash=engine_hashes[start - 1] if start else None,
            )
            for start in range(0, num_blocks, blocks_per_event)
        ]
        batches.append(KvEventBatch(worker_id=worker, seq=seq, block_size=block_size, events=events))
    return batches


def bench(block_size: int, args: argparse.Namespace) -> None:
    rng = random.Random(0)
    blocks_per_prompt = args.prompt_tokens // block_size
    prompts_per_worker = max(1, args.cached_blocks // args.workers // blocks_per_prompt)
    index = KvIndex(block_size)
    ingest_wall = ingest_cpu = 0.0
    catalog: list[tuple[int, int]] = []  # (prompt id, shared id) of every cached prompt
    gc.freeze()
    for w in range(args.workers):
        prompts = []
        for _ in range(prompts_per_worker):
            catalog.append((len(catalog), rng.randrange(SHARED_PREFIXES)))
            prompts.append(prompt_tokens(*catalog[-1], args.prompt_tokens))
        batches = worker_batches(f"worker-{w}", prompts, block_size, args.blocks_per_event)
        started, started_cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            index.apply_batch(batch)
        ingest_wall += time.perf_counter() - started
        ingest_cpu += time.process_time() - started_cpu
    stored = args.workers * prompts_per_worker * blocks_per_prompt

    removal = [
        KvEventBatch(
            worker_id="worker-0",
            seq=prompts_per_worker + i,
            block_size=block_size,
            events=[BlockRemoved(block_hashes=[hash(("worker-0", i, b)) for b in range(blocks_per_prompt)])],
        )
        for i in range(prompts_per_worker)
    ]
    started = time.process_time()
    for batch in removal:
        index.apply_batch(batch)
    removal_cpu = time.process_time() - started

    match_us, with_hashing_us, match_wall_us, overlaps = [], [], [], []
    for _ in range(args.queries):
        cached_id, shared_id = rng.choice(catalog)
        # Either a cached prompt with a new tail, or a new prompt on a shared system prompt.
        base = prompt_tokens(cached_id if rng.random() < 0.5 else len(catalog) + 1, shared_id, args.prompt_tokens)
        tokens = base[: args.prompt_tokens - 3 * block_size] + [7] * (3 * block_size)
        started = time.process_time()
        hashes = block_hashes(tokens, block_size)
        hashed, hashed_wall = time.process_time(), time.perf_counter()
        result = index.find_matches(hashes)
        done, done_wall = time.process_time(), time.perf_counter()
        match_us.append((done - hashed) * 1e6)
        match_wall_us.append((done_wall - hashed_wall) * 1e6)
        with_hashing_us.append((done - started) * 1e6)
        overlaps.append(max(result.values(), default=0))
    gc.unfreeze()

    def p50_p99(samples: list[float]) -> str:
        return f"p50 {percentile(samples, 50):.0f} us, p99 {percentile(samples, 99):.0f} us"

    print(
        f"block_size {block_size}: {args.workers} workers, {stored:,} cached blocks "
        f"({index.num_blocks():,} distinct), {blocks_per_prompt} blocks per prompt"
    )
    print(
        f"  ingest  : {stored / ingest_cpu:,.0f} stored blocks/s CPU ({stored / ingest_wall:,.0f} wall; "
        f"{stored // args.blocks_per_event / ingest_cpu:,.0f} BlockStored events/s CPU)"
    )
    print(f"  remove  : {prompts_per_worker * blocks_per_prompt / removal_cpu:,.0f} removed blocks/s CPU")
    print(f"  find_matches (hashes given): {p50_p99(match_us)} CPU (wall {p50_p99(match_wall_us)})")
    print(f"  hash + find_matches        : {p50_p99(with_hashing_us)} CPU")
    print(f"  mean best overlap {statistics.mean(overlaps):.1f} of {blocks_per_prompt} blocks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--cached-blocks", type=int, default=1_000_000)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--blocks-per-event", type=int, default=16)
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args()
    for block_size in args.block_sizes:
        bench(block_size, args)


if __name__ == "__main__":
    main()
