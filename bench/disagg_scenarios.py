"""Aggregated against disaggregated serving on simulated workers, on a mixed long/short load.

Runs two layouts of mocker engines with the same per-engine timing under `tandem serve`,
each on its own namespace of one NATS and one etcd started here (free loopback ports):

  aggregated      graphs.agg_router:Frontend, configs/mocker-8.yaml: 8 workers that
                  prefill and decode everything they are sent.
  disaggregated   graphs.disagg_router:Frontend, configs/mocker-disagg.yaml: 4 decode
                  workers and 4 PrefillWorkers; prompts past 512 tokens are prefilled
                  on a PrefillWorker and their KV "transferred" (a wait computed from
                  the KV bytes and the configured bandwidth).

The load: closed loop, `--concurrency` clients, `--requests` streamed chat requests with
unrelated prompts, `--long-share` of them long (~2k tokens), the rest short (~100),
64 output tokens each (ignore_eos). TTFT and inter-token latency are reported for long
and short requests separately, plus output tokens/s; each figure is the median of
`--runs` runs.

    python -m bench.disagg_scenarios --runs 3 --write-docs docs/benchmarks.md

Every process started here is stopped by its PID at the end, and each run stops
starting requests after --max-duration seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from app.infra import EtcdServer, NatsServer, free_port
from bench import loadgen
from bench.docs import write_section
from bench.routing_scenarios import REPO, ServedGraph

log = logging.getLogger(__name__)

DOCS_SECTION = "## Aggregated vs disaggregated (mockers)"
KINDS = ("long", "short")
# A gap between tokens this long is a long prefill stalling the batch: a decode step is
# ~10 ms and a short prompt's prefill ~25 ms, a 2k-token one's ~0.4 s.
STALL_S = 0.1


@dataclass(frozen=True)
class Layout:
    name: str
    graph: str
    config: Path
    decode_workers: int
    prefill_workers: int


LAYOUTS = (
    Layout("aggregated", "graphs.agg_router:Frontend", REPO / "configs" / "mocker-8.yaml", 8, 0),
    Layout("disaggregated", "graphs.disagg_router:Frontend", REPO / "configs" / "mocker-disagg.yaml", 4, 4),
)
ROUTERS = 2  # both configs run 2 Router replicas


@dataclass(frozen=True)
class Workload:
    requests: int = 200
    concurrency: int = 16
    long_share: float = 0.3
    # The tiny model's tokenizer makes about 1.8 tokens of a loadgen word: ~2k and ~100 tokens.
    long_words: int = 1100
    short_words: int = 50
    max_tokens: int = 64

    def prompts(self, seed: int) -> list[tuple[str, str]]:
        """(kind, prompt) in sending order; prompts share nothing, so no prefix cache helps."""
        rng = random.Random(f"disagg:{seed}")
        prompts = []
        for _ in range(self.requests):
            kind = "long" if rng.random() < self.long_share else "short"
            words = self.long_words if kind == "long" else self.short_words
            prompts.append((kind, " ".join(rng.choices(loadgen.WORDS, k=words))))
        return prompts


@dataclass
class RunResult:
    """One run of the workload on one layout; latencies in seconds."""

    ttft_p50: dict[str, float]
    ttft_p99: dict[str, float]
    itl_p50: dict[str, float]
    itl_p99: dict[str, float]
    itl_p999: dict[str, float]  # the stalls are a few gaps in a thousand: p99 barely sees them
    stalled: dict[str, float]  # share of requests with a gap >= STALL_S between two tokens
    counts: dict[str, int]
    prompt_tokens: dict[str, float]  # mean, by the server's count
    output_tokens_per_s: float
    failed: int
    prefill_jobs: int  # jobs the PrefillWorkers answered (0 when aggregated)


@dataclass
class Report:
    runs: dict[str, list[RunResult]] = field(default_factory=dict)  # by layout name


async def run_load(url: str, model: str, workload: Workload, seed: int, max_duration_s: float) -> RunResult:
    config = loadgen.LoadConfig(url=url, model=model, max_tokens=workload.max_tokens, ignore_eos=True, timeout_s=120.0)
    pending = iter(workload.prompts(seed))
    results: list[tuple[str, loadgen.RequestResult]] = []
    deadline = time.monotonic() + max_duration_s
    connector = aiohttp.TCPConnector(limit=workload.concurrency, socket_factory=loadgen._nodelay_socket)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            for kind, prompt in pending:
                if time.monotonic() >= deadline:
                    return
                results.append((kind, await loadgen.send_request(session, config, prompt)))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(workload.concurrency)))
        wall = time.perf_counter() - started
    ok = {kind: [r for k, r in results if k == kind and r.ok] for kind in KINDS}
    failed = [r for _, r in results if not r.ok]
    for result in failed[:3]:
        log.warning("request failed: %s: %s", result.error_kind, result.error_message)

    def pct(kind: str, metric: str, q: float) -> float:
        if metric == "ttft":
            values = [r.ttft_s for r in ok[kind] if r.ttft_s is not None]
        else:
            values = [gap for r in ok[kind] for gap in r.itl_s]
        return loadgen.percentile(values, q)

    return RunResult(
        ttft_p50={k: pct(k, "ttft", 50) for k in KINDS},
        ttft_p99={k: pct(k, "ttft", 99) for k in KINDS},
        itl_p50={k: pct(k, "itl", 50) for k in KINDS},
        itl_p99={k: pct(k, "itl", 99) for k in KINDS},
        itl_p999={k: pct(k, "itl", 99.9) for k in KINDS},
        stalled={k: sum(max(r.itl_s, default=0.0) >= STALL_S for r in ok[k]) / len(ok[k]) if ok[k] else 0.0
                 for k in KINDS},
        counts={k: len(ok[k]) for k in KINDS},
        prompt_tokens={k: statistics.fmean(r.prompt_tokens for r in ok[k]) if ok[k] else 0.0 for k in KINDS},
        output_tokens_per_s=sum(r.output_tokens for _, r in results if r.ok) / wall,
        failed=len(failed),
        prefill_jobs=0,
    )


async def prefill_jobs_done(graph: ServedGraph) -> int:
    """Jobs the graph's PrefillWorkers answered so far, summed over them."""
    assert graph.runtime is not None
    client = graph.runtime.client("PrefillWorker", "status")
    total = 0
    for instance_id in await graph.instances("PrefillWorker", "status"):
        counters = await client.call({}, target=instance_id, timeout=5.0)
        total += int(counters.get("done", 0))
    return total


