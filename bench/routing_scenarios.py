"""KV-aware routing on simulated workers: cache hits, TTFT and load spread, kv vs round-robin.

Runs `graphs.agg_router:Frontend` with mocker workers (configs/mocker-8.yaml) under
`tandem serve`, on its own NATS and etcd (free loopback ports) and its own namespace,
and drives three scenarios through the OpenAI API:

  shared    long prompts whose first 90 % is one of several prefix groups; the hit rate
            (usage.prompt_tokens_details.cached_tokens / prompt tokens) is compared with
            the best possible placement, and TTFT p50 with round-robin routing's.
  spread    prompts that share nothing: requests per worker (X-Tandem-Worker), max/mean.
  overhead  2 workers at near-infinite speed, 16-token streams: requests/s and the CPU
            milliseconds per request the Frontend, Processor and Router processes spend.

    python -m bench.routing_scenarios --runs 3 --write-docs docs/benchmarks.md

Every process started here is stopped by its PID at the end, and each load phase
stops starting requests after --max-duration seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import psutil

from app.infra import EtcdServer, NatsServer, free_port, pid_alive, stop_pid
from app.openai.schema import ChatCompletionRequest, parse_request
from app.preprocess import Preprocessor
from app.router.hashing import block_hashes
from app.runtime import InstanceRecord, Runtime
from app.settings import RuntimeSettings
from bench import loadgen
from bench.docs import write_section

log = logging.getLogger(__name__)

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
TANDEM = str(Path(sys.executable).parent / "tandem")
GRAPH = "graphs.agg_router:Frontend"
DOCS_SECTION = "## KV routing (mockers)"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
# Workers of the overhead scenario: fast enough that the request path alone sets the pace.
INFINITE_SPEEDUP = 1e6


# --- the graph under test -------------------------------------------------------------


def _descendants(parent: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(parent).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _service_of(pid: int) -> str | None:
    """`Frontend` for `python -m app.sdk.process app.components.frontend:Frontend ...`."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for arg in argv:
        if arg.startswith(b"app.") and b":" in arg:
            return arg.split(b":", 1)[1].decode()
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15


class ServedGraph:
    """`tandem serve GRAPH -f CONFIG OVERRIDES...` in a namespace of its own.

    `tandem serve` runs supervisord as its child, and the service processes are
    supervisord's children. `stop()` terminates `tandem serve` (supervisord stops its
    programs) and then kills, by PID, any service process still alive.
    """

    def __init__(
        self,
        config: Path,
        overrides: Sequence[str],
        nats_url: str,
        etcd_url: str,
        log_path: Path,
        graph: str = GRAPH,
        lease_ttl_s: int = 10,
    ) -> None:
        self.port = free_port()
        self.settings = RuntimeSettings(
            nats_server=nats_url, etcd_endpoints=etcd_url, namespace=f"bench{uuid.uuid4().hex[:10]}",
            lease_ttl_s=lease_ttl_s, connect_timeout_s=10.0,
        )
        self.command = [TANDEM, "serve", graph, "-f", str(config), f"--Frontend.port={self.port}", *overrides]
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.runtime: Runtime | None = None
        self._seen_pids: set[int] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ServedGraph:
        self.start()
        try:
            self.runtime = await Runtime.connect(self.settings)
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self.runtime is not None:
                await self.runtime.close()
        finally:
            self.stop()

    def start(self) -> None:
        env = {
            **os.environ,
            "NATS_SERVER": self.settings.nats_server,
            "ETCD_ENDPOINTS": self.settings.etcd_endpoints,
            "TANDEM_NAMESPACE": self.settings.namespace,
            "TANDEM_LEASE_TTL_S": str(self.settings.lease_ttl_s),
        }
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                self.command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        log.info("started %s (pid %d), log %s", " ".join(self.command[1:]), self.proc.pid, self.log_path)

    def service_pids(self) -> dict[str, list[int]]:
        """Live service processes by service name (supervisord's children)."""
        assert self.proc is not None
        by_service: dict[str, list[int]] = {}
        for pid in _descendants(self.proc.pid):
            name = _service_of(pid)
            if name is not None:
                self._seen_pids.add(pid)
                by_service.setdefault(name, []).append(pid)
        return by_service

    async def instances(self, service: str, endpoint: str) -> dict[str, InstanceRecord]:
        """The live instance records of an endpoint, by instance id."""
        assert self.runtime is not None
        watch = await self.runtime.discovery.watch_instances(service, endpoint)
        try:
            return dict(watch.items)
        finally:
            await watch.close()

    async def wait_ready(self, workers: int, routers: int, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
        """Wait for `workers` workers, `routers` routers and a Frontend that lists a model;
        returns the model record's metadata (block_size, model_path, ...)."""
        assert self.runtime is not None and self.proc is not None
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"tandem serve exited with {self.proc.returncode}; see {self.log_path}")
                counts = (
                    len(await self.instances("VllmWorker", "generate")),
                    len(await self.instances("Router", "route")),
                    len(await self.instances("Processor", "chat_completions")),
                )
                if counts == (workers, routers, 1) and await self._frontend_lists_a_model(session):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"graph not ready after {timeout:.0f} s: (workers, routers, processors) = {counts}; see {self.log_path}"
                    )
                await asyncio.sleep(0.5)
        self.service_pids()
        models = await self.runtime.discovery.list_models()
        return dict(next(iter(models.values()))[0].metadata)

    async def _frontend_lists_a_model(self, session: aiohttp.ClientSession) -> bool:
        try:
            async with session.get(f"{self.url}/v1/models", timeout=aiohttp.ClientTimeout(total=2)) as response:
                return response.status == 200 and bool((await response.json()).get("data"))
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.service_pids()  # remember who runs now, in case supervisord leaves one behind
            stop_pid(self.proc.pid, STOP_TIMEOUT_S, self.proc)
        for pid in self._seen_pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc = None


