"""The graph benchmarks, one subcommand each: `python -m bench.scenarios NAME`. Each is a Benchmark subclass:
its layouts and load as data, and the methods that measure one run and render the table; docs/benchmarks.md
gives each one's command, what its layouts run and how to read its table."""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import os
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import psutil
import yaml

from app.launch.ports import free_port
from app.openai.schema import ChatCompletionRequest, parse_request
from app.preprocess import Preprocessor
from app.protocol import names
from app.router.hashing import block_hashes
from bench.harness.cli import Benchmark, Layout, Plane, Run, Servable, cells, main, met, table, with_requests
from bench.harness.load import LoadConfig, Phase, RequestResult, Summary, drive, median_rows, run_load, summarize
from testbed.graphs import REPO, ServedGraph, ServedProcess

log = logging.getLogger(__name__)

CONFIGS = REPO / "configs"
MOCKERS, CPU_TINY, CPU_DISAGG = CONFIGS / "mocker-8.yaml", CONFIGS / "cpu-tiny.yaml", CONFIGS / "cpu-tiny-disagg.yaml"
MOCKER_COMMON = yaml.safe_load(MOCKERS.read_text())["Common"]
SERVED_MODEL = MOCKER_COMMON["served-model-name"]
MOCKER_LOAD = LoadConfig(SERVED_MODEL, concurrency=16, ignore_eos=True, timeout_s=60.0, max_duration_s=60.0)


# -- KV routing (mockers): prefix-cache hits and TTFT against round-robin, and the load spread.

# Shared prefixes: about 1.8k tokens with the tiny model's tokenizer. 20 groups, not a multiple
# of the worker count: a blind rotation must not line groups up with workers.
SHARED = dataclasses.replace(
    MOCKER_LOAD, requests=160, prompt_tokens=1000, shared_prefix_ratio=0.9, prefix_groups=20, max_tokens=16
)
SPREAD = dataclasses.replace(SHARED, prompt_tokens=256, shared_prefix_ratio=0.0, prefix_groups=1)  # no sharing
# The routings SHARED compares: label -> `tandem serve` overrides (docs/benchmarks.md, "KV routing",
# says what overlap weight 1 shows against the default 2).
ROUTINGS: dict[str, tuple[str, ...]] = {
    "kv (default knobs)": ("--Router.policy=kv",),
    "kv, overlap-weight 1": ("--Router.policy=kv", "--Router.knobs={overlap-weight: 1}"),
    "round-robin": ("--Router.policy=round-robin",),
}
BASELINE, DEFAULT_ROUTING, SPREAD_ROW = "round-robin", "kv (default knobs)", ("no sharing",)
TAIL_TARGET = 0.7  # the default kv's TTFT p99 against round-robin's, at most (issue 20)


