"""Aggregated against disaggregated serving on a mixed long/short load: mockers, or vLLM CPU."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.harness import cli
from bench.harness.launch import REPO, SERVED_MODEL, Layout, ServedGraph, control_plane, measure_layouts
from bench.harness.load import RequestResult
from bench.harness.report import cells, table
from bench.harness.stats import Phase, Summary, median_rows, summarize
from bench.loadgen import LoadConfig, run_load

log = logging.getLogger(__name__)

CONFIGS = REPO / "configs"
DISAGG_ROUTER = "graphs.disagg_router:Frontend"


@dataclass(frozen=True)
class Scenario:
    section: str
    layouts: dict[str, Layout]
    load: LoadConfig  # streamed chat requests, unrelated prompts, `long_share` of them long
    stall_s: float  # a gap between tokens this long is a long prefill stalling the batch


LOAD = LoadConfig(url="", model=SERVED_MODEL, ignore_eos=True, max_duration_s=60.0, long_share=0.3)
SCENARIOS = {
    "mocker": Scenario(
        "## Aggregated vs disaggregated (mockers)",
        {
            "aggregated": Layout(CONFIGS / "mocker-8.yaml", 8, routers=2),
            "disaggregated": Layout(
                CONFIGS / "mocker-disagg.yaml", 4, routers=2, prefill_workers=4, graph=DISAGG_ROUTER
            ),
        },
        # The tiny model's tokenizer makes about 1.8 tokens of a loadgen word: ~2k and ~100 tokens.
        dataclasses.replace(LOAD, concurrency=16, requests=200, prompt_tokens=50, long_prompt_tokens=1100),
        # A decode step is ~10 ms and a short prompt's prefill ~25 ms, a 2k-token one's ~0.4 s.
        stall_s=0.1,
    ),
    "vllm": Scenario(
        "## Aggregated vs disaggregated (vLLM CPU, tiny model)",
        {
            "aggregated": Layout(CONFIGS / "cpu-tiny.yaml", 2, routers=1),
            "disaggregated": Layout(
                CONFIGS / "cpu-tiny-disagg.yaml",
                1,
                routers=1,
                prefill_workers=1,
                # The shipped 64 sends nearly every chat prompt remote; here only long ones go.
                overrides=("--VllmWorker.max-local-prefill-length=512",),
                graph=DISAGG_ROUTER,
            ),
        },
        # ~900 and ~100 prompt tokens (the configs' max-model-len is 2048).
        dataclasses.replace(LOAD, concurrency=4, requests=60, prompt_tokens=50, long_prompt_tokens=500, max_tokens=32),
        # A decode step of a few sequences takes a few ms here; a 900-token prefill tens of ms.
        stall_s=0.05,
    ),
}
# The table's columns after the layout: heading -> (figure, format); the load's tokens/s and the
# remote prefills are the whole load's, the rest are each kind's.
COLUMNS = {
    "requests": ("completed", "{:.0f}"),
    "prompt tokens": ("mean_prompt_tokens", "{:.0f}"),
    "TTFT p50": ("ttft_p50_s", "{:.0f} ms"),
    "TTFT p99": ("ttft_p99_s", "{:.0f} ms"),
    "TPOT p50": ("tpot_p50_s", "{:.1f} ms"),
    "ITL p50": ("itl_p50_s", "{:.1f} ms"),
    "ITL p99": ("itl_p99_s", "{:.1f} ms"),
    "ITL p99.9": ("itl_p999_s", "{:.0f} ms"),
    "requests stalled": ("stalled", "{:.0%}"),
    "output tok/s (all)": ("all_output_tokens_per_second", "{:.0f}"),
    "prefilled remotely": ("prefill_jobs", "{:.0f}"),
}


async def prefill_jobs_done(graph: ServedGraph) -> int:
    """Jobs the graph's PrefillWorkers answered so far, summed over them."""
    assert graph.runtime is not None
    client, done = graph.runtime.client("PrefillWorker", "status"), 0
    for instance in await graph.instances("PrefillWorker"):
        done += int((await client.call({}, target=instance, timeout=5.0)).get("done", 0))
    return done


def load_of(args: argparse.Namespace) -> LoadConfig:
    """The scenario's load, with --requests where given."""
    load = SCENARIOS[args.scenario].load
    return dataclasses.replace(load, requests=args.requests or load.requests)


def by_kind(
    layout: str, load: LoadConfig, results: list[RequestResult], whole: Summary, stall_s: float, prefill_jobs: int
) -> list[Phase]:
    """A row for the long requests of a run, one for the short: their Summary, and the share of them that
    saw a gap >= stall_s between two tokens; the whole load's output tokens/s and remote prefills."""
    phases = []
    for kind in ("long", "short"):
        # Fewer results than requests when max_duration_s ran out: those never sent are the last.
        kept = [r for i, r in enumerate(results) if load.is_long(i) == (kind == "long")]
        ok = [r for r in kept if r.ok]
        stalled = sum(max(r.itl_s, default=0.0) >= stall_s for r in ok) / len(ok) if ok else 0.0
        extra = {
            "stalled": stalled,
            "all_output_tokens_per_second": whole.output_token_throughput,
            "prefill_jobs": prefill_jobs,
        }
        phases.append(Phase((f"{layout}, {kind}",), summarize(kept, whole.duration_s), extra))
    return phases


async def measure(args: argparse.Namespace, workdir: Path) -> list[Phase]:
    scenario, phases = SCENARIOS[args.scenario], []

    async def run(layout: str, graph: ServedGraph, run: int) -> None:
        load = dataclasses.replace(load_of(args), url=graph.base_url, seed=run)
        if run == 1:
            await run_load(dataclasses.replace(load, requests=2 * load.concurrency, seed=0))  # a warm-up
        jobs_before = await prefill_jobs_done(graph)
        whole, results = await run_load(load)
        log.info("%s, run %d: %s", layout, run, whole.as_text().splitlines()[0])
        jobs = await prefill_jobs_done(graph) - jobs_before
        phases.extend(by_kind(layout, load, results, whole, scenario.stall_s, prefill_jobs=jobs))

    with control_plane(workdir) as plane:
        await measure_layouts(scenario.layouts, workdir, plane, args.runs, run)
    return phases


def render(phases: list[Phase], args: argparse.Namespace) -> list[str]:
    scenario, load = SCENARIOS[args.scenario], load_of(args)
    headings = [f"{h} >= {scenario.stall_s * 1000:.0f} ms" if h == "requests stalled" else h for h in COLUMNS]
    rows = [[*row, *cells(figures, COLUMNS.values())] for row, figures in median_rows(phases).items()]
    return [
        f"Load: {load.requests} streamed chat requests per run, concurrency {load.concurrency}, {load.long_share:.0%} "
        f"long (~{load.long_prompt_tokens} words) and the rest short (~{load.prompt_tokens} words), prompts sharing "
        f"nothing, {load.max_tokens} output tokens (ignore_eos).",
        "",
        *table(" | ".join(["layout", *headings]), rows),
        "",
        f"Failed requests: {sum(p.summary.failed for p in phases)}.",
    ]


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", choices=SCENARIOS, default="mocker", help="simulated engines, or vLLM CPU")


def main(argv: Sequence[str] | None = None) -> int:
    section = lambda args: SCENARIOS[args.scenario].section  # noqa: E731 (the section depends on --scenario)
    return cli.main("bench.disagg_scenarios", argv, section, measure, render, options)


if __name__ == "__main__":
    sys.exit(main())