# --- the load ---------------------------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    sent_at: float = 0.0  # time.perf_counter() when sent
    first_token_at: float | None = None
    e2e_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    worker: str | None = None
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.sent_at


def chat_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def send(session: aiohttp.ClientSession, url: str, body: dict[str, Any], timeout_s: float) -> Outcome:
    """One streamed chat completion; keeps what loadgen's results drop: the cached tokens."""
    started = time.perf_counter()
    first: float | None = None
    usage: dict[str, Any] = {}
    try:
        async with session.post(
            f"{url}/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            worker = response.headers.get(loadgen.WORKER_HEADER)
            if response.status != 200:
                return Outcome(ok=False, worker=worker, error=f"http {response.status}: {(await response.text())[:200]}")
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    return Outcome(ok=False, worker=worker, error=str(chunk["error"])[:200])
                if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ()):
                    first = time.perf_counter()
                usage = chunk.get("usage") or usage
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return Outcome(ok=False, error=f"{type(exc).__name__}: {exc}")
    if not usage:
        return Outcome(ok=False, worker=worker, error="no usage chunk")
    return Outcome(
        ok=True,
        sent_at=started,
        first_token_at=first,
        e2e_s=time.perf_counter() - started,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
        worker=worker,
    )


async def drive(
    url: str, bodies: Sequence[dict[str, Any]], concurrency: int, max_duration_s: float, timeout_s: float = 60.0
) -> tuple[list[Outcome], float]:
    """Closed loop: `concurrency` clients take the bodies in order; none starts a request
    after `max_duration_s`. Returns outcomes in request order (unsent ones left out) and
    the wall time."""
    outcomes: dict[int, Outcome] = {}
    pending = iter(enumerate(bodies))
    deadline = time.monotonic() + max_duration_s
    connector = aiohttp.TCPConnector(limit=concurrency, socket_factory=loadgen._nodelay_socket)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            for index, body in pending:
                if time.monotonic() >= deadline:
                    return
                outcomes[index] = await send(session, url, body, timeout_s)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return [outcomes[i] for i in sorted(outcomes)], wall


def _failures(outcomes: Sequence[Outcome]) -> int:
    failed = [o for o in outcomes if not o.ok]
    for outcome in failed[:3]:
        log.warning("request failed: %s", outcome.error)
    return len(failed)


# --- scenario (a): shared prefixes --------------------------------------------------------