def best_possible_cached(
    token_ids: Sequence[Sequence[int]], outcomes: Sequence[RequestResult], block_size: int
) -> list[int]:
    """Cached tokens per request under the oracle of docs/benchmarks.md ("KV routing"): the full blocks a
    request shares with one whose first token came back before it was sent, short of its own last token
    (an engine always computes it). The oracle's caches never fill."""
    hashes = [block_hashes(tokens, block_size) for tokens in token_ids]
    # A chained block hash names its whole prefix: when was each prefix first computed?
    computed_at: dict[int, float] = {}
    for prefix, outcome in zip(hashes, outcomes, strict=True):
        if outcome.ttft_s is not None:
            for block in prefix:
                computed_at[block] = min(computed_at.get(block, math.inf), outcome.sent_at + outcome.ttft_s)
    cached = []
    for tokens, prefix, outcome in zip(token_ids, hashes, outcomes, strict=True):
        usable = prefix[: (len(tokens) - 1) // block_size]
        hit = 0
        while hit < len(usable) and computed_at.get(usable[hit], math.inf) < outcome.sent_at:
            hit += 1
        cached.append(hit * block_size)
    return cached


@functools.cache
def oracle_preprocessor() -> Preprocessor:
    return Preprocessor(REPO / MOCKER_COMMON["model"], max_model_len=MOCKER_COMMON["max-model-len"])


def hit_rates(load: LoadConfig, outcomes: list[RequestResult]) -> dict[str, float]:
    """The share of prompt tokens the workers served from cache, the oracle's, and how close the first came."""
    # The oracle sees exactly the token ids the Processor sent to the workers.
    requests = [parse_request(ChatCompletionRequest, body) for body in load.bodies(len(outcomes))]
    token_ids = [oracle_preprocessor().preprocess(request, "oracle").token_ids for request in requests]
    best = best_possible_cached(token_ids, outcomes, MOCKER_COMMON["block-size"])
    ok = [(o, b) for o, b in zip(outcomes, best, strict=True) if o.ok]
    prompt_total = sum(o.prompt_tokens for o, _ in ok) or 1
    hit, best_hit = sum(o.cached_tokens for o, _ in ok) / prompt_total, sum(b for _, b in ok) / prompt_total
    return {"hit_rate": hit, "best_hit_rate": best_hit, "of_best": hit / best_hit if best_hit else math.nan}


def max_over_mean(per_worker: Sequence[int]) -> float:
    mean = statistics.fmean(per_worker) if per_worker else 0.0
    return max(per_worker) / mean if mean else math.nan


class Routing(Benchmark):
    section = "## KV routing (mockers)"
    layouts: ClassVar[Mapping[str, Servable]] = {
        routing: Layout(MOCKERS, 8, routers=2, overrides=overrides) for routing, overrides in ROUTINGS.items()
    }
    load = SHARED

    async def measure(self, run: Run) -> list[Phase]:
        # Each run brings new prefix groups (a new seed): earlier runs' cache contents only take room,
        # as an older workload's would.
        load = run.load(seed=run.number)
        summary, outcomes = await run_load(load)
        # Off the event loop: loading transformers takes seconds, longer than a lease might wait.
        phases = [Phase((run.layout,), summary, await asyncio.to_thread(hit_rates, load, outcomes))]
        log.info("shared, %s, run %d: %s", run.layout, run.number, phases[-1].extra)
        if run.layout == DEFAULT_ROUTING:
            spread, _ = await run_load(run.load(SPREAD, seed=100 + run.number))
            # Every worker, those that got no request too.
            workers = {worker: spread.workers.get(worker, 0) for worker in await run.graph.instances("VllmWorker")}
            phases.append(Phase(SPREAD_ROW, dataclasses.replace(spread, workers=workers)))
            log.info("spread, run %d: %s", run.number, workers)
        return phases

    def render(self, phases: list[Phase], args: argparse.Namespace) -> list[str]:
        figures, rows = median_rows(p for p in phases if p.row != SPREAD_ROW), []
        for (routing,), m in figures.items():
            speedup = figures[BASELINE,]["ttft_p50_s"] / m["ttft_p50_s"]
            judged = routing != BASELINE  # the targets are the kv policy's
            of_best = f"{m['of_best']:.1%}" + (f" {met(m['of_best'] >= 0.95)}" if judged else "")
            speedup_cell = f"{speedup:.2f}" + (f" {met(speedup >= 2)}" if judged else "")
            hits = [f"{m['hit_rate']:.1%}", f"{m['best_hit_rate']:.1%}", of_best, f"{m['ttft_p50_s'] * 1000:.0f} ms"]
            tail = m["ttft_p99_s"] / figures[BASELINE,]["ttft_p99_s"]
            tail_cell = f"{tail:.2f}" + (f" {met(tail <= TAIL_TARGET)}" if routing == DEFAULT_ROUTING else "")
            p99 = [f"{m['ttft_p99_s'] * 1000:.0f} ms", tail_cell]
            rows.append([routing, *hits, speedup_cell, *p99, f"{m['request_throughput']:.1f}"])
        headings = (
            "routing | KV hit rate | best possible | hit / best (target >= 95 %) | TTFT p50"
            f" | {BASELINE} TTFT p50 / this (target >= 2) | TTFT p99 | this / {BASELINE}'s"
            f" (target <= {TAIL_TARGET:g}) | requests/s"
        )
        spreads = [sorted(p.summary.workers.values(), reverse=True) for p in phases if p.row == SPREAD_ROW]
        per_worker = sorted(spreads, key=max_over_mean)[(len(spreads) - 1) // 2]  # the median run's (the lower)
        ratio = max_over_mean(per_worker)
        return [
            f"Shared prefixes: {with_requests(SHARED, args).describe()}.",
            "",
            *table(headings, rows),
            "",
            f"No sharing (kv): {with_requests(SPREAD, args).describe()}; requests per worker "
            f"{' / '.join(map(str, per_worker))}: max / mean = {ratio:.2f} (target <= 1.5: {met(ratio <= 1.5)}).",
        ]


# -- Aggregated vs disaggregated on a mixed long/short load: mockers, or vLLM CPU.

DISAGG_ROUTER = "graphs.disagg_router:Frontend"
# The table's columns after the layout: heading -> (figure, format); the load's tokens/s and the
# remote prefills are the whole load's, the rest are each kind's.
DISAGG_COLUMNS = {
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


def by_kind(
    layout: str, load: LoadConfig, results: list[RequestResult], whole: Summary, stall_s: float, prefill_jobs: int
) -> list[Phase]:
    """A row for the long requests of a run, one for the short: their Summary, and the share of them that
    saw a gap >= stall_s between two tokens; the whole load's output tokens/s and remote prefills."""
    whole_load = {"all_output_tokens_per_second": whole.output_token_throughput, "prefill_jobs": prefill_jobs}
    phases = []
    for kind in ("long", "short"):
        # Fewer results than requests when max_duration_s ran out: those never sent are the last.
        kept = [r for i, r in enumerate(results) if load.is_long(i) == (kind == "long")]
        ok = [r for r in kept if r.ok]
        stalled = sum(max(r.itl_s, default=0.0) >= stall_s for r in ok) / len(ok) if ok else 0.0
        extra = {"stalled": stalled, **whole_load}
        phases.append(Phase((f"{layout}, {kind}",), summarize(kept, whole.duration_s), extra))
    return phases


class Disagg(Benchmark):
    section = "## Aggregated vs disaggregated (mockers)"
    layouts: ClassVar[Mapping[str, Servable]] = {
        "aggregated": Layout(MOCKERS, 8, routers=2),
        "disaggregated": Layout(CONFIGS / "mocker-disagg.yaml", 4, routers=2, prefill_workers=4, graph=DISAGG_ROUTER),
    }
    # Streamed chat requests, unrelated prompts, 30% of them long. The tiny model's tokenizer makes
    # about 1.8 tokens of a loadgen word: ~2k and ~100 tokens.
    load = dataclasses.replace(
        MOCKER_LOAD, timeout_s=120.0, requests=200, prompt_tokens=50, long_share=0.3, long_prompt_tokens=1100
    )
    # A gap between tokens this long is a long prefill stalling the batch: a decode step is ~10 ms and
    # a short prompt's prefill ~25 ms, a 2k-token one's ~0.4 s.
    stall_s = 0.1

    async def measure(self, run: Run) -> list[Phase]:
        load = run.load(seed=run.number)
        if run.number == 1:
            await run_load(dataclasses.replace(load, requests=2 * load.concurrency, seed=0))  # a warm-up
        jobs_before = await run.graph.prefill_jobs_done()
        whole, results = await run_load(load)
        log.info("%s, run %d: %d ok, %d failed", run.layout, run.number, whole.completed, whole.failed)
        jobs = await run.graph.prefill_jobs_done() - jobs_before
        return by_kind(run.layout, load, results, whole, self.stall_s, prefill_jobs=jobs)

    def render(self, phases: list[Phase], args: argparse.Namespace) -> list[str]:
        headings = [f"{h} >= {self.stall_s * 1000:.0f} ms" if h == "requests stalled" else h for h in DISAGG_COLUMNS]
        rows = [[*row, *cells(figures, DISAGG_COLUMNS.values())] for row, figures in median_rows(phases).items()]
        return [
            f"Load: {with_requests(self.load, args).describe()}.",
            "",
            *table(" | ".join(["layout", *headings]), rows),
        ]


# The shipped max-local-prefill-length (64) sends nearly every chat prompt remote; here only long ones go.
LONG_REMOTE = ("--VllmWorker.max-local-prefill-length=512",)


# One Router process, as these layouts were measured (the configs' default is the router in the Frontend).
ONE_ROUTER = ("--Frontend.embed-router=false",)


class DisaggVllm(Disagg):
    section = "## Aggregated vs disaggregated (vLLM CPU, tiny model)"
    layouts: ClassVar[Mapping[str, Servable]] = {
        "aggregated": Layout(CPU_TINY, 2, routers=1, overrides=ONE_ROUTER),
        "disaggregated": Layout(
            CPU_DISAGG, 1, routers=1, prefill_workers=1, overrides=(*LONG_REMOTE, *ONE_ROUTER), graph=DISAGG_ROUTER
        ),
    }
    # ~900 and ~100 prompt tokens (the configs' max-model-len is 2048).
    load = dataclasses.replace(Disagg.load, concurrency=4, requests=60, long_prompt_tokens=500, max_tokens=32)
    stall_s = 0.05  # a decode step of a few sequences takes a few ms here; a 900-token prefill tens of ms


# -- Tandem against the same vLLM engine served directly, one at a time, alternating, on this machine.

# Both systems run configs/cpu-tiny.yaml's engine arguments (Common: model, block size, max model length;
# VllmWorker: eager, prefix caching) with one engine, on core 0, in float32: the tiny model's own dtype
# (CPUs without AVX-512 BF16 run bfloat16 slower).
ENGINE = yaml.safe_load(CPU_TINY.read_text())["Common"]
ENGINE_ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"}
ONE_ENGINE = ("--VllmWorker.ServiceArgs.workers=1", '--VllmWorker.cpu-omp-threads-bind=["0"]')
TARGET = 0.9  # Tandem's output tokens/s at least this share of direct's
# The table's columns after the system's: heading -> (figure, format); times in ms.
DIRECT_COLUMNS = {
    "output tok/s": ("output_token_throughput", "{:.1f}"),
    "req/s": ("request_throughput", "{:.2f}"),
    "TTFT p50 ms": ("ttft_p50_s", "{:.1f}"),
    "TTFT p99 ms": ("ttft_p99_s", "{:.1f}"),
    "ITL p50 ms": ("itl_p50_s", "{:.2f}"),
    "ITL p99 ms": ("itl_p99_s", "{:.2f}"),
    "runs": ("runs", "{:.0f}"),
    "failed requests": ("failed", "{:.0f}"),
}


class DirectVllm:
    """vLLM's own OpenAI server on the same engine arguments as the Tandem graph."""

    @contextlib.asynccontextmanager
    async def serve(self, name: str, workdir: Path, plane: Plane) -> AsyncIterator[ServedProcess]:
        model = REPO / ENGINE["model"]
        if not (model / "config.json").is_file():
            raise SystemExit(f"no model at {model} (make it: .venv/bin/tandem model make-tiny {ENGINE['model']})")
        port = free_port()
        # Tandem's Frontend writes no access log; a line per request would be work only one side does.
        arguments = (
            f"-m vllm.entrypoints.openai.api_server --host 127.0.0.1 --port {port} --model {model} "
            f"--served-model-name {ENGINE['served-model-name']} --block-size {ENGINE['block-size']} "
            f"--max-model-len {ENGINE['max-model-len']} --enforce-eager --enable-prefix-caching --dtype float32 "
            "--disable-uvicorn-access-log"
        )
        server = ServedProcess([sys.executable, *arguments.split()], ENGINE_ENV, workdir / f"{name}.log", port)
        with server.running():
            await server.wait_healthy(timeout=300.0)
            yield server


def load_at(load: LoadConfig, args: argparse.Namespace, concurrency: int) -> LoadConfig:
    # --requests, or enough requests that the concurrency is held for many rounds, not just ramped up and down.
    return dataclasses.replace(load, concurrency=concurrency, requests=args.requests or max(100, 20 * concurrency))


class VsDirect(Benchmark):
    section = "## Tandem vs direct vLLM (CPU, tiny model)"
    layouts: ClassVar[Mapping[str, Servable]] = {
        "direct": DirectVllm(),
        "tandem": Layout(CPU_TINY, 1, overrides=(*ONE_ENGINE, "--VllmWorker.dtype=float32"), env=ENGINE_ENV),
    }
    load = LoadConfig(ENGINE["served-model-name"], prompt_tokens=128, max_tokens=64, ignore_eos=True)
    order = "alternating"
    concurrency = (1, 32)

    async def measure(self, run: Run) -> list[Phase]:
        phases = []
        for c in self.concurrency:
            # Both systems get the same prompts in a run; no two runs share one, so the prefix cache
            # never turns one system's prefill into a cache hit.
            load = run.load(load_at(self.load, run.args, c), seed=run.number * 1000 + c, warmup=max(8, 2 * c))
            summary, _ = await run_load(load)
            log.info("%s c=%d run %d: %.1f output tok/s", run.layout, c, run.number, summary.output_token_throughput)
            phases.append(Phase((run.layout, str(c)), summary))
        return phases

    def render(self, phases: list[Phase], args: argparse.Namespace) -> list[str]:
        figures, rows, verdicts = median_rows(phases), [], []
        concurrencies = dict.fromkeys(c for _, c in figures)  # those measured, in order
        for c in concurrencies:
            direct, tandem = figures["direct", c], figures["tandem", c]
            rows += [[system, c, *cells(figures[system, c], DIRECT_COLUMNS.values())] for system in self.layouts]
            ratios = [
                f"{tandem[f] / direct[f]:.2f}" if direct[f] else "n/a" for f, _ in list(DIRECT_COLUMNS.values())[:-2]
            ]
            rows.append(["**Tandem / direct**", c, *ratios, "", ""])
            ratio = tandem["output_token_throughput"] / direct["output_token_throughput"]
            verdict = "meets" if ratio >= TARGET else "misses"
            verdicts.append(f"concurrency {c}: Tandem at {ratio:.0%} of direct ({verdict} the {TARGET:.0%} target)")
        # Prompt length as the servers counted it (the same prompts for both).
        prompt_tokens = statistics.fmean(p.summary.mean_prompt_tokens for p in phases if p.summary.completed)
        loads = "; ".join(load_at(self.load, args, int(c)).describe() for c in concurrencies)
        return [
            f"Each run, after a warm-up: {loads}; {prompt_tokens:.0f} prompt tokens by the servers' count.",
            "",
            *table(" | ".join(["system", "concurrency", *DIRECT_COLUMNS]), rows),
            "",
            "; ".join(verdicts) + ".",
        ]


# -- The request path at infinite worker speed: requests/s and CPU milliseconds per request by process.

PATH_WORKERS, SPEEDUP = 2, 1e6  # mocker workers whose speedup-ratio removes every simulated delay
PATH_SERVICES = ("Frontend", "Processor", "Router")  # whose CPU is the request path's
TARGET_RPS, TARGET_CPU_MS = 600.0, 1.5  # the issue's, at concurrency 16
NO_DELAYS = (f"--VllmWorker.ServiceArgs.workers={PATH_WORKERS}", f"--VllmWorker.speedup-ratio={SPEEDUP:g}")


WITH_API_KEY = "router-in-frontend, API key"
BENCH_API_KEY = "sk-bench-request-path"

# Constrained requests, measured on the router-in-frontend graph beside its plain ones: a forced tool call
# (the tool choice's JSON schema, a tool-call reader per request) and a JSON schema, each a grammar per
# request on the mocker workers (app/engines/mocker_grammar.py). The strings are bounded, and one call
# (parallel_tool_calls false: the mocker would write a random number of them), so that each answer ends
# where its grammar does within max_tokens: about 45 tokens for the call, 20 for the JSON.
KINDS_LAYOUT, KIND_MAX_TOKENS = "router-in-frontend", 64
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "maximum": 9}},
            "required": ["city"],
        },
    },
}
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "pet": {"enum": ["cat", "dog"]}},
    "required": ["name", "pet"],
}
REQUEST_KINDS: dict[str, dict[str, Any]] = {
    "tools, tool_choice required": {"tools": [WEATHER_TOOL], "tool_choice": "required", "parallel_tool_calls": False},
    "response_format json_schema": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}
    },
}


