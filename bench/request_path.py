"""The request path at infinite worker speed: requests/s and CPU milliseconds per request.

Serves `graphs.agg_router:Frontend` (configs/mocker-8.yaml) with 2 mocker workers whose
`speedup-ratio` removes every simulated delay, so what is left is the serving overhead
alone: the Frontend (HTTP, SSE, the embedded Processor pipeline: chat template,
tokenizer, detokenizer, the worker stream) and the routing (hashing, index, placement
accounting), in two layouts: inside the Frontend (`embed-router: true`) and in the
config's 2 Router processes, called over NATS. Short chat prompts, 16-token streams,
concurrency 16 and 64.

CPU milliseconds per request come from the service processes' own CPU time (user +
system, /proc) over a load phase divided by the requests it completed: unlike
requests/s, they hardly move when other work shares the machine's cores.

    python -m bench.request_path --runs 3 --write-docs docs/benchmarks.md

The client is a few lines of asyncio streams (keep-alive HTTP/1.1, TCP_NODELAY, chunked
SSE read whole) rather than aiohttp: on a 2-core machine every millisecond the client
spends is one the server does not get.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgspec
import uvloop

from app.infra import EtcdServer, NatsServer, free_port
from bench import loadgen
from bench.docs import write_section
from bench.routing_scenarios import ServedGraph, chat_body, cpu_seconds

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DOCS_SECTION = "## Request path (mockers at infinite speed)"
INFINITE_SPEEDUP = 1e6
WORKERS = 2
MAX_TOKENS = 16
PROMPT_WORDS = 32
# The services whose CPU is the request path's cost; the mocker workers are reported apart.
PATH_SERVICES = ("Frontend", "Processor", "Router")
# Targets of the issue at concurrency 16.
TARGET_RPS = 600.0
TARGET_CPU_MS = 1.5
# Where the routing runs: the config's Router replicas, or inside the Frontend (embed-router).
LAYOUTS = ("router-in-frontend", "router-processes")


# --- a lean HTTP/1.1 client ------------------------------------------------------------------


class Connection:
    """One keep-alive connection; `post` sends a request and reads the whole response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self._reader = reader
        self._writer = writer
        self._host = host

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer, host)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self._writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self._host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        headers = head.lower()
        if b"transfer-encoding: chunked" not in headers:
            length = int(headers.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            return status, await self._reader.readexactly(length)
        chunks = []
        while True:
            size = int((await self._reader.readuntil(b"\r\n"))[:-2], 16)
            data = await self._reader.readexactly(size + 2)
            if size == 0:
                return status, b"".join(chunks)
            chunks.append(data[:-2])

    def close(self) -> None:
        self._writer.close()


_usage = msgspec.json.Decoder()


def completion_tokens(status: int, body: bytes) -> int:
    """Output tokens of a streamed chat completion (0 if it failed): the usage chunk is the
    last event before [DONE]."""
    events = body.rstrip().split(b"\n\n")
    if status != 200 or len(events) < 2 or events[-1] != b"data: [DONE]":
        return 0
    last = _usage.decode(events[-2][len(b"data: "):])
    return int((last.get("usage") or {}).get("completion_tokens") or 0)


async def drive(port: int, bodies: Sequence[bytes], concurrency: int) -> tuple[int, int, float]:
    """Closed loop, `concurrency` connections; (completed, failed, wall seconds)."""
    pending = iter(bodies)
    completed = failed = 0
    connections = [await Connection.open("127.0.0.1", port) for _ in range(concurrency)]

    async def client(connection: Connection) -> None:
        nonlocal completed, failed
        for body in pending:
            status, response = await connection.post("/v1/chat/completions", body)
            if completion_tokens(status, response) == MAX_TOKENS:
                completed += 1
            else:
                failed += 1
                if failed <= 3:
                    log.warning("request failed: %d %s", status, response[:300])

    started = time.perf_counter()
    try:
        await asyncio.gather(*(client(c) for c in connections))
    finally:
        for connection in connections:
            connection.close()
    return completed, failed, time.perf_counter() - started


# --- one measurement ---------------------------------------------------------------------------


@dataclass
class PathResult:
    concurrency: int
    requests_per_s: float
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)  # by service, nats-server too
    failed: int = 0
    layout: str = "router-processes"

    @property
    def path_cpu_ms(self) -> float:
        return sum(self.cpu_ms_per_request.get(service, 0.0) for service in PATH_SERVICES)