@dataclass(frozen=True)
class SharedWorkload:
    prompt_words: int = 1000  # about 1.8k tokens with the tiny model's tokenizer
    shared_ratio: float = 0.9
    # Not a multiple of the worker count: a blind rotation must not line groups up with workers.
    groups: int = 20
    requests: int = 160
    concurrency: int = 16
    max_tokens: int = 16

    def prompts(self, seed: int) -> list[str]:
        config = loadgen.LoadConfig(
            url="", model="", requests=self.requests, prompt_tokens=self.prompt_words,
            shared_prefix_ratio=self.shared_ratio, prefix_groups=self.groups, seed=seed,
        )
        return loadgen.build_prompts(config, self.requests)


def best_possible_cached(token_ids: Sequence[Sequence[int]], outcomes: Sequence[Outcome], block_size: int) -> list[int]:
    """Cached tokens per request under an oracle that sends every request to a worker
    already holding the longest prefix any earlier request computed: a request can hit
    the full blocks it shares with a request whose prefill was done (its first token
    came back) before it was sent, short of its own last token, which an engine always
    computes. So the first request of each group misses, and so do those sent while it
    was still prefilling. Evictions are ignored: the oracle's caches never fill."""
    hashes = [block_hashes(tokens, block_size) for tokens in token_ids]
    # A chained block hash names its whole prefix: when was each prefix first computed?
    computed_at: dict[int, float] = {}
    for prefix, outcome in zip(hashes, outcomes):
        if outcome.first_token_at is not None:
            for block in prefix:
                computed_at[block] = min(computed_at.get(block, math.inf), outcome.first_token_at)
    cached = []
    for tokens, prefix, outcome in zip(token_ids, hashes, outcomes):
        usable = prefix[: (len(tokens) - 1) // block_size]
        hit = 0
        while hit < len(usable) and computed_at.get(usable[hit], math.inf) < outcome.sent_at:
            hit += 1
        cached.append(hit * block_size)
    return cached


@dataclass
class SharedResult:
    hit_rate: float
    best_hit_rate: float
    ttft_p50_s: float
    requests_per_s: float
    failed: int


async def run_shared(graph: ServedGraph, model: str, workload: SharedWorkload, seed: int,
                     preprocessor: Preprocessor, block_size: int, max_duration_s: float) -> SharedResult:
    prompts = workload.prompts(seed)
    bodies = [chat_body(model, p, workload.max_tokens) for p in prompts]
    outcomes, wall = await drive(graph.url, bodies, workload.concurrency, max_duration_s)
    # The oracle sees exactly the token ids the Processor sent to the workers.
    token_ids = await asyncio.to_thread(
        lambda: [
            preprocessor.preprocess(parse_request(ChatCompletionRequest, body), f"oracle-{i}").token_ids
            for i, body in enumerate(bodies[: len(outcomes)])
        ]
    )
    best = await asyncio.to_thread(best_possible_cached, token_ids, outcomes, block_size)
    ok = [(o, b) for o, b in zip(outcomes, best) if o.ok]
    prompt_total = sum(o.prompt_tokens for o, _ in ok) or 1
    return SharedResult(
        hit_rate=sum(o.cached_tokens for o, _ in ok) / prompt_total,
        best_hit_rate=sum(b for _, b in ok) / prompt_total,
        ttft_p50_s=loadgen.percentile([o.ttft_s for o, _ in ok if o.ttft_s is not None], 50),
        requests_per_s=len(ok) / wall,
        failed=_failures(outcomes),
    )


# --- scenario (b): nothing shared -----------------------------------------------------------


@dataclass(frozen=True)
class SpreadWorkload:
    prompt_words: int = 256
    requests: int = 160
    concurrency: int = 16
    max_tokens: int = 16


@dataclass
class SpreadResult:
    per_worker: list[int]
    failed: int

    @property
    def max_over_mean(self) -> float:
        mean = statistics.fmean(self.per_worker) if self.per_worker else 0.0
        return max(self.per_worker) / mean if mean else math.nan


async def run_spread(graph: ServedGraph, model: str, workload: SpreadWorkload, seed: int, max_duration_s: float) -> SpreadResult:
    config = loadgen.LoadConfig(url="", model="", prompt_tokens=workload.prompt_words, seed=seed)
    bodies = [chat_body(model, p, workload.max_tokens) for p in loadgen.build_prompts(config, workload.requests)]
    outcomes, _ = await drive(graph.url, bodies, workload.concurrency, max_duration_s)
    counts = Counter(o.worker for o in outcomes if o.ok)
    workers = await graph.instances("VllmWorker", "generate")
    return SpreadResult(per_worker=sorted((counts.get(w, 0) for w in workers), reverse=True), failed=_failures(outcomes))


# --- scenario (c): the request path at infinite worker speed ---------------------------------


@dataclass
class OverheadResult:
    frontend: str  # a label of OVERHEAD_FRONTENDS
    concurrency: int
    requests_per_s: float
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)  # by service
    failed: int = 0

    @property
    def path_cpu_ms(self) -> float:
        return sum(ms for service, ms in self.cpu_ms_per_request.items() if service != "VllmWorker")