class RequestPath(Benchmark):
    section = "## Request path (mockers at infinite speed)"
    # Where the routing runs: inside the Frontend (embed-router), or in the config's 2 Router replicas.
    layouts: ClassVar[Mapping[str, Servable]] = {
        "router-in-frontend": Layout(MOCKERS, PATH_WORKERS, 0, overrides=(*NO_DELAYS, "--Frontend.embed-router=true")),
        "router-processes": Layout(MOCKERS, PATH_WORKERS, 2, overrides=(*NO_DELAYS, "--Frontend.embed-router=false")),
        # What API keys cost (docs/security.md): the first layout with one key, which every request bears.
        WITH_API_KEY: Layout(
            MOCKERS,
            PATH_WORKERS,
            0,
            overrides=(*NO_DELAYS, "--Frontend.embed-router=true", f'--Frontend.api-keys=["{BENCH_API_KEY}"]'),
        ),
    }
    load = LoadConfig(SERVED_MODEL, requests=1000, prompt_tokens=32, max_tokens=16, ignore_eos=True)
    order = "side by side"
    concurrency = (16, 64)

    async def measure(self, run: Run) -> list[Phase]:
        # CPU milliseconds per request: each process's own CPU time over the phase, over the requests
        # completed, hardly moves when other work shares the machine (requests/s does).
        services = {**run.graph.service_pids(), **({"nats-server": [run.nats.pid]} if run.nats.pid else {})}
        processes = {service: [psutil.Process(pid) for pid in pids] for service, pids in services.items()}

        def cpu() -> dict[str, float]:  # user + system CPU seconds of each service's processes, all threads
            return {service: sum(sum(p.cpu_times()[:2]) for p in ps) for service, ps in processes.items()}

        api_key = BENCH_API_KEY if run.layout == WITH_API_KEY else None
        loads = {run.layout: run.load(api_key=api_key)}
        if run.layout == KINDS_LAYOUT:
            for kind, fields in REQUEST_KINDS.items():
                loads[f"{run.layout}, {kind}"] = run.load(extra_body=fields, max_tokens=KIND_MAX_TOKENS)
        phases = []
        for row, load in loads.items():
            if run.number == 1:  # a warm-up: caches, lazy imports (a mocker's first grammar imports xgrammar)
                await run_load(dataclasses.replace(load, concurrency=16, requests=200))
            for concurrency in self.concurrency:
                before = cpu()
                summary, _ = await run_load(dataclasses.replace(load, concurrency=concurrency, seed=100 + run.number))
                after = cpu()
                cpu_ms = {s: (after[s] - before[s]) * 1000.0 / max(summary.completed, 1) for s in processes}
                path = sum(cpu_ms.get(service, 0.0) for service in PATH_SERVICES)
                phases.append(Phase((row, str(concurrency)), summary, {**cpu_ms, "path": path}))
                log.info("%s, concurrency %d, run %d: %s", row, concurrency, run.number, phases[-1].extra)
        return phases

    def render(self, phases: list[Phase], args: argparse.Namespace) -> list[str]:
        figures, rows = median_rows(phases), []
        for (layout, concurrency), m in sorted(figures.items(), key=lambda row: int(row[0][1])):
            rps, path = f"{m['request_throughput']:.0f}", f"{m['path']:.2f}"
            if concurrency == "16" and layout in self.layouts:  # the targets: plain requests, 16 in flight
                rps += f" (target >= {TARGET_RPS:g}: {met(m['request_throughput'] >= TARGET_RPS)})"
                path += f" {met(m['path'] <= TARGET_CPU_MS)}"
            routers = f"{m.get('Router', 0.0):.2f}" if layout == "router-processes" else "none"
            cpu = [f"{m.get(s, 0.0):.2f}" for s in ("Frontend", "Processor", "VllmWorker", "nats-server")]
            rows.append([layout, concurrency, rps, cpu[0], routers, cpu[1], path, cpu[2], cpu[3]])
        headings = (
            "layout | concurrency | requests/s | Frontend | Router processes | Processor (idle)"
            f" | path total (target <= {TARGET_CPU_MS:g} at 16) | mocker workers | nats-server"
        )
        loads = "; ".join(with_requests(self.load, args, concurrency=c).describe() for c in self.concurrency)
        kinds = ", ".join(f"`{kind}`" for kind in REQUEST_KINDS)
        lines = [
            f"Load: {loads}. The same on {KINDS_LAYOUT} with {kinds} (bench/scenarios.py, REQUEST_KINDS) and "
            f"max_tokens {KIND_MAX_TOKENS}: each answer ends with its grammar. CPU milliseconds per request by "
            "process:",
            "",
            *table(headings, rows),
            "",
        ]
        for (layout, concurrency), embedded in figures.items():  # the two layouts side by side
            if layout == "router-in-frontend" and (processes := figures.get(("router-processes", concurrency))):
                lines.append(
                    f"- At concurrency {concurrency}, routing in the Frontend instead of in Router processes: "
                    f"{embedded['request_throughput'] / processes['request_throughput']:.2f}x the requests/s, "
                    f"path CPU per request {processes['path'] / embedded['path']:.2f}x lower."
                )
            if layout == "router-in-frontend" and (keyed := figures.get((WITH_API_KEY, concurrency))):
                lines.append(
                    f"- At concurrency {concurrency}, with an API key on every request: "
                    f"{keyed['request_throughput'] / embedded['request_throughput']:.2f}x the requests/s, "
                    f"{keyed['path'] / embedded['path']:.2f}x the path CPU per request."
                )
            for kind in REQUEST_KINDS if layout == KINDS_LAYOUT else ():
                if constrained := figures.get((f"{layout}, {kind}", concurrency)):
                    tokens = constrained["total_output_tokens"] / max(constrained["completed"], 1)
                    lines.append(
                        f"- At concurrency {concurrency}, `{kind}` against plain requests: "
                        f"{constrained['request_throughput'] / embedded['request_throughput']:.2f}x the requests/s, "
                        f"{constrained['path'] / embedded['path']:.2f}x the path CPU per request, "
                        f"{constrained['VllmWorker'] / embedded['VllmWorker']:.2f}x the mocker workers' "
                        f"({tokens:.1f} output tokens per request against {self.load.max_tokens})."
                    )
        return lines


