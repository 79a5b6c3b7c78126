"""Aggregated against disaggregated serving on a mixed long/short load, two scenarios.

Each scenario runs two layouts with the same engines under `tandem serve`, one after the
other, each on its own namespace of one NATS and one etcd started here (free loopback
ports):

`--scenario mocker` (simulated engines, at scale):
  aggregated      graphs.agg_router:Frontend, configs/mocker-8.yaml: 8 workers that
                  prefill and decode everything they are sent.
  disaggregated   graphs.disagg_router:Frontend, configs/mocker-disagg.yaml: 4 decode
                  workers and 4 PrefillWorkers; prompts past 512 tokens are prefilled
                  on a PrefillWorker and their KV "transferred" (a wait computed from
                  the KV bytes and the configured bandwidth).

`--scenario vllm` (the real vLLM CPU engine and the tiny model, same 2 cores):
  aggregated      graphs.agg_router:Frontend, configs/cpu-tiny.yaml: 2 VllmWorkers,
                  pinned to core 0 and core 1.
  disaggregated   graphs.disagg_router:Frontend, configs/cpu-tiny-disagg.yaml: 1 decode
                  VllmWorker on core 0 and 1 PrefillWorker on core 1; prompts past 512
                  tokens are prefilled on the PrefillWorker, their KV pulled over NIXL.

The load: closed loop, `--concurrency` clients, `--requests` streamed chat requests with
unrelated prompts, `--long-share` of them long, the rest short, a fixed number of output
tokens (ignore_eos). TTFT and inter-token latency are reported for long and short
requests separately, plus output tokens/s; each figure is the median of `--runs` runs.

    python -m bench.disagg_scenarios --scenario mocker --runs 3 --write-docs docs/benchmarks.md
    python -m bench.disagg_scenarios --scenario vllm --runs 3 --write-docs docs/benchmarks.md

Every process started here is stopped by its PID at the end, and each run stops
starting requests after --max-duration seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
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

KINDS = ("long", "short")


@dataclass(frozen=True)
class Layout:
    name: str
    graph: str
    config: Path
    decode_workers: int
    prefill_workers: int
    routers: int
    overrides: tuple[str, ...] = ()


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


@dataclass(frozen=True)
class Scenario:
    docs_section: str
    layouts: tuple[Layout, ...]
    workload: Workload  # the defaults; the command line may change requests, concurrency, share
    # A gap between tokens this long is a long prefill stalling the batch.
    stall_s: float
    reading_guide: str




@dataclass
class RunResult:
    """One run of the workload on one layout; latencies in seconds."""

    ttft_p50: dict[str, float]
    ttft_p99: dict[str, float]
    # Per request, (end-to-end - TTFT) / (output tokens - 1): the decode pace, however the
    # tokens were bunched into streamed chunks (a busy Frontend sends several per chunk).
    tpot_p50: dict[str, float]
    itl_p50: dict[str, float]
    itl_p99: dict[str, float]
    itl_p999: dict[str, float]  # the stalls are a few gaps in a thousand: p99 barely sees them
    stalled: dict[str, float]  # share of requests with a gap >= the scenario's stall_s between two tokens
    counts: dict[str, int]
    prompt_tokens: dict[str, float]  # mean, by the server's count
    output_tokens_per_s: float
    failed: int
    prefill_jobs: int  # jobs the PrefillWorkers answered (0 when aggregated)


@dataclass
class Report:
    runs: dict[str, list[RunResult]] = field(default_factory=dict)  # by layout name


async def run_load(url: str, model: str, workload: Workload, seed: int, max_duration_s: float, stall_s: float) -> RunResult:
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
        elif metric == "tpot":
            values = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1)
                      for r in ok[kind] if r.ttft_s is not None and r.output_tokens > 1]
        else:
            values = [gap for r in ok[kind] for gap in r.itl_s]
        return loadgen.percentile(values, q)

    return RunResult(
        ttft_p50={k: pct(k, "ttft", 50) for k in KINDS},
        ttft_p99={k: pct(k, "ttft", 99) for k in KINDS},
        tpot_p50={k: pct(k, "tpot", 50) for k in KINDS},
        itl_p50={k: pct(k, "itl", 50) for k in KINDS},
        itl_p99={k: pct(k, "itl", 99) for k in KINDS},
        itl_p999={k: pct(k, "itl", 99.9) for k in KINDS},
        stalled={k: sum(max(r.itl_s, default=0.0) >= stall_s for r in ok[k]) / len(ok[k]) if ok[k] else 0.0
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


def workload_of(scenario: Scenario, args: argparse.Namespace) -> Workload:
    """The scenario's load with the command line's changes."""
    changes = {name: getattr(args, name) for name in ("requests", "concurrency", "long_share")}
    return dataclasses.replace(scenario.workload, **{k: v for k, v in changes.items() if v is not None})


async def run_layout(scenario: Scenario, layout: Layout, args: argparse.Namespace, nats_url: str, etcd_url: str,
                     workdir: Path, report: Report) -> None:
    log_path = workdir / f"serve-{layout.name}.log"
    workload = workload_of(scenario, args)
    async with ServedGraph(layout.config, layout.overrides, nats_url, etcd_url, log_path, graph=layout.graph) as graph:
        await graph.wait_ready(layout.decode_workers, layout.routers)
        if layout.prefill_workers:
            await wait_for_prefill_workers(graph, layout.prefill_workers)
        warmup = dataclasses.replace(workload, requests=2 * workload.concurrency)
        await run_load(graph.url, args.model, warmup, 0, args.max_duration, scenario.stall_s)
        for run in range(1, args.runs + 1):
            jobs_before = await prefill_jobs_done(graph) if layout.prefill_workers else 0
            result = await run_load(graph.url, args.model, workload, run, args.max_duration, scenario.stall_s)
            if layout.prefill_workers:
                result.prefill_jobs = await prefill_jobs_done(graph) - jobs_before
            log.info("%s, run %d: %s", layout.name, run, result)
            report.runs.setdefault(layout.name, []).append(result)


async def run_all(scenario: Scenario, args: argparse.Namespace, workdir: Path) -> Report:
    report = Report()
    nats = NatsServer("127.0.0.1", free_port(), free_port(), workdir / "nats")
    etcd = EtcdServer("127.0.0.1", free_port(), free_port(), workdir / "etcd")
    try:
        nats.start()
        etcd.start()
        for layout in scenario.layouts:
            if layout.name in args.layouts:
                await run_layout(scenario, layout, args, nats.url, etcd.url, workdir, report)
    finally:
        etcd.stop()
        nats.stop()
    return report


# --- the report -------------------------------------------------------------------------


def _median(runs: Sequence[RunResult], pick: Any) -> float:
    return statistics.median(pick(r) for r in runs)


def render(report: Report, command: str, scenario: Scenario, args: argparse.Namespace) -> str:
    workload = workload_of(scenario, args)
    lines = [
        f"Command: `{command}` (medians of {args.runs} run(s) per layout)",
        "",
        f"Load: {workload.requests} streamed chat requests per run, concurrency {workload.concurrency}, "
        f"{workload.long_share:.0%} long (~{workload.long_words} words) and the rest short "
        f"(~{workload.short_words} words), prompts sharing nothing, {workload.max_tokens} output tokens "
        "(ignore_eos).",
        "",
        f"| layout | requests | prompt tokens | TTFT p50 | TTFT p99 | TPOT p50 | ITL p50 | ITL p99 | ITL p99.9 "
        f"| requests stalled >= {scenario.stall_s * 1000:.0f} ms | output tok/s (all) | prefilled remotely |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
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
                f"| {_median(runs, lambda r: r.tpot_p50[kind]) * 1000:.1f} ms "
                f"| {_median(runs, lambda r: r.itl_p50[kind]) * 1000:.1f} ms "
                f"| {_median(runs, lambda r: r.itl_p99[kind]) * 1000:.1f} ms "
                f"| {_median(runs, lambda r: r.itl_p999[kind]) * 1000:.0f} ms "
                f"| {_median(runs, lambda r: r.stalled[kind]):.0%} "
                f"| {tokens_per_s:.0f} | {remote:.0f} |"
            )
    failed = sum(r.failed for runs in report.runs.values() for r in runs)
    lines += ["", f"Failed requests: {failed}.", "", scenario.reading_guide]
    return "\n".join(lines) + "\n"


MOCKER_READING_GUIDE = """\
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
- ITL is the gap between streamed chunks as the client sees them; TPOT is a request's
  time per output token after the first, however they were bunched into chunks. The
  Frontend, NATS and the load generator share this 2-core machine with the 8 engines and
  other work, so absolute times move by tens of percent from run to run; the contrast
  between the layouts is the point.