async def run_overhead(graph: ServedGraph, frontend: str, model: str, concurrency: int, requests: int, seed: int,
                       max_duration_s: float) -> OverheadResult:
    config = loadgen.LoadConfig(url="", model="", prompt_tokens=32, seed=seed)
    bodies = [chat_body(model, p, 16) for p in loadgen.build_prompts(config, requests)]
    pids = graph.service_pids()
    before = {service: sum(cpu_seconds(p) for p in ps) for service, ps in pids.items()}
    outcomes, wall = await drive(graph.url, bodies, concurrency, max_duration_s)
    after = {service: sum(cpu_seconds(p) for p in ps) for service, ps in pids.items()}
    completed = sum(o.ok for o in outcomes) or 1
    return OverheadResult(
        frontend=frontend,
        concurrency=concurrency,
        requests_per_s=sum(o.ok for o in outcomes) / wall,
        cpu_ms_per_request={s: (after[s] - before[s]) * 1000.0 / completed for s in sorted(pids)},
        failed=_failures(outcomes),
    )


# --- orchestration and the report --------------------------------------------------------------

# The routings the shared-prefix scenario compares: label -> `tandem serve` overrides.
# kv's default overlap weight (2) weighs a cached block twice a block to compute: it keeps
# a group on the worker that holds it even while that worker prefills another group's
# first prompt; weight 1 shows what happens without that.
ROUTINGS: dict[str, list[str]] = {
    "kv (default knobs)": ["--Router.router=kv"],
    "kv, overlap-weight 1": ["--Router.router=kv", "--Router.knobs={overlap-weight: 1}"],
    "round-robin": ["--Router.router=round-robin"],
}
BASELINE = "round-robin"
DEFAULT_ROUTING = "kv (default knobs)"
# How the Frontend reaches the Processor pipeline in the overhead scenario.
OVERHEAD_FRONTENDS: dict[str, list[str]] = {
    "in the Frontend (default)": [],
    "own process, over NATS": ["--Frontend.embed-processor=false"],
}