async def measure(
    graph: ServedGraph, nats: NatsServer, model: str, concurrency: int, requests: int, seed: int, layout: str
) -> PathResult:
    config = loadgen.LoadConfig(url="", model="", prompt_tokens=PROMPT_WORDS, seed=seed)
    bodies = [msgspec.json.encode(chat_body(model, p, MAX_TOKENS)) for p in loadgen.build_prompts(config, requests)]
    pids = graph.service_pids()
    if nats.pid is not None:
        pids["nats-server"] = [nats.pid]

    def cpu() -> dict[str, float]:
        return {service: sum(cpu_seconds(p) for p in ps) for service, ps in pids.items()}

    before = cpu()
    completed, failed, wall = await drive(graph.port, bodies, concurrency)
    after = cpu()
    per_request = max(completed, 1)
    return PathResult(
        concurrency=concurrency,
        requests_per_s=completed / wall,
        cpu_ms_per_request={s: (after[s] - before[s]) * 1000.0 / per_request for s in sorted(pids)},
        failed=failed,
        layout=layout,
    )


async def run_all(args: argparse.Namespace, workdir: Path) -> list[list[PathResult]]:
    """Per layout and concurrency, the results of every run.

    Both layouts' graphs are up at once (each in its own namespace, the idle one costing
    next to nothing) and their runs alternate, so that both see the same machine: measured
    one after the other, minutes apart, the same layout was seen to move by 30 %.
    """
    nats = NatsServer("127.0.0.1", free_port(), free_port(), workdir / "nats")
    etcd = EtcdServer("127.0.0.1", free_port(), free_port(), workdir / "etcd")
    overrides = [f"--VllmWorker.ServiceArgs.workers={WORKERS}", f"--VllmWorker.speedup-ratio={INFINITE_SPEEDUP:g}"]
    results: dict[tuple[str, int], list[PathResult]] = {}
    try:
        nats.start()
        etcd.start()
        async with contextlib.AsyncExitStack() as stack:
            graphs = {}
            for layout in args.layouts:
                embedded = layout == "router-in-frontend"
                layout_overrides = [*overrides, f"--Frontend.embed-router={str(embedded).lower()}"]
                graph = ServedGraph(args.config, layout_overrides, nats.url, etcd.url, workdir / f"serve-{layout}.log")
                graphs[layout] = await stack.enter_async_context(graph)
                await graph.wait_ready(WORKERS, 0 if embedded else args.routers)
                await measure(graph, nats, args.model, 16, 200, 0, layout)  # warm-up (caches, lazy imports)
            for concurrency in args.concurrency:
                for run in range(1, args.runs + 1):
                    for layout, graph in graphs.items():
                        result = await measure(graph, nats, args.model, concurrency, args.requests, 100 + run, layout)
                        log.info("%s, concurrency %d, run %d: %.0f req/s, path %.2f CPU-ms/request %s", layout,
                                 concurrency, run, result.requests_per_s, result.path_cpu_ms,
                                 {k: round(v, 2) for k, v in result.cpu_ms_per_request.items()})
                        results.setdefault((layout, concurrency), []).append(result)
    finally:
        etcd.stop()
        nats.stop()
    return list(results.values())


# --- the report ----------------------------------------------------------------------------------