"""


VLLM_READING_GUIDE = """\
How to read these numbers:

- Same 2 cores, same engine, same model (the tiny random-weight Llama, `enforce-eager`,
  block size 32, prefix caching on, prompts sharing nothing). Aggregated is
  `configs/cpu-tiny.yaml`: two VllmWorkers, one pinned to each core, each prefilling and
  decoding what the KV router sends it. Disaggregated is `configs/cpu-tiny-disagg.yaml`:
  one decode VllmWorker on core 0 and one PrefillWorker on core 1; prompts past 512
  tokens (all the long ones: "prefilled remotely") go through the JetStream queue to the
  PrefillWorker, and the decode engine pulls their KV over NIXL (UCX, CPU memory). Each
  engine really runs on its own core since the fourth session: before, vLLM's NIXL
  connector pinned both to core 1 (docs/internals.md), and the table measured then had
  the disaggregated decode at ~35 ms per token.
- Decode pace is the same in both layouts (TPOT p50 ~12 ms): one engine decodes every
  request where two did, and a few more sequences in a step cost little. Output tokens/s
  is lower disaggregated (107 against 130) because one core does all the decoding while
  the prefill core idles between long prompts (about one request in three is long).
- Long prompts pay for the hand-off: TTFT p50 about doubles (the queue hop, the prefill on
  its own core, the answer over NATS, the NIXL pull, then the decode engine's first step
  behind the requests it is decoding), and TTFT p99 grows more, because the one
  PrefillWorker takes one job at a time (`max-concurrent-jobs: 1`): long prompts that
  arrive together wait for each other.