@dataclass
class Report:
    shared: dict[str, list[SharedResult]] = field(default_factory=dict)  # by routing
    spread: list[SpreadResult] = field(default_factory=list)
    overhead: list[OverheadResult] = field(default_factory=list)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _median_run(runs: Sequence[T], key: Callable[[T], float]) -> T:
    """The run whose measure is the median (the lower one for an even count)."""
    return sorted(runs, key=key)[(len(runs) - 1) // 2]


async def _routing_runs(args: argparse.Namespace, routing: str, nats_url: str, etcd_url: str, workdir: Path,
                        report: Report) -> None:
    """The shared scenario (and, under plain kv, the spread one) on a fresh graph."""
    log_path = workdir / f"serve-{routing.replace(' ', '').replace(',', '-')}.log"
    async with ServedGraph(args.config, ROUTINGS[routing], nats_url, etcd_url, log_path) as graph:
        metadata = await graph.wait_ready(args.workers, args.routers)
        # Off the event loop: loading transformers takes seconds, longer than a lease might wait.
        preprocessor = await asyncio.to_thread(
            Preprocessor, REPO / metadata["model_path"], max_model_len=int(metadata["max_model_len"])
        )
        # Each run brings new prefix groups (a new seed): earlier runs' cache contents only
        # take room, as an older workload's would.
        for run in range(1, args.runs + 1):
            if "shared" in args.scenarios:
                result = await run_shared(graph, args.model, SharedWorkload(), run, preprocessor,
                                          int(metadata["block_size"]), args.max_duration)
                log.info("shared, %s, run %d: %s", routing, run, result)
                report.shared.setdefault(routing, []).append(result)
            if "spread" in args.scenarios and routing == DEFAULT_ROUTING:
                spread = await run_spread(graph, args.model, SpreadWorkload(), 100 + run, args.max_duration)
                log.info("spread, run %d: %s", run, spread)
                report.spread.append(spread)


async def _overhead_runs(args: argparse.Namespace, nats_url: str, etcd_url: str, workdir: Path, report: Report) -> None:
    for frontend, frontend_overrides in OVERHEAD_FRONTENDS.items():
        overrides = ["--VllmWorker.ServiceArgs.workers=2", f"--VllmWorker.speedup-ratio={INFINITE_SPEEDUP:g}",
                     *frontend_overrides]
        log_path = workdir / f"serve-overhead-{len(report.overhead)}.log"
        async with ServedGraph(args.config, overrides, nats_url, etcd_url, log_path) as graph:
            await graph.wait_ready(2, args.routers)
            await run_overhead(graph, frontend, args.model, 16, 64, 0, args.max_duration)  # warm-up, not reported
            for concurrency in (16, 64):
                runs = []
                for run in range(1, args.runs + 1):
                    result = await run_overhead(graph, frontend, args.model, concurrency, args.overhead_requests,
                                                200 + run, args.max_duration)
                    log.info("overhead, %s, concurrency %d, run %d: %s", frontend, concurrency, run, result)
                    runs.append(result)
                report.overhead.append(_median_run(runs, lambda r: r.requests_per_s))


async def run_all(args: argparse.Namespace, workdir: Path) -> Report:
    report = Report()
    nats = NatsServer("127.0.0.1", free_port(), free_port(), workdir / "nats")
    etcd = EtcdServer("127.0.0.1", free_port(), free_port(), workdir / "etcd")
    try:
        nats.start()
        etcd.start()
        if "shared" in args.scenarios:
            routings = list(ROUTINGS)
        else:
            routings = [DEFAULT_ROUTING] if "spread" in args.scenarios else []
        for routing in routings:
            await _routing_runs(args, routing, nats.url, etcd.url, workdir, report)
        if "overhead" in args.scenarios:
            await _overhead_runs(args, nats.url, etcd.url, workdir, report)
    finally:
        etcd.stop()
        nats.stop()
    return report


READING_GUIDE = """\
How to read these numbers:

- The graph is `configs/mocker-8.yaml`: 8 mocker workers (about 5k prefill tokens/s, ~10 ms
  decode steps, 640 KV blocks of 16 tokens each: room for about six of the 1.6k-token
  prefixes) behind 2 Router replicas, all on one 2-core machine shared with other work, so
  absolute times move by tens of percent from run to run; the ratios are the point.
- KV hit rate is the share of prompt tokens the workers served from their prefix cache
  (`usage.prompt_tokens_details.cached_tokens`). "Best possible" is an oracle that sends
  each request to a worker already holding the longest prefix any earlier request had
  finished prefilling when it was sent: the first request of each group misses, and so
  does one sent while its group's first was still prefilling. The oracle's caches never
  fill; the real ones do.
- Round-robin sends every group everywhere: each worker would need all 20 prefixes, holds
  about six, and evicts them in turn, so it almost never hits and prefills each prompt in
  full. That is why its TTFT is several times kv's.
- With `overlap-weight: 1` the kv policy counts a worker's queued prefills block for block
  against the blocks it has cached. In the first seconds, when every worker is prefilling a
  new group's first prompt, a group's second request often finds its home busy and goes to
  an idle worker, which then holds a second copy of the group: those requests miss, and the
  copies crowd the caches. The default weight, 2 (a cached block counts twice), keeps
  groups at home and reaches the oracle's hit rate with the lowest TTFT.
- The request-path table is the serving overhead alone: the workers answer at once, so the
  CPU milliseconds per request are what the Frontend (HTTP, SSE), the Processor pipeline
  (chat template, tokenizer, detokenizer, the Router call, the worker stream) and the
  Routers (hashing, index, placement events) cost. By default the Frontend runs the
  Processor pipeline itself and the Processor service idles; `embed-processor: false`
  puts it back in its own process, one more NATS hop per request and per token.
  requests/s is bound by the machine's 2 cores, which the load generator, NATS and etcd
  share.
"""


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def render(report: Report, command: str, runs: int) -> str:
    lines = [f"Command: `{command}` (medians of {runs} run(s) each)", ""]
    if report.shared:
        workload = SharedWorkload()
        baseline_ttft = _median([r.ttft_p50_s for r in report.shared.get(BASELINE, [])])
        lines += [
            f"Shared prefixes: {workload.requests} chat requests of about {workload.prompt_words} words "
            f"(~1.8k tokens), the first {workload.shared_ratio:.0%} one of {workload.groups} prefixes, "
            f"{workload.max_tokens} output tokens, concurrency {workload.concurrency}.",
            "",
            "| routing | KV hit rate | best possible | hit / best (target >= 95 %) "
            f"| TTFT p50 | {BASELINE} TTFT p50 / this (target >= 2) | requests/s |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for routing, results in report.shared.items():
            hit = _median([r.hit_rate for r in results])
            best = _median([r.best_hit_rate for r in results])
            of_best = _median([r.hit_rate / r.best_hit_rate for r in results if r.best_hit_rate])
            ttft = _median([r.ttft_p50_s for r in results])
            judged = routing != BASELINE
            speedup = baseline_ttft / ttft
            lines.append(
                f"| {routing} | {hit:.1%} | {best:.1%} | {of_best:.1%}"
                + (f" {_met(of_best >= 0.95)}" if judged else "")
                + f" | {ttft * 1000:.0f} ms | {speedup:.2f}"
                + (f" {_met(speedup >= 2)}" if judged else "")
                + f" | {_median([r.requests_per_s for r in results]):.1f} |"
            )
        lines.append("")
    if report.spread:
        workload = SpreadWorkload()
        median_run = _median_run(report.spread, lambda s: s.max_over_mean)
        lines += [
            f"No sharing (kv): {workload.requests} requests of about {workload.prompt_words} unrelated words, "
            f"concurrency {workload.concurrency}; requests per worker "
            f"{' / '.join(map(str, median_run.per_worker))}: max / mean = {median_run.max_over_mean:.2f} "
            f"(target <= 1.5: {_met(median_run.max_over_mean <= 1.5)}).",
            "",
        ]
    if report.overhead:
        lines += [
            f"Request path at infinite worker speed: 2 mocker workers (speedup {INFINITE_SPEEDUP:g}), "
            "16-token streams, short prompts; CPU milliseconds per request by service:",
            "",
            "| Processor pipeline | concurrency | requests/s | Frontend | Processor | Router (2 replicas) | path total "
            "| mocker workers |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for result in report.overhead:
            cpu = result.cpu_ms_per_request
            lines.append(
                f"| {result.frontend} | {result.concurrency} | {result.requests_per_s:.0f} | {cpu.get('Frontend', math.nan):.2f} "
                f"| {cpu.get('Processor', math.nan):.2f} | {cpu.get('Router', math.nan):.2f} "
                f"| {result.path_cpu_ms:.2f} | {cpu.get('VllmWorker', math.nan):.2f} |"
            )
        lines.append("")
    failed = (
        sum(r.failed for rs in report.shared.values() for r in rs)
        + sum(s.failed for s in report.spread)
        + sum(r.failed for r in report.overhead)
    )
    lines += [f"Failed requests: {failed}.", "", READING_GUIDE]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.routing_scenarios", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "mocker-8.yaml")
    parser.add_argument("--model", default="tiny-llama", help="the served model name")
    parser.add_argument("--workers", type=int, default=8, help="VllmWorker replicas the config starts")
    parser.add_argument("--routers", type=int, default=2, help="Router replicas the config starts")
    parser.add_argument("--scenarios", nargs="+", choices=("shared", "spread", "overhead"),
                        default=["shared", "spread", "overhead"])
    parser.add_argument("--runs", type=int, default=3, help="repetitions; the report gives medians")
    parser.add_argument("--overhead-requests", type=int, default=400)
    parser.add_argument("--max-duration", type=float, default=60.0, help="per load phase, seconds")
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
        with tempfile.TemporaryDirectory(prefix="routing-scenarios-") as workdir:
            report = asyncio.run(run_all(args, Path(workdir)))
    command = "python -m bench.routing_scenarios " + " ".join(argv if argv is not None else sys.argv[1:])
    table = render(report, command.strip(), args.runs)
    sys.stdout.write(table)
    if args.write_docs is not None:
        write_section(args.write_docs, f"{DOCS_SECTION}\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
