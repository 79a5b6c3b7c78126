"""Tandem against the same vLLM engine served directly, side by side, on this machine.

One run starts its own NATS and etcd, then alternately (direct, Tandem, Tandem, direct, ...)
one system at a time: vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`)
or Tandem's agg_router graph with one VllmWorker, both with the same engine arguments and the
same CPU pinning. Each is measured with bench.loadgen at every concurrency, then stopped by
PID (with its child processes) before the other starts, so the two engines never compete.
Prints medians over the repeats and the ratio Tandem / direct as a markdown table;
`--write-docs` also puts that table, the command and the machine in docs/benchmarks.md.

    .venv/bin/python -m bench.vs_direct --repeats 3 --write-docs
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import psutil
import yaml

from app.infra import EtcdServer, NatsServer, free_port
from bench.docs import write_section
from bench.loadgen import LoadConfig, Summary, run_load, summary_json

log = logging.getLogger("bench.vs_direct")

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"
SECTION_TITLE = "## Tandem vs direct vLLM (CPU, tiny model)"
TANDEM_CONFIG = REPO_ROOT / "configs" / "cpu-tiny.yaml"
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 90.0

System = Literal["direct", "tandem"]
SYSTEMS: tuple[System, ...] = ("direct", "tandem")


@dataclass(frozen=True)
class EngineSettings:
    """The engine arguments both systems get, so the only difference is what serves them."""

    model: Path
    served_model_name: str
    block_size: int
    max_model_len: int
    dtype: str
    prefix_caching: bool
    cpu_bind: str
    kvcache_gib: str

    def environment(self) -> dict[str, str]:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": self.kvcache_gib}
        env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        if self.cpu_bind != "auto":
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_bind
        return env

    def vllm_argv(self, port: int) -> list[str]:
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--model", str(self.model),
            "--served-model-name", self.served_model_name,
            "--enforce-eager",
            "--block-size", str(self.block_size),
            "--max-model-len", str(self.max_model_len),
            "--dtype", self.dtype,
            "--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching",
            # Tandem's Frontend writes no access log; a line per request would be work only one side does.
            "--disable-uvicorn-access-log",
        ]

    def tandem_config(self, port: int) -> dict[str, Any]:
        """The shipped CPU config (configs/cpu-tiny.yaml) with one worker and these engine arguments."""
        config = yaml.safe_load(TANDEM_CONFIG.read_text())
        config["Common"].update(
            {
                "model": str(self.model),
                "served-model-name": self.served_model_name,
                "block-size": self.block_size,
                "max-model-len": self.max_model_len,
            }
        )
        config["Frontend"].update({"served-model-name": self.served_model_name, "port": port})
        worker = config["VllmWorker"]
        worker.update(
            {
                "enforce-eager": True,
                "enable-prefix-caching": self.prefix_caching,
                "dtype": self.dtype,
                "ServiceArgs": {"workers": 1},
            }
        )
        worker.pop("cpu-omp-threads-bind", None)
        if self.cpu_bind != "auto":
            worker["cpu-omp-threads-bind"] = [self.cpu_bind]
        config.pop("PrefillWorker", None)
        return config


@dataclass(frozen=True)
class LoadSettings:
    concurrencies: tuple[int, ...]
    requests: int | None
    warmup_rounds: int
    prompt_tokens: int
    max_tokens: int
    request_timeout_s: float

    def requests_for(self, concurrency: int) -> int:
        # Enough requests that the concurrency is held for many rounds, not just ramped up and down.
        return self.requests if self.requests is not None else max(100, 20 * concurrency)

    def warmup_for(self, concurrency: int) -> int:
        return max(8, self.warmup_rounds * concurrency)


@dataclass
class RunResult:
    system: System
    concurrency: int
    repeat: int
    summary: Summary


# --- processes ------------------------------------------------------------------------------


class ServedProcess:
    """A server process tree started in its own session and stopped by PID, children included."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, port: int) -> None:
        self.name = name
        self.port = port
        self.log_path = log_path
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=REPO_ROOT,
            )
        self._known_descendants: dict[int, psutil.Process] = {}
        log.info("started %s pid=%d port=%d (log %s)", name, self.process.pid, port, log_path)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _remember_descendants(self) -> None:
        # Snapshot while the parent lives: once it exits, its orphans can no longer be found from it.
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self._known_descendants.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass

    def wait_ready(self, model: str, deadline: float) -> None:
        """Until /health answers 200 and /v1/models lists `model` (the engine is loaded)."""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.process.returncode}:\n{self.log_tail()}")
            self._remember_descendants()
            if _http_status(f"{self.base_url}/health") == 200 and model in _served_models(self.base_url):
                self._remember_descendants()
                log.info("%s ready", self.name)
                return
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready in time:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the parent and give it time to stop its children; then kill whatever is left."""
        self._remember_descendants()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", self.name, STOP_TIMEOUT_S)
                self.process.kill()
                self.process.wait()
        leftovers = [p for p in self._known_descendants.values() if _still_running(p)]
        for child in leftovers:
            _signal_quietly(child, signal.SIGTERM)
        _, alive = psutil.wait_procs(leftovers, timeout=10)
        for child in alive:
            _signal_quietly(child, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)
        log.info("stopped %s pid=%d (%d leftover children)", self.name, self.process.pid, len(leftovers))


def _still_running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal_quietly(process: psutil.Process, sig: signal.Signals) -> None:
    try:
        process.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def _served_models(base_url: str) -> set[str]:
    try:
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=2.0) as response:
            return {card["id"] for card in json.load(response).get("data", [])}
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return set()


@contextmanager
def control_plane(workdir: Path) -> Iterator[tuple[str, str]]:
    """NATS and etcd on free ports for this run only; yields their client URLs."""
    nats = NatsServer("127.0.0.1", free_port(), free_port(), workdir / "nats")
    etcd = EtcdServer("127.0.0.1", free_port(), free_port(), workdir / "etcd")
    try:
        nats.start()
        etcd.start()
        yield nats.url, etcd.url
    finally:
        etcd.stop()
        nats.stop()


@contextmanager
def serve(
    system: System, engine: EngineSettings, workdir: Path, nats_url: str, etcd_url: str, deadline: float
) -> Iterator[ServedProcess]:
    port = free_port()
    tag = f"{system}-{uuid.uuid4().hex[:6]}"
    env = engine.environment()
    if system == "direct":
        argv = engine.vllm_argv(port)
    else:
        config_path = workdir / f"{tag}.yaml"
        config_path.write_text(yaml.safe_dump(engine.tandem_config(port)))
        tandem = str(Path(sys.executable).with_name("tandem"))
        argv = [tandem, "serve", "graphs.agg_router:Frontend", "-f", str(config_path)]
        # A fresh namespace, so that nothing a previous graph registered (until its lease ends) is seen.
        namespace = f"bench{tag.replace('-', '')}"
        env.update({"NATS_SERVER": nats_url, "ETCD_ENDPOINTS": etcd_url, "TANDEM_NAMESPACE": namespace})
    server = ServedProcess(system, argv, env, workdir / f"{tag}.log", port)
    try:
        server.wait_ready(engine.served_model_name, min(deadline, time.monotonic() + START_TIMEOUT_S))
        yield server
    finally:
        server.stop()


# --- measurement ----------------------------------------------------------------------------


def measure(
    server: ServedProcess, system: System, repeat: int, engine: EngineSettings, load: LoadSettings, deadline: float
) -> list[RunResult]:
    results = []
    for concurrency in load.concurrencies:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("time limit reached")
        config = LoadConfig(
            url=server.base_url,
            model=engine.served_model_name,
            concurrency=concurrency,
            requests=load.requests_for(concurrency),
            prompt_tokens=load.prompt_tokens,
            max_tokens=load.max_tokens,
            stream=True,
            ignore_eos=True,
            warmup=load.warmup_for(concurrency),
            # Both systems get the same prompts in a repeat; no two runs share one, so the
            # prefix cache (when on) never turns one system's prefill into a cache hit.
            seed=repeat * 1000 + concurrency,
            timeout_s=load.request_timeout_s,
            max_duration_s=remaining,
        )
        summary, _ = asyncio.run(run_load(config))
        log.info(
            "%s c=%d repeat %d: %.1f output tok/s, %.2f req/s, %d ok, %d failed",
            system, concurrency, repeat, summary.output_token_throughput, summary.request_throughput,
            summary.completed, summary.failed,
        )
        results.append(RunResult(system, concurrency, repeat, summary))
    return results


def run_order(repeats: int) -> list[tuple[int, System]]:
    """direct, tandem | tandem, direct | ...: a drift in machine load over time hits both alike."""
    order: list[tuple[int, System]] = []
    for repeat in range(repeats):
        pair = SYSTEMS if repeat % 2 == 0 else tuple(reversed(SYSTEMS))
        order.extend((repeat, system) for system in pair)
    return order


# --- report ---------------------------------------------------------------------------------

METRICS: tuple[tuple[str, str, float, str], ...] = (
    # (Summary field, column heading, scale, number format)
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
    table = {}
    for key, summaries in grouped.items():
        row = {}
        for field, _, scale, _ in METRICS:
            values = [getattr(s, field) for s in summaries if getattr(s, field) == getattr(s, field)]  # drops NaN
            row[field] = statistics.median(values) * scale if values else float("nan")
        row["runs"] = len(summaries)
        row["failed"] = sum(s.failed for s in summaries)
        table[key] = row
    return table


def markdown_table(results: Sequence[RunResult], concurrencies: Sequence[int]) -> str:
    table = medians(results)
    headings = ["system", "concurrency", *(heading for _, heading, _, _ in METRICS), "runs", "failed requests"]
    lines = ["| " + " | ".join(headings) + " |", "|" + " --- |" * len(headings)]
    for concurrency in concurrencies:
        for system in SYSTEMS:
            row = table.get((system, concurrency))
            if row is None:
                continue
            cells = [system, str(concurrency)]
            cells += [fmt.format(row[field]) for field, _, _, fmt in METRICS]
            cells += [str(row["runs"]), str(row["failed"])]
            lines.append("| " + " | ".join(cells) + " |")
        direct, tandem = table.get(("direct", concurrency)), table.get(("tandem", concurrency))
        if direct and tandem:
            ratios = [
                f"{tandem[field] / direct[field]:.2f}" if direct[field] else "n/a" for field, _, _, _ in METRICS
            ]
            lines.append("| **Tandem / direct** | " + str(concurrency) + " | " + " | ".join(ratios) + " | | |")
    return "\n".join(lines)


def verdict(results: Sequence[RunResult], concurrencies: Sequence[int], target: float) -> str:
    table = medians(results)
    parts = []
    for concurrency in concurrencies:
        direct, tandem = table.get(("direct", concurrency)), table.get(("tandem", concurrency))
        if not (direct and tandem and direct["output_token_throughput"]):
            parts.append(f"concurrency {concurrency}: incomplete")
            continue
        ratio = tandem["output_token_throughput"] / direct["output_token_throughput"]
        met = "meets" if ratio >= 1.0 - target else "misses"
        parts.append(
            f"concurrency {concurrency}: Tandem at {ratio:.0%} of direct ({met} the {1.0 - target:.0%} target)"
        )
    return "; ".join(parts)


def mean_prompt_tokens(results: Sequence[RunResult]) -> float:
    """Prompt length as the servers counted it; warns when the two systems saw different prompts."""
    by_system = {}
    for system in SYSTEMS:
        counts = [r.summary.mean_prompt_tokens for r in results if r.system == system and r.summary.completed]
        if counts:
            by_system[system] = statistics.fmean(counts)
    if len(set(round(v, 1) for v in by_system.values())) > 1:
        log.warning("the systems counted different prompt lengths: %s", by_system)
    return statistics.fmean(by_system.values()) if by_system else float("nan")


def machine_description() -> str:
    cpu_model = "unknown CPU"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            cpu_model = match.group(1).strip()
    except OSError:
        pass
    memory_gib = psutil.virtual_memory().total / 2**30
    return f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model}, {memory_gib:.0f} GiB RAM"


def section_text(
    command: str, started: datetime.datetime, elapsed_s: float, table: str, summary_line: str,
    engine: EngineSettings, load: LoadSettings, repeats: int, loads: tuple[tuple[float, ...], tuple[float, ...]],
    prompt_tokens: float,
) -> str:
    if engine.cpu_bind == "auto":
        pinning = "unpinned (vLLM's auto binding) for both"
    else:
        pinning = f"`VLLM_CPU_OMP_THREADS_BIND={engine.cpu_bind}` for both"
    prefix_caching = "on" if engine.prefix_caching else "off"
    requests = ", ".join(f"{load.requests_for(c)} at c={c}" for c in load.concurrencies)
    load_before = " ".join(f"{v:.2f}" for v in loads[0])
    load_after = " ".join(f"{v:.2f}" for v in loads[1])
    return f"""{SECTION_TITLE}