async def wait_for_prefill_workers(graph: ServedGraph, count: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(await graph.instances("PrefillWorker", "status")) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} PrefillWorkers after {timeout_s:.0f} s; see {graph.log_path}")
        await asyncio.sleep(0.5)


async def run_layout(layout: Layout, args: argparse.Namespace, nats_url: str, etcd_url: str, workdir: Path,
                     report: Report) -> None:
    log_path = workdir / f"serve-{layout.name}.log"
    workload = Workload(requests=args.requests, concurrency=args.concurrency, long_share=args.long_share)
    async with ServedGraph(layout.config, [], nats_url, etcd_url, log_path, graph=layout.graph) as graph:
        await graph.wait_ready(layout.decode_workers, ROUTERS)
        if layout.prefill_workers:
            await wait_for_prefill_workers(graph, layout.prefill_workers)
        warmup = Workload(requests=2 * workload.concurrency, concurrency=workload.concurrency,
                          long_share=workload.long_share)
        await run_load(graph.url, args.model, warmup, 0, args.max_duration)
        for run in range(1, args.runs + 1):
            jobs_before = await prefill_jobs_done(graph) if layout.prefill_workers else 0
            result = await run_load(graph.url, args.model, workload, run, args.max_duration)
            if layout.prefill_workers:
                result.prefill_jobs = await prefill_jobs_done(graph) - jobs_before
            log.info("%s, run %d: %s", layout.name, run, result)
            report.runs.setdefault(layout.name, []).append(result)


async def run_all(args: argparse.Namespace, workdir: Path) -> Report:
    report = Report()
    nats = NatsServer("127.0.0.1", free_port(), free_port(), workdir / "nats")
    etcd = EtcdServer("127.0.0.1", free_port(), free_port(), workdir / "etcd")
    try:
        nats.start()
        etcd.start()
        for layout in LAYOUTS:
            if layout.name in args.layouts:
                await run_layout(layout, args, nats.url, etcd.url, workdir, report)
    finally:
        etcd.stop()
        nats.stop()
    return report


# --- the report -------------------------------------------------------------------------


def _median(runs: Sequence[RunResult], pick: Any) -> float:
    return statistics.median(pick(r) for r in runs)