# -- Soak: the shipped mocker config under a steady load, one worker SIGKILLed every --kill-every.

SOAK_LAYOUT = Layout(MOCKERS, 8, routers=2)  # the shipped config as it is
SOAK_COLUMNS = (
    ("request_throughput", "{:.1f}"),
    ("ttft_p50_s", "{:.0f} ms"),
    ("ttft_p99_s", "{:.0f} ms"),
    ("e2e_p50_s", "{:.0f} ms"),
    ("e2e_p99_s", "{:.0f} ms"),
)
RSS_TARGET = 0.05  # the most a process's RSS may grow after the warm-up (issue 15)
# RSS is sampled this often, and each end's figure is a process's median over this long: one sample is one
# moment of a garbage collector's cycle (Go's, in etcd and nats-server, lets the heap double between two).
RSS_EVERY_S, RSS_WINDOW_S = 5.0, 30.0
RssSample = dict[tuple[str, int], int]  # bytes by (service or program, pid)
# Throughput is back from the first window of this length after a kill whose completions per second reach
# this share of those in the half minute before the kill.
BACK_WINDOW_S, BACK_BASELINE_S, BACK_SHARE = 5.0, 30.0, 0.9


@dataclass(frozen=True)
class Kill:
    """A worker SIGKILLed and what followed it: times in seconds after the kill (NaN: not before the next)."""

    at_s: float  # after the warm-up
    worker: str  # its instance id
    pid: int
    streams: int  # of the load's requests, those the worker was streaming at the kill
    failed: int  # of them
    longest_stall_s: float  # the longest gap between two text chunks of any of them
    replaced_s: float  # until supervisord's new process registered its instance
    replacement_first_token_s: float  # until a request the replacement took got its first text
    throughput_back_s: float