READING_GUIDE = """\
How to read these numbers:

- Everything runs on one 2-core machine that other work shares: the load generator, NATS,
  etcd, the two mockers and the services. Both layouts' graphs are up at once and their
  runs alternate, so each pair of runs saw the same machine; measured minutes apart
  instead, one layout's numbers moved by 30 %. Compare the layouts within one table, and
  CPU milliseconds per request (each process's own CPU time over the phase, divided by the
  requests completed) rather than requests/s, which also carries the client's share.
- "path total" is Frontend + Router processes + Processor (idle: the Frontend runs the
  Processor pipeline itself by default). In `router-in-frontend` the Frontend's figure
  includes the router: ingesting the workers' KV events and load reports, hashing, the
  index, the policy and the placement accounting.
- Why the embedded router is cheaper: a request no longer makes a NATS round trip to a
  Router (an encode, a publish and a system call on each side, a reply to decode), and the
  fleet's KV events and placement messages are taken by one process instead of every Router
  replica. Where the embedded layout's Frontend spends it (py-spy, 16 in flight): about a
  sixth in the Hugging Face fast tokenizer's encode (0.1 to 0.2 ms for these 70-token
  prompts), an eighth in uvicorn (HTTP parsing, the SSE writes), a tenth in the router
  (decisions, taking the KV events), a twentieth each in the chat template and the socket
  writes to NATS, and the rest spread thin over asyncio, the NATS client's parser,
  pydantic validation and the detokenizer: per-request Python overhead, no single hot spot.
- requests/s is bound by the two cores: the path, the mockers and nats-server take the CPU
  milliseconds shown, and the client the rest of the machine.
- Router processes remain the layout for frontends that must stay thin, or where the
  routing should be scaled apart from HTTP; the KV-aware e2e tests run both layouts.
"""


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _key(runs_of: Sequence[PathResult]) -> str:
    return f"{runs_of[0].layout} @ {runs_of[0].concurrency}"


def medians(results: list[list[PathResult]]) -> dict[str, dict[str, float]]:
    """By layout and concurrency: median requests/s, path CPU ms and CPU ms of each process."""
    summary = {}
    for runs_of in results:
        services = sorted({s for r in runs_of for s in r.cpu_ms_per_request})
        summary[_key(runs_of)] = {
            "requests_per_s": _median([r.requests_per_s for r in runs_of]),
            "path_cpu_ms": _median([r.path_cpu_ms for r in runs_of]),
            **{s: _median([r.cpu_ms_per_request.get(s, math.nan) for r in runs_of]) for s in services},
        }
    return summary


