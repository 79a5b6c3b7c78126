"""Tandem against the same vLLM engine served directly, side by side, on this machine.

Alternately (direct, Tandem, Tandem, direct, ...) one system at a time: vLLM's own OpenAI server
or Tandem's agg_router graph with one VllmWorker, both with the same engine arguments and CPU
pinning, each measured with bench.loadgen at every concurrency and stopped by PID before the other
starts, so the two engines never compete. Prints medians over the repeats and the ratio Tandem /
direct; `--write-docs` also puts them, the command and the machine in docs/benchmarks.md.

    .venv/bin/python -m bench.vs_direct --repeats 3 --write-docs
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import statistics
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from app.launch.ports import free_port
from bench.harness import cli
from bench.harness.launch import REPO, ServedGraph, ServedProcess, control_plane
from bench.harness.report import table, write_section
from bench.harness.stats import median
from bench.loadgen import LoadConfig, Summary, run_load

log = logging.getLogger("bench.vs_direct")

DOCS_PATH = REPO / "docs" / "benchmarks.md"
SECTION_TITLE = "## Tandem vs direct vLLM (CPU, tiny model)"
START_TIMEOUT_S = 300.0
TARGET = 0.9  # Tandem's output tokens/s at least this share of direct's

System = Literal["direct", "tandem"]
SYSTEMS: tuple[System, ...] = ("direct", "tandem")


@dataclass(frozen=True)
class EngineSettings:
    """The engine arguments both systems get, so the only difference is what serves them."""

    model: Path
    block_size: int
    max_model_len: int
    dtype: str
    cpu_bind: str  # VLLM_CPU_OMP_THREADS_BIND of both engines
    kvcache_gib: str  # VLLM_CPU_KVCACHE_SPACE of both

    @property
    def name(self) -> str:
        return self.model.name

    def environment(self) -> dict[str, str]:
        return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": self.kvcache_gib, "VLLM_CPU_OMP_THREADS_BIND": self.cpu_bind}

    def vllm_argv(self, port: int) -> list[str]:
        # Tandem's Frontend writes no access log; a line per request would be work only one side does.
        return [
            sys.executable,
            *shlex.split(
                f"-m vllm.entrypoints.openai.api_server --host 127.0.0.1 --port {port} --model {self.model} "
                f"--served-model-name {self.name} --enforce-eager --enable-prefix-caching "
                f"--block-size {self.block_size} --max-model-len {self.max_model_len} --dtype {self.dtype} "
                "--disable-uvicorn-access-log"
            ),
        ]

    def tandem_config(self) -> dict[str, Any]:
        """The shipped CPU config (configs/cpu-tiny.yaml) with one worker and these engine arguments."""
        config = yaml.safe_load((REPO / "configs" / "cpu-tiny.yaml").read_text())
        config.pop("PrefillWorker", None)
        common = {"model": str(self.model), "block-size": self.block_size, "max-model-len": self.max_model_len}
        config["Common"].update(common, **{"served-model-name": self.name})
        config["Frontend"]["served-model-name"] = self.name
        worker = {"enforce-eager": True, "enable-prefix-caching": True, "dtype": self.dtype}
        config["VllmWorker"].update(worker, **{"cpu-omp-threads-bind": [self.cpu_bind], "ServiceArgs": {"workers": 1}})
        return config


# float32: the tiny model's own dtype (CPUs without AVX-512 BF16 run bfloat16 slower); prefix
# caching on, as configs/cpu-tiny.yaml ships; both engines on core 0.
ENGINE = EngineSettings(
    REPO / "models" / "tiny-llama", block_size=32, max_model_len=2048, dtype="float32", cpu_bind="0", kvcache_gib="1"
)


# Each run: streamed chat requests of 128-word prompts, exactly 64 output tokens each.
LOAD = LoadConfig(url="", model=ENGINE.name, prompt_tokens=128, max_tokens=64, ignore_eos=True)
AGG_ROUTER = "graphs.agg_router:Frontend"


@dataclass
class RunResult:
    system: System
    concurrency: int
    repeat: int
    summary: Summary


@contextlib.asynccontextmanager
async def serve(system: System, workdir: Path, nats_url: str, etcd_url: str) -> AsyncIterator[ServedProcess]:
    """One system up until the block ends; each Tandem start gets a namespace of its own (nothing a
    previous graph registered is seen until its lease ends)."""
    name, env = f"{system}-{os.urandom(3).hex()}", ENGINE.environment()
    if system == "tandem":
        graph = ServedGraph(AGG_ROUTER, ENGINE.tandem_config(), workdir, nats_url, etcd_url, name=name, env=env)
        async with graph:
            await graph.wait_ready(1, timeout=START_TIMEOUT_S)
            yield graph
        return
    port = free_port()
    server = ServedProcess(ENGINE.vllm_argv(port), env, workdir / f"{name}.log", port)
    server.start()
    try:
        await server.wait_healthy(START_TIMEOUT_S)
        yield server
    finally:
        server.stop()


def requests_for(args: argparse.Namespace, concurrency: int) -> int:
    # Enough requests that the concurrency is held for many rounds, not just ramped up and down.
    return args.requests if args.requests is not None else max(100, 20 * concurrency)


async def run_pairs(args: argparse.Namespace, workdir: Path) -> list[RunResult]:
    """direct, tandem | tandem, direct | ...: a drift in machine load over time hits both alike."""
    results = []
    with control_plane(workdir) as (nats, etcd):
        for repeat in range(args.repeats):
            for system in SYSTEMS if repeat % 2 == 0 else SYSTEMS[::-1]:
                async with serve(system, workdir, nats.url, etcd.url) as server:
                    for concurrency in args.concurrency:
                        # Both systems get the same prompts in a repeat; no two runs share one, so the
                        # prefix cache never turns one system's prefill into a cache hit.
                        summary, _ = await run_load(
                            dataclasses.replace(
                                LOAD,
                                url=server.base_url,
                                concurrency=concurrency,
                                requests=requests_for(args, concurrency),
                                warmup=max(8, 2 * concurrency),
                                seed=repeat * 1000 + concurrency,
                            )
                        )
                        figures = "; ".join(summary.as_text().splitlines()[:2])
                        log.info("%s c=%d repeat %d: %s", system, concurrency, repeat, figures)
                        results.append(RunResult(system, concurrency, repeat, summary))
    return results


# (Summary field, column heading, scale, number format)
METRICS = (
    ("output_token_throughput", "output tok/s", 1.0, "{:.1f}"),
    ("request_throughput", "req/s", 1.0, "{:.2f}"),
    ("ttft_p50_s", "TTFT p50 ms", 1000.0, "{:.1f}"),
    ("ttft_p99_s", "TTFT p99 ms", 1000.0, "{:.1f}"),
    ("itl_p50_s", "ITL p50 ms", 1000.0, "{:.2f}"),
    ("itl_p99_s", "ITL p99 ms", 1000.0, "{:.2f}"),
)


def medians(results: Sequence[RunResult]) -> dict[tuple[System, int], dict[str, float]]:
    grouped: dict[tuple[System, int], list[Summary]] = {}
    for result in results:
        grouped.setdefault((result.system, result.concurrency), []).append(result.summary)
    by_key = {}
    for key, summaries in grouped.items():
        by_key[key] = {field: median(getattr(s, field) for s in summaries) * scale for field, _, scale, _ in METRICS}
        by_key[key].update(runs=len(summaries), failed=sum(s.failed for s in summaries))
    return by_key


def markdown_table(results: Sequence[RunResult], concurrencies: Sequence[int]) -> str:
    by_key, rows = medians(results), []
    for c in concurrencies:
        for system in SYSTEMS:
            if row := by_key.get((system, c)):
                figures = [fmt.format(row[f]) for f, _, _, fmt in METRICS]
                rows.append([system, str(c), *figures, str(row["runs"]), str(row["failed"])])
        if (direct := by_key.get(("direct", c))) and (tandem := by_key.get(("tandem", c))):
            ratios = [f"{tandem[f] / direct[f]:.2f}" if direct[f] else "n/a" for f, _, _, _ in METRICS]
            rows.append(["**Tandem / direct**", str(c), *ratios, "", ""])
    headings = " | ".join(
        ["system", "concurrency", *(heading for _, heading, _, _ in METRICS), "runs", "failed requests"]
    )
    return "\n".join(table(headings, rows))


def verdict(results: Sequence[RunResult], concurrencies: Sequence[int]) -> str:
    by_key, parts = medians(results), []
    for concurrency in concurrencies:
        direct, tandem = by_key.get(("direct", concurrency)), by_key.get(("tandem", concurrency))
        if not (direct and tandem and direct["output_token_throughput"]):
            parts.append(f"concurrency {concurrency}: incomplete")
            continue
        ratio = tandem["output_token_throughput"] / direct["output_token_throughput"]
        met = "meets" if ratio >= TARGET else "misses"
        parts.append(f"concurrency {concurrency}: Tandem at {ratio:.0%} of direct ({met} the {TARGET:.0%} target)")
    return "; ".join(parts)


def section_text(command: str, note: str, report: str, args: argparse.Namespace, results: list[RunResult]) -> str:
    # Prompt length as the servers counted it (the same prompts for both).
    prompt_tokens = statistics.fmean(r.summary.mean_prompt_tokens for r in results if r.summary.completed)
    requests = ", ".join(f"{requests_for(args, c)} at c={c}" for c in args.concurrency)
    return f"""{SECTION_TITLE}

