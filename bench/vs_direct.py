"""Tandem against the same vLLM engine served directly, one at a time, alternating, on this machine."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shlex
import statistics
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from app.infra import EtcdServer, NatsServer
from app.launch.ports import free_port
from bench.harness import cli
from bench.harness.launch import REPO, ServedGraph, ServedProcess, control_plane
from bench.harness.report import cells, table
from bench.harness.stats import Phase, median_rows
from bench.loadgen import LoadConfig, run_load

log = logging.getLogger(__name__)

SYSTEMS = ("direct", "tandem")
START_TIMEOUT_S = 300.0
TARGET = 0.9  # Tandem's output tokens/s at least this share of direct's
# Both systems' engine arguments. float32: the tiny model's own dtype (CPUs without AVX-512 BF16 run
# bfloat16 slower); prefix caching on, as configs/cpu-tiny.yaml ships; both engines on core 0.
MODEL, BLOCK_SIZE, MAX_MODEL_LEN, DTYPE = REPO / "models" / "tiny-llama", 32, 2048, "float32"
CPU_BIND, KVCACHE_GIB = "0", 1  # VLLM_CPU_OMP_THREADS_BIND and VLLM_CPU_KVCACHE_SPACE of both engines
ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(KVCACHE_GIB), "VLLM_CPU_OMP_THREADS_BIND": CPU_BIND}
# Each run: streamed chat requests of 128-word prompts, exactly 64 output tokens each.
LOAD = LoadConfig(url="", model=MODEL.name, prompt_tokens=128, max_tokens=64, ignore_eos=True)
# The table's columns after the system's: heading -> (figure, format); times in ms.
COLUMNS = {
    "output tok/s": ("output_token_throughput", "{:.1f}"),
    "req/s": ("request_throughput", "{:.2f}"),
    "TTFT p50 ms": ("ttft_p50_s", "{:.1f}"),
    "TTFT p99 ms": ("ttft_p99_s", "{:.1f}"),
    "ITL p50 ms": ("itl_p50_s", "{:.2f}"),
    "ITL p99 ms": ("itl_p99_s", "{:.2f}"),
    "runs": ("runs", "{:.0f}"),
    "failed requests": ("failed", "{:.0f}"),
}


def tandem_config() -> dict[str, Any]:
    """The shipped CPU config (configs/cpu-tiny.yaml) with one worker and the direct server's engine arguments."""
    config = yaml.safe_load((REPO / "configs" / "cpu-tiny.yaml").read_text())
    config.pop("PrefillWorker", None)
    names = {"served-model-name": MODEL.name}
    config["Common"].update({"model": str(MODEL), "block-size": BLOCK_SIZE, "max-model-len": MAX_MODEL_LEN, **names})
    config["Frontend"].update(names)
    engine = {"enforce-eager": True, "enable-prefix-caching": True, "dtype": DTYPE, "cpu-omp-threads-bind": [CPU_BIND]}
    config["VllmWorker"].update(engine, ServiceArgs={"workers": 1})
    return config


@contextlib.asynccontextmanager
async def serve(system: str, workdir: Path, nats: NatsServer, etcd: EtcdServer) -> AsyncIterator[ServedProcess]:
    """One system up until the block ends; each Tandem start gets a namespace of its own (nothing a
    previous graph registered is seen until its lease ends)."""
    name = f"{system}-{os.urandom(3).hex()}"
    if system == "tandem":
        graph = ServedGraph(
            "graphs.agg_router:Frontend", tandem_config(), workdir, nats.url, etcd.url, name=name, env=ENV
        )
        async with graph:
            await graph.wait_ready(1, timeout=START_TIMEOUT_S)
            yield graph
        return
    port = free_port()
    # Tandem's Frontend writes no access log; a line per request would be work only one side does.
    arguments = (
        f"-m vllm.entrypoints.openai.api_server --host 127.0.0.1 --port {port} --model {MODEL} --served-model-name "
        f"{MODEL.name} --enforce-eager --enable-prefix-caching --block-size {BLOCK_SIZE} --max-model-len "
        f"{MAX_MODEL_LEN} --dtype {DTYPE} --disable-uvicorn-access-log"
    )
    server = ServedProcess([sys.executable, *shlex.split(arguments)], ENV, workdir / f"{name}.log", port)
    server.start()
    try:
        await server.wait_healthy(START_TIMEOUT_S)
        yield server
    finally:
        server.stop()