def render_comparison(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], label: str) -> str:
    lines = [
        f"Before ({label}) and after, measured one after the other in one sitting:",
        "",
        "| layout @ concurrency | requests/s before | after | after / before | path CPU ms/request before | after "
        "| before / after |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, now in after.items():
        then = before.get(key)
        if then is None:
            continue
        lines.append(
            f"| {key} | {then['requests_per_s']:.0f} | {now['requests_per_s']:.0f} "
            f"| {now['requests_per_s'] / then['requests_per_s']:.2f}x | {then['path_cpu_ms']:.2f} "
            f"| {now['path_cpu_ms']:.2f} | {then['path_cpu_ms'] / now['path_cpu_ms']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def render(results: list[list[PathResult]], command: str, runs: int) -> str:
    lines = [
        f"Command: `{command}` (medians of {runs} runs each)",
        "",
        f"{WORKERS} mocker workers (speedup-ratio {INFINITE_SPEEDUP:g}), chat requests of {PROMPT_WORDS} words, "
        f"{MAX_TOKENS}-token streams, the Processor pipeline in the Frontend (the default). Two layouts of the "
        "routing: `router-in-frontend` (`embed-router: true`: the Frontend is the router replica, no Router "
        "process) and `router-processes` (the config's 2 Router replicas, called over NATS). "
        "CPU milliseconds per request by process:",
        "",
        "| layout | concurrency | requests/s | Frontend | Router processes | Processor (idle) | path total "
        f"(target <= {TARGET_CPU_MS:g} at 16) | mocker workers | nats-server |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    failed = 0
    for runs_of in results:
        concurrency = runs_of[0].concurrency
        failed += sum(r.failed for r in runs_of)

        def cpu(service: str) -> float:
            return _median([r.cpu_ms_per_request.get(service, 0.0) for r in runs_of])

        rps = _median([r.requests_per_s for r in runs_of])
        path = _median([r.path_cpu_ms for r in runs_of])
        judged = concurrency == 16
        routers = "none" if runs_of[0].layout == "router-in-frontend" else f"{cpu('Router'):.2f}"
        lines.append(
            f"| {runs_of[0].layout} | {concurrency} | {rps:.0f}"
            + (f" (target >= {TARGET_RPS:g}: {_met(rps >= TARGET_RPS)})" if judged else "")
            + f" | {cpu('Frontend'):.2f} | {routers} | {cpu('Processor'):.2f} | {path:.2f}"
            + (f" {_met(path <= TARGET_CPU_MS)}" if judged else "")
            + f" | {cpu('VllmWorker'):.2f} | {cpu('nats-server'):.2f} |"
        )
    lines += ["", f"Failed requests: {failed}.", ""]
    lines += _layout_ratios(medians(results))
    lines += [READING_GUIDE]
    return "\n".join(lines) + "\n"


def _layout_ratios(summary: dict[str, dict[str, float]]) -> list[str]:
    """The two layouts side by side (same run, same machine), where both were measured."""
    lines = []
    for key, embedded in summary.items():
        layout, _, concurrency = key.partition(" @ ")
        processes = summary.get(f"router-processes @ {concurrency}")
        if layout != "router-in-frontend" or processes is None:
            continue
        lines.append(
            f"- At concurrency {concurrency}, routing in the Frontend instead of in Router processes: "
            f"{embedded['requests_per_s'] / processes['requests_per_s']:.2f}x the requests/s, "
            f"path CPU per request {processes['path_cpu_ms'] / embedded['path_cpu_ms']:.2f}x lower."
        )
    return [*lines, ""] if lines else []


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.request_path", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "mocker-8.yaml")
    parser.add_argument("--model", default="tiny-llama", help="the served model name")
    parser.add_argument("--routers", type=int, default=2, help="Router replicas the config starts")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument(
        "--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS),
        help="router-processes: the Router replicas of the config; router-in-frontend: embed-router",
    )
    parser.add_argument("--runs", type=int, default=3, help="repetitions; the report gives medians")
    parser.add_argument("--requests", type=int, default=1000, help="requests per run")
    parser.add_argument("--workdir", type=Path, help="keep servers' data and logs here (default: a temporary folder)")
    parser.add_argument("--write-docs", type=Path, help="put the results in this markdown file's section")
    parser.add_argument("--save", type=Path, help="also write the results here (JSON), for --replay and --before")
    parser.add_argument("--replay", type=Path, help="report results saved by --save instead of measuring")
    parser.add_argument("--before", type=Path, help="results of an earlier run (--save): add a comparison")
    parser.add_argument("--before-label", default="an earlier version", help="what the earlier run measured")
    return parser


def _load(path: Path) -> tuple[str, int, list[list[PathResult]]]:
    saved = json.loads(path.read_text())
    return saved["command"], saved["runs"], [[PathResult(**r) for r in runs_of] for runs_of in saved["results"]]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.replay is not None:
        command, runs, results = _load(args.replay)
    else:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            results = uvloop.run(run_all(args, args.workdir))
        else:
            with tempfile.TemporaryDirectory(prefix="request-path-") as workdir:
                results = uvloop.run(run_all(args, Path(workdir)))
        command = "python -m bench.request_path " + " ".join(argv if argv is not None else sys.argv[1:])
        command, runs = command.strip(), args.runs
    if args.save is not None:
        saved = {"command": command, "runs": runs, "results": [[asdict(r) for r in runs_of] for runs_of in results]}
        args.save.write_text(json.dumps(saved, indent=1))
    table = render(results, command, runs)
    if args.before is not None:
        _, _, earlier = _load(args.before)
        table += "\n" + render_comparison(medians(earlier), medians(results), args.before_label)
    sys.stdout.write(table)
    if args.write_docs is not None:
        write_section(args.write_docs, f"{DOCS_SECTION}\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