```bash
{command}
```

{note}

Both systems serve `{ENGINE.name}` with the same engine: `enforce_eager`, block size {ENGINE.block_size},
max model length {ENGINE.max_model_len}, dtype {ENGINE.dtype}, prefix caching on,
`VLLM_CPU_KVCACHE_SPACE={ENGINE.kvcache_gib}`, engine threads `VLLM_CPU_OMP_THREADS_BIND={ENGINE.cpu_bind}` for both.
Direct is `python -m vllm.entrypoints.openai.api_server`; Tandem is the agg_router graph
(Frontend → Processor → KV Router → one VllmWorker) on its own NATS and etcd. One system runs at
a time; the pair runs {args.repeats} time(s), in alternating order. Each run: bench.loadgen, chat
API, streaming, {LOAD.prompt_tokens}-word prompts ({prompt_tokens:.0f} tokens by the servers' count),
exactly {LOAD.max_tokens} output tokens (`ignore_eos`), requests per run: {requests}, after a
warm-up; no two runs send the same prompt. Numbers are medians over the repeats; ITL is the gap between
streamed chunks as the client sees them, so a server that sends several tokens in one chunk shows a lower
ITL p50 and a higher p99.

{report}"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vs_direct", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="how many (direct, Tandem) pairs, alternating order")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="concurrencies to measure")
    parser.add_argument("--requests", type=int, help="measured requests per run (default: max(100, 20 x concurrency))")
    parser.add_argument("--json-out", type=Path, help="also write every run's loadgen summary here")
    parser.add_argument("--write-docs", type=Path, nargs="?", const=DOCS_PATH, help="(default docs/benchmarks.md)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.concurrency) < 1:
        parser.error("--repeats and --concurrency must be >= 1")
    if not (ENGINE.model / "config.json").is_file():
        parser.error(f"no model at {ENGINE.model} (make it: .venv/bin/tandem model make-tiny models/tiny-llama)")
    cli.setup_logging()
    logging.getLogger("bench.loadgen").setLevel(logging.WARNING)
    note = cli.RunNote()
    with cli.workdir(None) as workdir:
        results = cli.run(run_pairs(args, workdir))
    report = f"{markdown_table(results, args.concurrency)}\n\n{verdict(results, args.concurrency)}.\n"
    sys.stdout.write(report)
    if args.json_out:
        runs = [{**dataclasses.asdict(r), "summary": r.summary.as_dict()} for r in results]
        args.json_out.write_text(json.dumps(runs, indent=2))
    if args.write_docs and results:
        command = cli.command_line(".venv/bin/python -m bench.vs_direct", argv)
        write_section(args.write_docs, section_text(command, str(note), report, args, results))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