def requests_for(args: argparse.Namespace, concurrency: int) -> int:
    # Enough requests that the concurrency is held for many rounds, not just ramped up and down.
    return args.requests or max(100, 20 * concurrency)


async def measure(args: argparse.Namespace, workdir: Path) -> list[Phase]:
    """direct, tandem | tandem, direct | ...: a drift in machine load over time hits both alike."""
    if not (MODEL / "config.json").is_file():
        raise SystemExit(f"no model at {MODEL} (make it: .venv/bin/tandem model make-tiny models/tiny-llama)")
    phases = []
    with control_plane(workdir) as (nats, etcd):
        for repeat in range(args.runs):
            for system in SYSTEMS if repeat % 2 == 0 else SYSTEMS[::-1]:
                async with serve(system, workdir, nats, etcd) as server:
                    for c in args.concurrency:
                        # Both systems get the same prompts in a repeat; no two runs share one, so the
                        # prefix cache never turns one system's prefill into a cache hit.
                        load = dataclasses.replace(LOAD, url=server.base_url, concurrency=c, seed=repeat * 1000 + c)
                        summary, _ = await run_load(
                            dataclasses.replace(load, requests=requests_for(args, c), warmup=max(8, 2 * c))
                        )
                        log.info("%s c=%d repeat %d: %s", system, c, repeat, summary.as_text().splitlines()[1])
                        phases.append(Phase((system, str(c)), summary))
    return phases


def render(phases: list[Phase], args: argparse.Namespace) -> list[str]:
    figures, rows, verdicts = median_rows(phases), [], []
    for c in map(str, args.concurrency):
        rows += [
            [system, c, *cells(figures[system, c], COLUMNS.values())] for system in SYSTEMS if (system, c) in figures
        ]
        if ("direct", c) in figures and ("tandem", c) in figures:
            direct, tandem = figures["direct", c], figures["tandem", c]
            ratios = [f"{tandem[f] / direct[f]:.2f}" if direct[f] else "n/a" for f, _ in list(COLUMNS.values())[:-2]]
            rows.append(["**Tandem / direct**", c, *ratios, "", ""])
            ratio = tandem["output_token_throughput"] / direct["output_token_throughput"]
            met = "meets" if ratio >= TARGET else "misses"
            verdicts.append(f"concurrency {c}: Tandem at {ratio:.0%} of direct ({met} the {TARGET:.0%} target)")
        else:
            verdicts.append(f"concurrency {c}: incomplete")
    # Prompt length as the servers counted it (the same prompts for both).
    prompt_tokens = statistics.fmean(p.summary.mean_prompt_tokens for p in phases if p.summary.completed)
    requests = ", ".join(f"{requests_for(args, c)} at c={c}" for c in args.concurrency)
    return [
        f"Both systems serve `{MODEL.name}` with the same engine: `enforce_eager`, block size {BLOCK_SIZE}, max "
        f"model length {MAX_MODEL_LEN}, dtype {DTYPE}, prefix caching on, `VLLM_CPU_KVCACHE_SPACE={KVCACHE_GIB}`, "
        f"engine threads `VLLM_CPU_OMP_THREADS_BIND={CPU_BIND}` for both. Direct is `python -m "
        "vllm.entrypoints.openai.api_server`; Tandem is the agg_router graph (Frontend → Processor → KV Router → "
        f"one VllmWorker) on its own NATS and etcd. One system runs at a time; the pair runs {args.runs} time(s), in "
        f"alternating order. Each run: bench.loadgen, chat API, streaming, {LOAD.prompt_tokens}-word prompts "
        f"({prompt_tokens:.0f} tokens by the servers' count), exactly {LOAD.max_tokens} output tokens "
        f"(`ignore_eos`), requests per run: {requests}, after a warm-up; no two runs send the same prompt. Numbers "
        "are medians over the repeats; ITL is the gap between streamed chunks as the client sees them, so a server "
        "that sends several tokens in one chunk shows a lower ITL p50 and a higher p99.",
        "",
        *table(" | ".join(["system", "concurrency", *COLUMNS]), rows),
        "",
        "; ".join(verdicts) + ".",
    ]


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="requests in flight")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main("bench.vs_direct", argv, "## Tandem vs direct vLLM (CPU, tiny model)", measure, render, options)


if __name__ == "__main__":
    sys.exit(main())
