"""Aggregated against disaggregated serving on a mixed long/short load, two scenarios.

Each scenario runs two layouts with the same engines under `tandem serve`, one after the
other, each on its own namespace of one NATS and one etcd started here:

  --scenario mocker   simulated engines at scale: 8 aggregated workers (configs/mocker-8.yaml)
                      against 4 decode workers and 4 PrefillWorkers (configs/mocker-disagg.yaml)
  --scenario vllm     the real vLLM CPU engine and the tiny model on the same 2 cores: 2 workers
                      (configs/cpu-tiny.yaml) against a decode worker and a PrefillWorker that
                      hands the KV over NIXL (configs/cpu-tiny-disagg.yaml)

The load: closed loop, streamed chat requests with unrelated prompts, `--long-share` of them
long, a fixed number of output tokens (ignore_eos). TTFT, TPOT and inter-token latency for
long and short requests apart, and output tokens/s; each figure the median of `--runs` runs.
docs/benchmarks.md, "Aggregated vs disaggregated", says how to read them.

    python -m bench.disagg_scenarios --scenario mocker --runs 3 --write-docs docs/benchmarks.md
    python -m bench.disagg_scenarios --scenario vllm --runs 3 --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import dataclasses
import logging
import random
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.harness import cli, load
from bench.harness.launch import REPO, SERVED_MODEL, Layout, ServedGraph, control_plane
from bench.harness.load import RequestResult
from bench.harness.report import publish, table
from bench.harness.stats import median, percentile

log = logging.getLogger(__name__)

KINDS = ("long", "short")
CONFIGS = REPO / "configs"


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
            prompts.append(
                (kind, " ".join(rng.choices(load.WORDS, k=self.long_words if kind == "long" else self.short_words)))
            )
        return prompts


@dataclass(frozen=True)
class Scenario:
    docs_section: str
    layouts: dict[str, Layout]
    workload: Workload  # --requests and --concurrency change it
    stall_s: float  # a gap between tokens this long is a long prefill stalling the batch


SCENARIOS = {
    "mocker": Scenario(
        docs_section="## Aggregated vs disaggregated (mockers)",
        layouts={
            "aggregated": Layout(CONFIGS / "mocker-8.yaml", 8, routers=2),
            "disaggregated": Layout(
                CONFIGS / "mocker-disagg.yaml", 4, routers=2, prefill_workers=4, graph="graphs.disagg_router:Frontend"
            ),
        },
        workload=Workload(),
        # A decode step is ~10 ms and a short prompt's prefill ~25 ms, a 2k-token one's ~0.4 s.
        stall_s=0.1,
    ),
    "vllm": Scenario(
        docs_section="## Aggregated vs disaggregated (vLLM CPU, tiny model)",
        layouts={
            "aggregated": Layout(CONFIGS / "cpu-tiny.yaml", 2, routers=1),
            "disaggregated": Layout(
                CONFIGS / "cpu-tiny-disagg.yaml",
                1,
                routers=1,
                prefill_workers=1,
                graph="graphs.disagg_router:Frontend",
                # The shipped 64 sends nearly every chat prompt remote; here only long ones go.
                overrides=("--VllmWorker.max-local-prefill-length=512",),
            ),
        },
        # ~900 and ~100 prompt tokens (the configs' max-model-len is 2048).
        workload=Workload(requests=60, concurrency=4, long_share=0.3, long_words=500, short_words=50, max_tokens=32),
        # A decode step of a few sequences takes a few ms here; a 900-token prefill tens of ms.
        stall_s=0.05,
    ),
}
# Each run stops starting requests after this long.
MAX_DURATION_S = 60.0

# The figures of each kind of request, and how each is shown (latencies, measured in seconds, in ms).
COLUMNS = {
    "requests": "{:.0f}",
    "prompt tokens": "{:.0f}",
    "TTFT p50": "{:.0f} ms",
    "TTFT p99": "{:.0f} ms",
    "TPOT p50": "{:.1f} ms",
    "ITL p50": "{:.1f} ms",
    "ITL p99": "{:.1f} ms",
    "ITL p99.9": "{:.0f} ms",
    "stalled": "{:.0%}",
}


def kind_figures(results: Sequence[RequestResult], stall_s: float) -> dict[str, float]:
    """The COLUMNS of one kind's successful requests."""
    ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
    # Per request, (end-to-end - TTFT) / (output tokens - 1): the decode pace, however the
    # tokens were bunched into streamed chunks (a busy Frontend sends several per chunk).
    tpots = [
        (r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in results if r.ttft_s is not None and r.output_tokens > 1
    ]
    itls = [gap for r in results for gap in r.itl_s]
    return {
        "requests": len(results),
        "prompt tokens": statistics.fmean(r.prompt_tokens for r in results) if results else 0.0,  # server's count
        "TTFT p50": percentile(ttfts, 50),
        "TTFT p99": percentile(ttfts, 99),
        "TPOT p50": percentile(tpots, 50),
        # The stalls are a few gaps in a thousand: p99 barely sees them, p99.9 does.
        "ITL p50": percentile(itls, 50),
        "ITL p99": percentile(itls, 99),
        "ITL p99.9": percentile(itls, 99.9),
        # The share of requests that saw a gap >= stall_s between two tokens.
        "stalled": sum(max(r.itl_s, default=0.0) >= stall_s for r in results) / len(results) if results else 0.0,
    }


@dataclass
class RunResult:
    """One run of the workload on one layout."""

    by_kind: dict[str, dict[str, float]]
    output_tokens_per_s: float
    failed: int
    prefill_jobs: int = 0  # jobs the PrefillWorkers answered (0 when aggregated)


async def run_load(graph: ServedGraph, workload: Workload, seed: int, stall_s: float) -> RunResult:
    kinds, texts = zip(*workload.prompts(seed), strict=True)
    bodies = [load.request_body(SERVED_MODEL, text, workload.max_tokens) for text in texts]
    results, wall = await load.drive(graph.base_url, load.CHAT_PATH, bodies, workload.concurrency, MAX_DURATION_S)
    # Fewer results than prompts when MAX_DURATION_S ran out: those never sent are the last.
    ok = {kind: [r for k, r in zip(kinds, results, strict=False) if k == kind and r.ok] for kind in KINDS}
    return RunResult(
        by_kind={kind: kind_figures(ok[kind], stall_s) for kind in KINDS},
        output_tokens_per_s=sum(r.output_tokens for r in results if r.ok) / wall,
        failed=load.count_failures(results),
    )


async def prefill_jobs_done(graph: ServedGraph) -> int:
    """Jobs the graph's PrefillWorkers answered so far, summed over them."""
    assert graph.runtime is not None
    client, done = graph.runtime.client("PrefillWorker", "status"), 0
    for instance in await graph.instances("PrefillWorker"):
        done += int((await client.call({}, target=instance, timeout=5.0)).get("done", 0))
    return done


async def run_all(scenario: Scenario, runs: int, workdir: Path) -> dict[str, list[RunResult]]:
    """The runs of each layout, by layout name: one layout after the other."""
    runs_by_layout: dict[str, list[RunResult]] = {}
    warmup = dataclasses.replace(scenario.workload, requests=2 * scenario.workload.concurrency)
    with control_plane(workdir) as (nats, etcd):
        for name, layout in scenario.layouts.items():
            async with layout.serve(f"serve-{name}", workdir, nats, etcd) as graph:
                await run_load(graph, warmup, 0, scenario.stall_s)
                for run in range(1, runs + 1):
                    jobs_before = await prefill_jobs_done(graph) if layout.prefill_workers else 0
                    result = await run_load(graph, scenario.workload, run, scenario.stall_s)
                    if layout.prefill_workers:
                        result.prefill_jobs = await prefill_jobs_done(graph) - jobs_before
                    log.info("%s, run %d: %s", name, run, result)
                    runs_by_layout.setdefault(name, []).append(result)
    return runs_by_layout


def render(runs_by_layout: dict[str, list[RunResult]], command: str, runs: int, note: str, scenario: Scenario) -> str:
    rows = []
    for name, layout_runs in runs_by_layout.items():
        tokens_per_s = median(r.output_tokens_per_s for r in layout_runs)
        remote = median(r.prefill_jobs for r in layout_runs)
        for kind in KINDS:
            figures = {column: median(r.by_kind[kind][column] for r in layout_runs) for column in COLUMNS}
            cells = [fmt.format(figures[c] * (1000 if fmt.endswith(" ms") else 1)) for c, fmt in COLUMNS.items()]
            rows.append([f"{name}, {kind}", *cells, f"{tokens_per_s:.0f}", f"{remote:.0f}"])
    stalled = f"requests stalled >= {scenario.stall_s * 1000:.0f} ms"
    columns = [stalled if column == "stalled" else column for column in COLUMNS]
    headings = " | ".join(["layout", *columns, "output tok/s (all)", "prefilled remotely"])
    w = scenario.workload
    lines = [
        f"Command: `{command}` (medians of {runs} run(s) per layout)",
        "",
        note,
        "",
        (
            f"Load: {w.requests} streamed chat requests per run, concurrency {w.concurrency}, {w.long_share:.0%} long "
            f"(~{w.long_words} words) and the rest short (~{w.short_words} words), prompts sharing nothing, "
            f"{w.max_tokens} output tokens (ignore_eos)."
        ),
        "",
        *table(headings, rows),
        "",
        f"Failed requests: {sum(r.failed for rs in runs_by_layout.values() for r in rs)}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.parser("python -m bench.disagg_scenarios", __doc__)
    parser.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS),
        default="mocker",
        help="mocker: simulated engines at scale; vllm: the real CPU engine and the tiny model",
    )
    parser.add_argument("--requests", type=int, help="requests per run (default: the scenario's)")
    parser.add_argument("--concurrency", type=int, help="closed-loop clients (default: the scenario's)")
    args = parser.parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    changes = {name: getattr(args, name) for name in ("requests", "concurrency") if getattr(args, name) is not None}
    scenario = dataclasses.replace(scenario, workload=dataclasses.replace(scenario.workload, **changes))
    cli.setup_logging()
    note = cli.RunNote()  # this machine is shared: how busy it was says how far to trust the numbers
    with cli.workdir(args.workdir) as workdir:
        runs = cli.run(run_all(scenario, args.runs, workdir))
    command = cli.command_line("python -m bench.disagg_scenarios", argv)
    publish(render(runs, command, args.runs, str(note), scenario), scenario.docs_section, args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