@dataclass(frozen=True)
class ProcessRss:
    """A process's resident memory after the warm-up and at the end (bytes; None: it was not there then)."""

    process: str  # its service, or its program (tandem, supervisord, nats-server, etcd)
    pid: int
    after_warmup: int | None  # None: started since, a killed worker's replacement
    at_end: int | None  # None: killed
    # at_end / after_warmup - 1; a replacement's over the median of its service's processes after the warm-up.
    growth: float


@dataclass
class SoakRun(Phase):
    kills: list[Kill] = field(default_factory=list)
    processes: list[ProcessRss] = field(default_factory=list)


def rss_rows(after_warmup: RssSample, at_end: RssSample) -> list[ProcessRss]:
    """One row per (process, pid) sampled in either, by process then pid."""
    by_process: dict[str, list[int]] = {}
    for (name, _), rss in after_warmup.items():
        by_process.setdefault(name, []).append(rss)
    rows = []
    for name, pid in sorted({*after_warmup, *at_end}):
        before, end = after_warmup.get((name, pid)), at_end.get((name, pid))
        baseline = before if before is not None else statistics.median(by_process.get(name) or [math.nan])
        rows.append(ProcessRss(name, pid, before, end, end / baseline - 1 if end is not None else math.nan))
    return rows


def throughput_back_s(finished_at: Sequence[float], kill_at: float, until: float) -> float:
    """Seconds from the kill to the first BACK_WINDOW_S window (in steps of a tenth of it) whose completions
    per second reach BACK_SHARE of those in the BACK_BASELINE_S before the kill; 0 if the first one does.
    `finished_at` sorted; NaN if no window ending by `until` does."""
    baseline = bisect.bisect_left(finished_at, kill_at) - bisect.bisect_left(finished_at, kill_at - BACK_BASELINE_S)
    wanted = BACK_SHARE * baseline / BACK_BASELINE_S * BACK_WINDOW_S
    for step in itertools.count():
        start = kill_at + step * BACK_WINDOW_S / 10
        if start + BACK_WINDOW_S > until:
            return math.nan
        done = bisect.bisect_left(finished_at, start + BACK_WINDOW_S) - bisect.bisect_left(finished_at, start)
        if done >= wanted:
            return start - kill_at
    raise AssertionError("unreachable")