```bash
{command}
```

Run {started:%Y-%m-%d %H:%M} (local time), {elapsed_s / 60:.0f} min, on {machine_description()};
load average {load_before} before, {load_after} after.

Both systems serve `{engine.model.name}` with the same engine: `enforce_eager`, block size {engine.block_size},
max model length {engine.max_model_len}, dtype {engine.dtype}, prefix caching {prefix_caching},
`VLLM_CPU_KVCACHE_SPACE={engine.kvcache_gib}`, engine threads {pinning}. Direct is
`python -m vllm.entrypoints.openai.api_server`; Tandem is the agg_router graph
(Frontend → Processor → KV Router → one VllmWorker) on its own NATS and etcd. One system runs at
a time; the pair runs {repeats} time(s), in alternating order. Each run: bench.loadgen, chat
API, streaming, {load.prompt_tokens}-word prompts ({prompt_tokens:.0f} tokens by the servers' count),
exactly {load.max_tokens} output tokens (`ignore_eos`), requests per run: {requests}, after a
warm-up; no two runs send the same prompt. Numbers are medians over the repeats; ITL is the gap between streamed chunks as the client sees
them, so a server that sends several tokens in one chunk shows a lower ITL p50 and a higher p99.

{table}

{summary_line}.

**What it means.** The engine is identical and pinned identically, so the differences come
from the serving path. Tandem adds work: a hop to the Router and one to the worker over NATS
per request, one NATS frame per token from the worker, and the KV events and load reports the
worker publishes. It also moves work off the engine's process: HTTP, the chat template,
tokenization and detokenization run in the Frontend process (with the Processor pipeline
embedded), on the core the engine does not use, where direct vLLM's API server does them in
the process that feeds the engine. At concurrency 1 the added hops show in TTFT and ITL; at
concurrency {max(load.concurrencies)} the split across processes can outweigh them on these
{len(os.sched_getaffinity(0))} cores. The tiny model makes each engine step very cheap, so
serving overhead weighs far more here than with a real model on a GPU.
"""


# --- command line ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.vs_direct", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="how many (direct, Tandem) pairs, alternating order")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="concurrencies to measure")
    parser.add_argument(
        "--requests", type=int, default=None,
        help="measured requests per run (default: max(100, 20 x concurrency))",
    )
    parser.add_argument(
        "--warmup-rounds", type=int, default=2, help="warm-up requests = this x concurrency (at least 8)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--request-timeout", type=float, default=120.0, help="per-request limit, seconds")
    parser.add_argument("--model", type=Path, default=REPO_ROOT / "models" / "tiny-llama")
    parser.add_argument("--served-model-name", default="tiny-llama")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument(
        "--dtype", default="float32",
        help="the tiny model's own dtype; CPUs without AVX-512 BF16 run bfloat16 slower",
    )
    parser.add_argument(
        "--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
        help="on for both (as configs/cpu-tiny.yaml ships) or off for both",
    )
    parser.add_argument(
        "--cpu-bind", default="0",
        help="VLLM_CPU_OMP_THREADS_BIND for both engines ('auto': unpinned, vLLM's default)",
    )
    parser.add_argument("--kvcache-gib", default="1", help="VLLM_CPU_KVCACHE_SPACE for both")
    parser.add_argument(
        "--time-limit", type=float, default=3600.0, help="stop starting new work after this many seconds"
    )
    parser.add_argument(
        "--target", type=float, default=0.10, help="allowed throughput shortfall of Tandem (0.10: 10%%)"
    )
    parser.add_argument("--json-out", type=Path, help="also write every run's loadgen summary here")
    parser.add_argument(
        "--write-docs", type=Path, nargs="?", const=DOCS_PATH, default=None, metavar="PATH",
        help=f"replace this run's section in PATH (default {DOCS_PATH.relative_to(REPO_ROOT)}); other sections stay",
    )
    return parser


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Turns a SIGTERM into an exception, so that the finally blocks stop every server we started.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bench.loadgen").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    if args.repeats < 1 or min(args.concurrency) < 1:
        _parser().error("--repeats and --concurrency must be >= 1")
    engine = EngineSettings(
        model=args.model.resolve(),
        served_model_name=args.served_model_name,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        prefix_caching=args.prefix_caching,
        cpu_bind=args.cpu_bind,
        kvcache_gib=args.kvcache_gib,
    )
    if not (engine.model / "config.json").is_file():
        _parser().error(f"no model at {engine.model} (make it: .venv/bin/tandem model make-tiny models/tiny-llama)")
    load = LoadSettings(
        concurrencies=tuple(args.concurrency),
        requests=args.requests,
        warmup_rounds=args.warmup_rounds,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        request_timeout_s=args.request_timeout,
    )
    given = list(argv) if argv is not None else sys.argv[1:]
    command = " ".join([".venv/bin/python -m bench.vs_direct", *map(shlex.quote, given)])
    started_at = datetime.datetime.now()
    started = time.monotonic()
    deadline = started + args.time_limit
    load_before = os.getloadavg()
    results: list[RunResult] = []
    incomplete = False
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tandem-vs-direct-")))
        nats_url, etcd_url = stack.enter_context(control_plane(workdir))
        try:
            for repeat, system in run_order(args.repeats):
                with serve(system, engine, workdir, nats_url, etcd_url, deadline) as server:
                    results.extend(measure(server, system, repeat, engine, load, deadline))
        except TimeoutError as exc:
            incomplete = True
            log.error("stopped early: %s", exc)
    elapsed = time.monotonic() - started
    table = markdown_table(results, load.concurrencies)
    summary_line = verdict(results, load.concurrencies, args.target)
    sys.stdout.write(table + "\n\n" + summary_line + "\n")
    if args.json_out:
        runs = [
            {"system": r.system, "concurrency": r.concurrency, "repeat": r.repeat,
             "summary": json.loads(summary_json(r.summary))}
            for r in results
        ]
        args.json_out.write_text(json.dumps(runs, indent=2) + "\n")
    if args.write_docs and results and not incomplete:
        section = section_text(
            command, started_at, elapsed, table, summary_line, engine, load, args.repeats,
            (load_before, os.getloadavg()), mean_prompt_tokens(results),
        )
        write_section(args.write_docs, section)
        log.info("wrote %s", args.write_docs)
    return 1 if incomplete or not results else 0


if __name__ == "__main__":
    sys.exit(main())
