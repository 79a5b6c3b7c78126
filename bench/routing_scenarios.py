"""KV-aware routing on simulated workers: cache hits, TTFT and load spread, kv vs round-robin.

`graphs.agg_router:Frontend` with 8 mocker workers (configs/mocker-8.yaml), two scenarios:

  shared    long prompts whose first 90 % is one of several prefix groups: the hit rate against
            the best possible placement's, TTFT p50 against round-robin routing's.
  spread    prompts that share nothing: requests per worker (X-Tandem-Worker), max/mean.

(The cost of the request path itself is bench/request_path.py's.) docs/benchmarks.md,
"KV routing (mockers)", says how to read the numbers.

    python -m bench.routing_scenarios --runs 3 --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from app.openai.schema import ChatCompletionRequest, parse_request
from app.preprocess import Preprocessor
from app.router.hashing import block_hashes
from bench.harness import cli, load
from bench.harness.launch import REPO, SERVED_MODEL, Layout, ServedGraph, control_plane
from bench.harness.load import RequestResult
from bench.harness.report import publish, table
from bench.harness.stats import median, median_run, percentile

log = logging.getLogger(__name__)

DOCS_SECTION = "## KV routing (mockers)"
TIMEOUT_S = 60.0  # per request


@dataclass(frozen=True)
class Workload:
    words: int
    shared_ratio: float = 0.0
    groups: int = 1
    requests: int = 160
    concurrency: int = 16
    max_tokens: int = 16


# About 1.8k tokens with the tiny model's tokenizer. 20 groups, not a multiple of the worker
# count: a blind rotation must not line groups up with workers.
SHARED = Workload(words=1000, shared_ratio=0.9, groups=20)
SPREAD = Workload(words=256)
# The routings the shared-prefix scenario compares: label -> `tandem serve` overrides.
# kv's default overlap weight (2) weighs a cached block twice a block to compute: it keeps
# a group on the worker that holds it even while that worker prefills another group's
# first prompt; weight 1 shows what happens without that.
ROUTINGS: dict[str, tuple[str, ...]] = {
    "kv (default knobs)": ("--Router.policy=kv",),
    "kv, overlap-weight 1": ("--Router.policy=kv", "--Router.knobs={overlap-weight: 1}"),
    "round-robin": ("--Router.policy=round-robin",),
}
BASELINE = "round-robin"
DEFAULT_ROUTING = "kv (default knobs)"
MOCKERS = REPO / "configs" / "mocker-8.yaml"
# Each load phase stops starting requests after this long.
MAX_DURATION_S = 60.0


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


async def _drive(graph: ServedGraph, w: Workload, seed: int) -> tuple[list[dict[str, Any]], list[RequestResult], float]:
    bodies = [
        load.request_body(SERVED_MODEL, p, w.max_tokens)
        for p in load.prompts(w.requests, w.words, seed, w.shared_ratio, w.groups)
    ]
    results, wall = await load.drive(graph.base_url, load.CHAT_PATH, bodies, w.concurrency, MAX_DURATION_S, TIMEOUT_S)
    return bodies, results, wall


@dataclass
class SharedResult:
    hit_rate: float
    best_hit_rate: float
    ttft_p50_s: float
    requests_per_s: float
    failed: int


async def run_shared(graph: ServedGraph, seed: int, preprocessor: Preprocessor, block_size: int) -> SharedResult:
    bodies, outcomes, wall = await _drive(graph, SHARED, seed)
    # The oracle sees exactly the token ids the Processor sent to the workers.
    token_ids = await asyncio.to_thread(
        lambda: [
            preprocessor.preprocess(parse_request(ChatCompletionRequest, body), f"oracle-{i}").token_ids
            for i, body in enumerate(bodies[: len(outcomes)])
        ]
    )
    best = await asyncio.to_thread(best_possible_cached, token_ids, outcomes, block_size)
    ok = [(o, b) for o, b in zip(outcomes, best, strict=True) if o.ok]
    prompt_total = sum(o.prompt_tokens for o, _ in ok) or 1
    return SharedResult(
        hit_rate=sum(o.cached_tokens for o, _ in ok) / prompt_total,
        best_hit_rate=sum(b for _, b in ok) / prompt_total,
        ttft_p50_s=percentile([o.ttft_s for o, _ in ok if o.ttft_s is not None], 50),
        requests_per_s=len(ok) / wall,
        failed=load.count_failures(outcomes),
    )


@dataclass
class SpreadResult:
    per_worker: list[int]
    failed: int

    @property
    def max_over_mean(self) -> float:
        mean = statistics.fmean(self.per_worker) if self.per_worker else 0.0
        return max(self.per_worker) / mean if mean else math.nan


async def run_spread(graph: ServedGraph, seed: int) -> SpreadResult:
    _, outcomes, _ = await _drive(graph, SPREAD, seed)
    counts = Counter(o.worker for o in outcomes if o.ok)
    workers = await graph.instances("VllmWorker")
    return SpreadResult(sorted((counts.get(w, 0) for w in workers), reverse=True), load.count_failures(outcomes))


@dataclass
class Report:
    shared: dict[str, list[SharedResult]] = field(default_factory=dict)  # by routing
    spread: list[SpreadResult] = field(default_factory=list)


async def run_all(args: argparse.Namespace, workdir: Path) -> Report:
    report = Report()
    common = yaml.safe_load(MOCKERS.read_text())["Common"]
    # Off the event loop: loading transformers takes seconds, longer than a lease might wait.
    preprocessor = await asyncio.to_thread(Preprocessor, REPO / common["model"], max_model_len=common["max-model-len"])
    routings = list(ROUTINGS) if "shared" in args.scenarios else [DEFAULT_ROUTING] if "spread" in args.scenarios else []
    with control_plane(workdir) as (nats, etcd):
        for routing in routings:  # each on a fresh graph
            layout = Layout(MOCKERS, 8, routers=2, overrides=ROUTINGS[routing])
            name = "serve-" + routing.replace(" ", "").replace(",", "-")
            async with layout.serve(name, workdir, nats, etcd) as graph:
                # Each run brings new prefix groups (a new seed): earlier runs' cache contents only
                # take room, as an older workload's would.
                for run in range(1, args.runs + 1):
                    if "shared" in args.scenarios:
                        shared = await run_shared(graph, run, preprocessor, common["block-size"])
                        report.shared.setdefault(routing, []).append(shared)
                        log.info("shared, %s, run %d: %s", routing, run, shared)
                    if "spread" in args.scenarios and routing == DEFAULT_ROUTING:
                        report.spread.append(spread := await run_spread(graph, 100 + run))
                        log.info("spread, run %d: %s", run, spread)
    return report


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def render(report: Report, command: str, runs: int) -> str:
    lines = [f"Command: `{command}` (medians of {runs} run(s) each)", ""]
    if report.shared:
        baseline_ttft = median(r.ttft_p50_s for r in report.shared.get(BASELINE, []))
        rows = []
        for routing, results in report.shared.items():
            hit, best = median(r.hit_rate for r in results), median(r.best_hit_rate for r in results)
            of_best = median(r.hit_rate / r.best_hit_rate for r in results if r.best_hit_rate)
            ttft = median(r.ttft_p50_s for r in results)
            of_best_cell, speedup_cell = f"{of_best:.1%}", f"{baseline_ttft / ttft:.2f}"
            if routing != BASELINE:
                of_best_cell += f" {_met(of_best >= 0.95)}"
                speedup_cell += f" {_met(baseline_ttft / ttft >= 2)}"
            rps = f"{median(r.requests_per_s for r in results):.1f}"
            rows.append(
                [routing, f"{hit:.1%}", f"{best:.1%}", of_best_cell, f"{ttft * 1000:.0f} ms", speedup_cell, rps]
            )
        headings = (
            "routing | KV hit rate | best possible | hit / best (target >= 95 %) | TTFT p50"
            f" | {BASELINE} TTFT p50 / this (target >= 2) | requests/s"
        )
        lines.append(
            f"Shared prefixes: {SHARED.requests} chat requests of about {SHARED.words} words (~1.8k tokens), "
            f"the first {SHARED.shared_ratio:.0%} one of {SHARED.groups} prefixes, {SHARED.max_tokens} output "
            f"tokens, concurrency {SHARED.concurrency}."
        )
        lines += ["", *table(headings, rows), ""]
    if report.spread:
        spread = median_run(report.spread, lambda s: s.max_over_mean)
        per_worker, ratio = " / ".join(map(str, spread.per_worker)), spread.max_over_mean
        lines.append(
            f"No sharing (kv): {SPREAD.requests} requests of about {SPREAD.words} unrelated words, "
            f"concurrency {SPREAD.concurrency}; requests per worker {per_worker}: max / mean = {ratio:.2f} "
            f"(target <= 1.5: {_met(ratio <= 1.5)})."
        )
        lines.append("")
    failed = sum(r.failed for rs in report.shared.values() for r in rs) + sum(s.failed for s in report.spread)
    return "\n".join([*lines, f"Failed requests: {failed}."]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.parser("python -m bench.routing_scenarios", __doc__)
    parser.add_argument("--scenarios", nargs="+", choices=("shared", "spread"), default=["shared", "spread"])
    args = parser.parse_args(argv)
    cli.setup_logging()
    with cli.workdir(args.workdir) as workdir:
        report = cli.run(run_all(args, workdir))
    command = cli.command_line("python -m bench.routing_scenarios", argv)
    publish(render(report, command, args.runs), DOCS_SECTION, args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