def kill_report(
    results: Sequence[RequestResult],
    started: float,
    killed: tuple[str, int, float],
    replacement: tuple[str | None, float],
    until: float,
) -> Kill:
    """A kill's row: `killed` is (worker, pid, when), `replacement` (its instance, when it registered),
    `until` when the next kill or the end came; times are time.perf_counter()'s, as the results' are."""
    worker, pid, at = killed
    new_worker, registered_at = replacement
    streams = [r for r in results if r.worker == worker and r.sent_at <= at < r.sent_at + r.e2e_s]
    first_tokens = [r.sent_at + r.ttft_s for r in results if r.worker == new_worker and r.ttft_s is not None]
    finished = sorted(r.sent_at + r.e2e_s for r in results if r.ok)
    return Kill(
        at_s=at - started,
        worker=worker,
        pid=pid,
        streams=len(streams),
        failed=sum(not r.ok for r in streams),
        longest_stall_s=max((gap for r in streams for gap in r.itl_s), default=math.nan),
        replaced_s=registered_at - at,
        replacement_first_token_s=min(first_tokens, default=math.nan) - at,
        throughput_back_s=throughput_back_s(finished, at, until),
    )


def window_medians(samples: Sequence[tuple[float, RssSample]], start: float, stop: float) -> RssSample:
    """Each process's median over the samples taken (the float: when) within [start, stop]."""
    within: dict[tuple[str, int], list[int]] = {}
    for at, sample in samples:
        if start <= at <= stop:
            for key, rss in sample.items():
                within.setdefault(key, []).append(rss)
    return {key: int(statistics.median(values)) for key, values in within.items()}