- Short prompts gain: their TTFT p50 is lower disaggregated (116 against 158 ms), since
  no long prefill runs on the engine they wait for. The tails (TTFT p99, ITL p99.9) move
  by 2x between runs of this command at this size, as the serving processes (Frontend,
  Router, NATS, the load generator) wait for cores the engines keep busy: read them as
  noise. The benefit grows where a long prefill costs far more than a decode step and
  many requests decode together (a large model on GPUs): the mocker scenario above
  models that.
- ITL p50 near 0 ms means most chunks arrive bunched: the busy engine cores leave the
  Frontend little CPU, so it forwards several tokens at once. TPOT is the fair
  decode-pace comparison. The machine was shared with other work (load average above);
  treat differences under about 20 % as noise.
"""


CONFIGS = REPO / "configs"
MOCKER = Scenario(
    docs_section="## Aggregated vs disaggregated (mockers)",
    layouts=(
        Layout("aggregated", "graphs.agg_router:Frontend", CONFIGS / "mocker-8.yaml", 8, 0, routers=2),
        Layout("disaggregated", "graphs.disagg_router:Frontend", CONFIGS / "mocker-disagg.yaml", 4, 4, routers=2),
    ),
    workload=Workload(),
    # A decode step is ~10 ms and a short prompt's prefill ~25 ms, a 2k-token one's ~0.4 s.
    stall_s=0.1,
    reading_guide=MOCKER_READING_GUIDE,
)
VLLM = Scenario(
    docs_section="## Aggregated vs disaggregated (vLLM CPU, tiny model)",
    layouts=(
        Layout("aggregated", "graphs.agg_router:Frontend", CONFIGS / "cpu-tiny.yaml", 2, 0, routers=1),
        Layout(
            "disaggregated", "graphs.disagg_router:Frontend", CONFIGS / "cpu-tiny-disagg.yaml", 1, 1, routers=1,
            # The shipped 64 sends nearly every chat prompt remote; here only the long ones go.
            overrides=("--VllmWorker.max-local-prefill-length=512",),
        ),
    ),
    # ~900 and ~100 prompt tokens (the configs' max-model-len is 2048).
    workload=Workload(requests=60, concurrency=4, long_share=0.3, long_words=500, short_words=50, max_tokens=32),
    # A decode step of a few sequences takes a few ms here; a 900-token prefill tens of ms.
    stall_s=0.05,
    reading_guide=VLLM_READING_GUIDE,
)
SCENARIOS = {"mocker": MOCKER, "vllm": VLLM}


def machine_note(started: float, load_before: tuple[float, ...], load_after: tuple[float, ...]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    minutes = (time.time() - started) / 60
    return (f"Run {when}, {minutes:.0f} min, on {os.cpu_count()} CPUs; load average "
            f"{' '.join(f'{x:.2f}' for x in load_before)} before, {' '.join(f'{x:.2f}' for x in load_after)} after.")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.disagg_scenarios", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama", help="the served model name")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="mocker",
                        help="mocker: simulated engines at scale; vllm: the real CPU engine and the tiny model")
    parser.add_argument("--layouts", nargs="+", choices=["aggregated", "disaggregated"],
                        default=["aggregated", "disaggregated"])
    parser.add_argument("--runs", type=int, default=3, help="repetitions per layout; the report gives medians")
    parser.add_argument("--requests", type=int, help="requests per run (default: the scenario's)")
    parser.add_argument("--concurrency", type=int, help="closed-loop clients (default: the scenario's)")
    parser.add_argument("--long-share", type=float, help="share of long prompts (default: the scenario's)")
    parser.add_argument("--max-duration", type=float, default=60.0, help="per run, seconds")
    parser.add_argument("--workdir", type=Path, help="keep servers' data and logs here (default: a temporary folder)")
    parser.add_argument("--write-docs", type=Path, help="put the results in this markdown file's section")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load_before, started = os.getloadavg(), time.time()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(run_all(scenario, args, args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="disagg-scenarios-") as workdir:
            report = asyncio.run(run_all(scenario, args, Path(workdir)))
    command = "python -m bench.disagg_scenarios " + " ".join(argv if argv is not None else sys.argv[1:])
    table = render(report, command.strip(), scenario, args)
    # This machine is shared: how busy it was says how far to trust the numbers.
    table = table.replace("\n\n", f"\n\n{machine_note(started, load_before, os.getloadavg())}\n\n", 1)
    sys.stdout.write(table)
    if args.write_docs is not None:
        write_section(args.write_docs, f"{scenario.docs_section}\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