def render(report: Report, command: str, args: argparse.Namespace) -> str:
    workload = Workload(requests=args.requests, concurrency=args.concurrency, long_share=args.long_share)
    lines = [
        f"Command: `{command}` (medians of {args.runs} run(s) per layout)",
        "",
        f"Load: {workload.requests} streamed chat requests per run, concurrency {workload.concurrency}, "
        f"{workload.long_share:.0%} long (~{workload.long_words} words) and the rest short "
        f"(~{workload.short_words} words), prompts sharing nothing, {workload.max_tokens} output tokens "
        "(ignore_eos).",
        "",
        f"| layout | requests | prompt tokens | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | ITL p99.9 "
        f"| requests stalled >= {STALL_S * 1000:.0f} ms | output tok/s (all) | prefilled remotely |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in report.runs.items():
        tokens_per_s = _median(runs, lambda r: r.output_tokens_per_s)
        remote = _median(runs, lambda r: r.prefill_jobs)
        for kind in KINDS:
            lines.append(
                f"| {name}, {kind} | {_median(runs, lambda r: r.counts[kind]):.0f} "
                f"| {_median(runs, lambda r: r.prompt_tokens[kind]):.0f} "
                f"| {_median(runs, lambda r: r.ttft_p50[kind]) * 1000:.0f} ms "
                f"| {_median(runs, lambda r: r.ttft_p99[kind]) * 1000:.0f} ms "
                f"| {_median(runs, lambda r: r.itl_p50[kind]) * 1000:.1f} ms "
                f"| {_median(runs, lambda r: r.itl_p99[kind]) * 1000:.1f} ms "
                f"| {_median(runs, lambda r: r.itl_p999[kind]) * 1000:.0f} ms "
                f"| {_median(runs, lambda r: r.stalled[kind]):.0%} "
                f"| {tokens_per_s:.0f} | {remote:.0f} |"
            )
    failed = sum(r.failed for runs in report.runs.values() for r in runs)
    lines += ["", f"Failed requests: {failed}.", "", READING_GUIDE]
    return "\n".join(lines) + "\n"


READING_GUIDE = """\
How to read these numbers:

- Both layouts run the same simulated engine (the mocker, `speedup-ratio: 1`): prefill
  about 5k tokens/s (5 ms + 0.2 ms per token), a decode step about 10 ms, 640 KV blocks of
  16 tokens, and both have 8 engines. Aggregated is `configs/mocker-8.yaml` (8 workers);
  disaggregated is `configs/mocker-disagg.yaml` (4 decode workers + 4 PrefillWorkers;
  prompts past 512 tokens are prefilled remotely while the prefill queue holds fewer
  than 8 jobs, so every long prompt went remote: "prefilled remotely"). The KV hand-off
  costs 128 KiB per prompt token (an 8B Llama-3-like model in bf16) over 25 GB/s: about
  10 ms for a 2k-token prompt, plus the work queue and the `prefill_done` call over NATS.
- Aggregated: a worker's step runs prefills and decodes together, so a 2k-token prompt
  (~0.4 s of prefill in one chunk) stalls every request decoding on that worker for that
  step, and delays every request queued behind it. "Requests stalled" is the share of
  requests that saw at least one gap of 100 ms or more between two tokens: only a long
  prefill makes one. With 16 requests over 8 workers, such a stall is a few gaps in a
  thousand, so ITL p50 and p99 (the plain decode step, and short prefills of ~25 ms)
  barely move; ITL p99.9 and the stalled share are where it shows, and the short
  requests' TTFT p99, which is a short prompt waiting behind a long prefill.
- Disaggregated: decode workers only prefill short prompts, so nothing stalls their
  batch for long: the stalled share drops to about zero, ITL p99.9 falls to tens of
  milliseconds (a short prefill, plus this busy machine's noise), and short requests'
  TTFT p99 drops several-fold. The price is the
  long requests' TTFT: the queue hop, the answer over NATS and the transfer come on top
  of the prefill, and only 4 engines (not 8) prefill long prompts, so their TTFT p99
  rises when several arrive at once. Decode workers hold twice the requests each, which
  costs little here (0.05 ms per extra sequence in a step); output tokens/s is higher
  because no decode step waits for a long prefill.
- ITL is the gap between streamed chunks as the client sees them. The Frontend, NATS and
  the load generator share this 2-core machine with the 8 engines and other work, so
  absolute times move by tens of percent from run to run; the contrast between the
  layouts is the point.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.disagg_scenarios", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama", help="the served model name")
    parser.add_argument("--layouts", nargs="+", choices=[layout.name for layout in LAYOUTS],
                        default=[layout.name for layout in LAYOUTS])
    parser.add_argument("--runs", type=int, default=3, help="repetitions per layout; the report gives medians")
    parser.add_argument("--requests", type=int, default=200, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--long-share", type=float, default=0.3, help="share of long (~2k-token) prompts")
    parser.add_argument("--max-duration", type=float, default=60.0, help="per run, seconds")
    parser.add_argument("--workdir", type=Path, help="keep servers' data and logs here (default: a temporary folder)")
    parser.add_argument("--write-docs", type=Path, help="put the results in this markdown file's section")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(run_all(args, args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="disagg-scenarios-") as workdir:
            report = asyncio.run(run_all(args, Path(workdir)))
    command = "python -m bench.disagg_scenarios " + " ".join(argv if argv is not None else sys.argv[1:])
    table = render(report, command.strip(), args)
    sys.stdout.write(table)
    if args.write_docs is not None:
        write_section(args.write_docs, f"{DOCS_SECTION}\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