def graph_rss(run: Run) -> RssSample:
    """The RSS of every live process of the graph (`tandem serve`, its supervisord, the services) and of
    NATS and etcd, by (service or program, pid)."""
    graph = run.graph
    services = {pid: service for service, pids in graph.service_pids().items() for pid in pids}
    assert graph.process is not None and run.nats.pid is not None and run.etcd.pid is not None
    others = [psutil.Process(pid) for pid in (graph.process.pid, run.nats.pid, run.etcd.pid)]
    rss = {}
    for process in [*others, *graph.descendants()]:  # seen since the start: the killed too
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running():  # and its PID not taken by another since
                rss[services.get(process.pid) or process.name(), process.pid] = process.memory_info().rss
    return rss


async def replacement(graph: ServedGraph, known: set[str], until: float) -> tuple[str | None, float]:
    """The first worker instance not in `known` and when it was seen; (None, NaN) if none by `until`."""
    while time.perf_counter() < until:
        if new := set(await graph.instances(names.VLLM_WORKER)) - known:
            return min(new), time.perf_counter()
        await asyncio.sleep(0.5)
    return None, math.nan


class Soak(Benchmark):
    section = "## Soak (mockers, a worker SIGKILLed every few minutes)"
    layouts: ClassVar[Mapping[str, Servable]] = {"soak": SOAK_LAYOUT}
    load = dataclasses.replace(MOCKER_LOAD, concurrency=32)
    runs = 1

    @staticmethod
    def add_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--duration", type=float, default=1200.0, help="soak: seconds measured, after the warm-up")
        parser.add_argument("--kill-every", type=float, default=300.0, help="soak: seconds between worker kills")
        parser.add_argument("--warmup", type=float, default=60.0, help="soak: seconds of load before the RSS baseline")

    async def measure(self, run: Run) -> list[Phase]:
        args, graph = run.args, run.graph
        load = run.load(max_duration_s=args.warmup + args.duration)
        # The streams each worker serves now, as the client sees them. (Not the workers' load reports, sent
        # once a second: in a trial the worker whose report said 7 was streaming none of the load's requests.)
        streaming: Counter[str] = Counter()
        driving = asyncio.create_task(drive(load, load.endless_bodies(), streaming))
        await asyncio.sleep(args.warmup)
        started = time.perf_counter()
        samples: list[tuple[float, RssSample]] = []  # when, what

        async def sample_rss() -> None:
            while True:
                samples.append((time.perf_counter(), graph_rss(run)))
                await asyncio.sleep(RSS_EVERY_S)

        sampling = asyncio.create_task(sample_rss())
        end, known = started + args.duration, set(await graph.instances(names.VLLM_WORKER))
        killed: set[str] = set()
        kills: list[tuple[tuple[str, int, float], tuple[str | None, float], float]] = []  # kill_report's arguments
        kill_at = [started + args.kill_every * k for k in range(1, math.ceil(args.duration / args.kill_every))]
        for at, until in zip(kill_at, [*kill_at[1:], end], strict=True):
            await asyncio.sleep(at - time.perf_counter())
            # The worker streaming the most requests (a killed one's record stays for up to a lease TTL);
            # its record in etcd names its PID.
            records = await graph.instances(names.VLLM_WORKER)
            worker = max(records.keys() - killed, key=lambda w: streaming[w])
            os.kill(records[worker].pid, signal.SIGKILL)
            victim = (worker, records[worker].pid, time.perf_counter())
            killed.add(worker)
            log.info("kill %d: SIGKILLed worker %s (pid %d)", len(killed), worker, victim[1])
            new = await replacement(graph, known, until)
            known |= set(await graph.instances(names.VLLM_WORKER))
            kills.append((victim, new, until))
        await asyncio.sleep(end - time.perf_counter())
        sampling.cancel()
        samples.append((time.perf_counter(), last := graph_rss(run)))
        after_warmup = window_medians(samples, started, started + RSS_WINDOW_S)
        at_end = {key: rss for key, rss in window_medians(samples, end - RSS_WINDOW_S, math.inf).items() if key in last}
        results, wall_s = await driving
        summary = summarize(results, wall_s)
        log.info("soak: %d requests, %d failed", summary.requests, summary.failed)
        rows = [kill_report(results, started, *kill) for kill in kills]
        return [SoakRun((run.layout,), summary, kills=rows, processes=rss_rows(after_warmup, at_end))]

    def render(self, phases: list[Phase], args: argparse.Namespace) -> list[str]:
        lines = []
        for soak in phases:
            assert isinstance(soak, SoakRun)
            s, kills, processes = soak.summary, soak.kills, soak.processes
            load = dataclasses.replace(self.load, requests=s.requests).describe()
            most = max((p for p in processes if not math.isnan(p.growth)), key=lambda p: p.growth)
            lines += [
                f"Load: {load}, a closed loop for {args.warmup:g} s of warm-up and {args.duration:g} s measured; "
                f"one of the {SOAK_LAYOUT.workers} workers SIGKILLed every {args.kill_every:g} s.",
                "",
                *table(
                    "requests | failed (target 0) | kills | requests/s | TTFT p50 | TTFT p99 | e2e p50 | e2e p99",
                    [
                        [
                            f"{s.requests}",
                            f"{s.failed} {met(s.failed == 0)}",
                            f"{len(kills)}",
                            *cells({name: soak.figure(name) for name, _ in SOAK_COLUMNS}, SOAK_COLUMNS),
                        ]
                    ],
                ),
                "",
                "Each kill, and in seconds after it: when the killed worker's replacement registered and streamed "
                f"its first token, and when the completions of a {BACK_WINDOW_S:g} s window were back to "
                f"{BACK_SHARE:.0%} of those in the {BACK_BASELINE_S:g} s before the kill:",
                "",
                *table(
                    "kill | at (s) | worker (pid) | its streams | of them failed | longest stall | replacement "
                    "registered | its first token | throughput back",
                    [
                        [
                            str(i),
                            f"{k.at_s:.0f}",
                            f"{k.worker} ({k.pid})",
                            str(k.streams),
                            str(k.failed),
                            f"{k.longest_stall_s:.2f} s",
                            f"{k.replaced_s:.1f}",
                            f"{k.replacement_first_token_s:.1f}",
                            f"{k.throughput_back_s:.1f}",
                        ]
                        for i, k in enumerate(kills, 1)
                    ],
                ),
                "",
                f"RSS of every process (MiB), after the warm-up and at the end: medians of samples every "
                f"{RSS_EVERY_S:g} s over the first and the last {RSS_WINDOW_S:g} s measured; a replacement's growth "
                "is over the median of its service's processes after the warm-up:",
                "",
                *table(
                    f"process | pid | after warm-up | at the end | growth (target < {RSS_TARGET:.0%})",
                    [
                        [
                            p.process,
                            str(p.pid),
                            f"{p.after_warmup / 2**20:.1f}" if p.after_warmup is not None else "(replacement)",
                            f"{p.at_end / 2**20:.1f}" if p.at_end is not None else "(killed)",
                            f"{p.growth:+.1%} {met(p.growth < RSS_TARGET)}" if not math.isnan(p.growth) else "",
                        ]
                        for p in processes
                    ],
                ),
                "",
                f"Largest growth: {most.growth:+.1%} ({most.process}, pid {most.pid}); "
                f"target < {RSS_TARGET:.0%}: {met(most.growth < RSS_TARGET)}.",
            ]
        return lines


