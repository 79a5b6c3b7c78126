"""KV-aware routing on 8 mocker workers: prefix-cache hits and TTFT against round-robin, load spread."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from app.openai.schema import ChatCompletionRequest, parse_request
from app.preprocess import Preprocessor
from app.router.hashing import block_hashes
from bench.harness import cli
from bench.harness.launch import REPO, SERVED_MODEL, Layout, ServedGraph, control_plane, measure_layouts
from bench.harness.load import RequestResult
from bench.harness.report import met, table
from bench.harness.stats import Phase, median_rows, median_run
from bench.loadgen import LoadConfig, run_load

log = logging.getLogger(__name__)

MOCKERS = REPO / "configs" / "mocker-8.yaml"
COMMON = yaml.safe_load(MOCKERS.read_text())["Common"]
# Shared prefixes: about 1.8k tokens with the tiny model's tokenizer. 20 groups, not a multiple
# of the worker count: a blind rotation must not line groups up with workers.
SHARED = LoadConfig(
    url="",
    model=SERVED_MODEL,
    concurrency=16,
    requests=160,
    prompt_tokens=1000,
    shared_prefix_ratio=0.9,
    prefix_groups=20,
    max_tokens=16,
    ignore_eos=True,
    timeout_s=60.0,
    max_duration_s=60.0,
)
SPREAD = dataclasses.replace(SHARED, prompt_tokens=256, shared_prefix_ratio=0.0, prefix_groups=1)  # no sharing
# The routings SHARED compares: label -> `tandem serve` overrides. kv's default overlap weight (2)
# weighs a cached block twice a block to compute: it keeps a group on the worker that holds it even
# while that worker prefills another group's first prompt; weight 1 shows what happens without that.
ROUTINGS: dict[str, tuple[str, ...]] = {
    "kv (default knobs)": ("--Router.policy=kv",),
    "kv, overlap-weight 1": ("--Router.policy=kv", "--Router.knobs={overlap-weight: 1}"),
    "round-robin": ("--Router.policy=round-robin",),
}
BASELINE, DEFAULT_ROUTING = "round-robin", "kv (default knobs)"


def best_possible_cached(
    token_ids: Sequence[Sequence[int]], outcomes: Sequence[RequestResult], block_size: int
) -> list[int]:
    """Cached tokens per request under an oracle that sends every request to a worker
    already holding the longest prefix any earlier request computed: a request can hit
    the full blocks it shares with a request whose prefill was done (its first token
    came back) before it was sent, short of its own last token, which an engine always
    computes. So the first request of each group misses, and so do those sent while it
    was still prefilling. Evictions are ignored: the oracle's caches never fill."""
    hashes = [block_hashes(tokens, block_size) for tokens in token_ids]
    # A chained block hash names its whole prefix: when was each prefix first computed?
    computed_at: dict[int, float] = {}
    for prefix, outcome in zip(hashes, outcomes, strict=True):
        if (done := outcome.first_token_at) is not None:
            for block in prefix:
                computed_at[block] = min(computed_at.get(block, math.inf), done)
    cached = []
    for tokens, prefix, outcome in zip(token_ids, hashes, outcomes, strict=True):
        usable = prefix[: (len(tokens) - 1) // block_size]
        hit = 0
        while hit < len(usable) and computed_at.get(usable[hit], math.inf) < outcome.sent_at:
            hit += 1
        cached.append(hit * block_size)
    return cached


@dataclass
class Report:
    shared_load: LoadConfig  # SHARED and SPREAD, with --requests where given
    spread_load: LoadConfig
    shared: list[Phase] = field(default_factory=list)  # a row per routing
    spread: list[list[int]] = field(default_factory=list)  # each run's requests per worker, most first
    failed: int = 0


async def hit_rates(load: LoadConfig, outcomes: list[RequestResult], preprocessor: Preprocessor) -> dict[str, float]:
    """The share of prompt tokens the workers served from cache, the oracle's, and how close the first came."""
    # The oracle sees exactly the token ids the Processor sent to the workers.
    requests = [parse_request(ChatCompletionRequest, body) for body in load.bodies(len(outcomes))]
    token_ids = await asyncio.to_thread(lambda: [preprocessor.preprocess(r, "oracle").token_ids for r in requests])
    best = await asyncio.to_thread(best_possible_cached, token_ids, outcomes, COMMON["block-size"])
    ok = [(o, b) for o, b in zip(outcomes, best, strict=True) if o.ok]
    prompt_total = sum(o.prompt_tokens for o, _ in ok) or 1
    hit, best_hit = sum(o.cached_tokens for o, _ in ok) / prompt_total, sum(b for _, b in ok) / prompt_total
    return {"hit_rate": hit, "best_hit_rate": best_hit, "of_best": hit / best_hit if best_hit else math.nan}


def max_over_mean(per_worker: list[int]) -> float:
    mean = statistics.fmean(per_worker) if per_worker else 0.0
    return max(per_worker) / mean if mean else math.nan


async def measure(args: argparse.Namespace, workdir: Path) -> Report:
    requests = {"requests": args.requests} if args.requests else {}
    report = Report(dataclasses.replace(SHARED, **requests), dataclasses.replace(SPREAD, **requests))
    # Off the event loop: loading transformers takes seconds, longer than a lease might wait.
    preprocessor = await asyncio.to_thread(Preprocessor, REPO / COMMON["model"], max_model_len=COMMON["max-model-len"])

    async def run(routing: str, graph: ServedGraph, run: int) -> None:
        # Each run brings new prefix groups (a new seed): earlier runs' cache contents only take room,
        # as an older workload's would.
        load = dataclasses.replace(report.shared_load, url=graph.base_url, seed=run)
        summary, outcomes = await run_load(load)
        report.shared.append(Phase((routing,), summary, await hit_rates(load, outcomes, preprocessor)))
        log.info("shared, %s, run %d: %s", routing, run, report.shared[-1].extra)
        report.failed += summary.failed
        if routing == DEFAULT_ROUTING:
            spread, _ = await run_load(dataclasses.replace(report.spread_load, url=graph.base_url, seed=100 + run))
            workers = await graph.instances("VllmWorker")
            report.spread.append(sorted((spread.workers.get(w, 0) for w in workers), reverse=True))
            log.info("spread, run %d: %s", run, report.spread[-1])
            report.failed += spread.failed

    layouts = {routing: Layout(MOCKERS, 8, routers=2, overrides=overrides) for routing, overrides in ROUTINGS.items()}
    with control_plane(workdir) as plane:
        await measure_layouts(layouts, workdir, plane, args.runs, run)  # each routing on a fresh graph
    return report


def render(report: Report, args: argparse.Namespace) -> list[str]:
    shared, spread, rows = report.shared_load, report.spread_load, []
    figures = median_rows(report.shared)
    for (routing,), m in figures.items():
        speedup = figures[BASELINE,]["ttft_p50_s"] / m["ttft_p50_s"]
        judged = routing != BASELINE  # the targets are the kv policy's
        of_best = f"{m['of_best']:.1%}" + (f" {met(m['of_best'] >= 0.95)}" if judged else "")
        speedup_cell = f"{speedup:.2f}" + (f" {met(speedup >= 2)}" if judged else "")
        hits = [f"{m['hit_rate']:.1%}", f"{m['best_hit_rate']:.1%}", of_best, f"{m['ttft_p50_s'] * 1000:.0f} ms"]
        rows.append([routing, *hits, speedup_cell, f"{m['request_throughput']:.1f}"])
    headings = (
        "routing | KV hit rate | best possible | hit / best (target >= 95 %) | TTFT p50"
        f" | {BASELINE} TTFT p50 / this (target >= 2) | requests/s"
    )
    per_worker = median_run(report.spread, max_over_mean)
    ratio = max_over_mean(per_worker)
    return [
        f"Shared prefixes: {shared.requests} chat requests of about {shared.prompt_tokens} words (~1.8k tokens), "
        f"the first {shared.shared_prefix_ratio:.0%} one of {shared.prefix_groups} prefixes, {shared.max_tokens} "
        f"output tokens, concurrency {shared.concurrency}.",
        "",
        *table(headings, rows),
        "",
        f"No sharing (kv): {spread.requests} requests of about {spread.prompt_tokens} unrelated words, concurrency "
        f"{spread.concurrency}; requests per worker {' / '.join(map(str, per_worker))}: max / mean = {ratio:.2f} "
        f"(target <= 1.5: {met(ratio <= 1.5)}).",
        "",
        f"Failed requests: {report.failed}.",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main("bench.routing_scenarios", argv, "## KV routing (mockers)", measure, render)


if __name__ == "__main__":
    sys.exit(main())