# -- Frontend memory over many requests (issue 20): its RSS after 100k requests against after 1k.
MEMORY_BASELINE_REQUESTS = 1000
MEMORY_TARGET = 0.10  # the most the Frontend's RSS may grow from the baseline to the end


class FrontendMemory(Benchmark):
    section = "## Frontend memory over 100k requests (mockers at infinite speed)"
    # The default layout of a one-Router graph: the router replica inside the Frontend.
    layouts: ClassVar[Mapping[str, Servable]] = {
        "router-in-frontend": Layout(MOCKERS, PATH_WORKERS, 0, overrides=(*NO_DELAYS, "--Frontend.embed-router=true"))
    }
    load = LoadConfig(SERVED_MODEL, concurrency=64, requests=100_000, prompt_tokens=32, max_tokens=16, ignore_eos=True)
    runs = 1

    async def measure(self, run: Run) -> list[Phase]:
        frontends = [psutil.Process(pid) for pid in run.graph.service_pids()[names.FRONTEND]]

        def rss() -> int:
            return sum(p.memory_info().rss for p in frontends)

        load = run.load()
        # Distinct prompts throughout (a seed each): the workers' caches and the KV index churn as in service.
        await run_load(dataclasses.replace(load, requests=MEMORY_BASELINE_REQUESTS, seed=run.number))
        baseline = rss()
        rest = max(load.requests - MEMORY_BASELINE_REQUESTS, 1)
        summary, _ = await run_load(dataclasses.replace(load, requests=rest, seed=1000 + run.number))
        at_end = rss()
        extra = {"baseline_mib": baseline / 2**20, "end_mib": at_end / 2**20, "growth": at_end / baseline - 1}
        log.info("frontend RSS: %s", extra)
        return [Phase((run.layout,), summary, extra)]

    def render(self, phases: list[Phase], args: argparse.Namespace) -> list[str]:
        rows = []
        for (layout,), m in median_rows(phases).items():
            requests = MEMORY_BASELINE_REQUESTS + int(m["requests"])
            rows.append(
                [
                    layout,
                    f"{m['baseline_mib']:.1f}",
                    f"{requests}",
                    f"{m['end_mib']:.1f}",
                    f"{m['growth']:+.1%} {met(m['growth'] <= MEMORY_TARGET)}",
                    f"{m['request_throughput']:.0f}",
                ]
            )
        header = (
            f"layout | Frontend RSS after {MEMORY_BASELINE_REQUESTS} requests (MiB) | requests in all | "
            f"RSS at the end (MiB) | growth (target <= {MEMORY_TARGET:.0%}) | requests/s"
        )
        return [f"Load: {self.load.describe()}.", "", *table(header, rows)]


BENCHMARKS = {
    "routing": Routing(),
    "disagg": Disagg(),
    "disagg-vllm": DisaggVllm(),
    "vs-direct": VsDirect(),
    "request-path": RequestPath(),
    "soak": Soak(),
    "frontend-memory": FrontendMemory(),
}

if __name__ == "__main__":
    sys.exit(main("python -m bench.scenarios", BENCHMARKS))
