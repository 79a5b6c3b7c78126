"""The request path at infinite worker speed: requests/s and CPU milliseconds per request by process.

configs/mocker-8.yaml with 2 mocker workers whose speedup-ratio removes every simulated delay, so
what is left is the serving overhead alone, with the routing inside the Frontend (`embed-router`)
or in the config's Router processes. docs/benchmarks.md, "Request path", says how to read it.

    python -m bench.request_path --runs 3 --write-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from app.infra import EtcdServer, NatsServer
from bench.harness import cli, load
from bench.harness.launch import REPO, SERVED_MODEL, Layout, ServedGraph, control_plane
from bench.harness.report import publish, table
from bench.harness.stats import median

log = logging.getLogger(__name__)

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
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


AT_INFINITE_SPEED = (f"--VllmWorker.ServiceArgs.workers={WORKERS}", f"--VllmWorker.speedup-ratio={INFINITE_SPEEDUP:g}")
# Where the routing runs: inside the Frontend (embed-router), or in the config's 2 Router replicas.
LAYOUTS = {
    "router-in-frontend": Layout(
        REPO / "configs" / "mocker-8.yaml",
        WORKERS,
        routers=0,
        overrides=(*AT_INFINITE_SPEED, "--Frontend.embed-router=true"),
    ),
    "router-processes": Layout(
        REPO / "configs" / "mocker-8.yaml",
        WORKERS,
        routers=2,
        overrides=(*AT_INFINITE_SPEED, "--Frontend.embed-router=false"),
    ),
}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15


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


async def measure(graph: ServedGraph, nats_pid: int | None, concurrency: int, requests: int, seed: int) -> PathResult:
    """One load phase. CPU ms per request: each process's own CPU time over the phase over the requests
    completed, which (unlike requests/s) hardly moves when other work shares the machine's cores."""
    bodies = [load.request_body(SERVED_MODEL, p, MAX_TOKENS) for p in load.prompts(requests, PROMPT_WORDS, seed)]
    pids = {**graph.service_pids(), **({"nats-server": [nats_pid]} if nats_pid is not None else {})}

    def cpu() -> dict[str, float]:
        return {service: sum(cpu_seconds(p) for p in ps) for service, ps in pids.items()}

    before = cpu()
    results, wall = await load.drive(graph.base_url, load.CHAT_PATH, bodies, concurrency)
    after = cpu()
    load.count_failures(results)
    completed = sum(r.ok and r.output_tokens == MAX_TOKENS for r in results)
    cpu_ms = {s: (after[s] - before[s]) * 1000.0 / max(completed, 1) for s in sorted(pids)}
    return PathResult(concurrency, completed / wall, cpu_ms, failed=len(results) - completed)


async def measure_layouts(
    nats: NatsServer, etcd: EtcdServer, workdir: Path, layouts: Mapping[str, Layout], args: argparse.Namespace
) -> list[list[PathResult]]:
    """Per layout and concurrency (`args.concurrency`), the results of `args.runs` runs.

    All layouts' graphs are up at once (each in its own namespace, an idle one costing next to
    nothing) and their runs alternate, so that all see the same machine: measured one after the
    other, minutes apart, the same layout was seen to move by 30 %.
    """
    results: dict[tuple[str, int], list[PathResult]] = {}
    async with contextlib.AsyncExitStack() as stack:
        graphs = {}
        for name, layout in layouts.items():
            graphs[name] = graph = await stack.enter_async_context(layout.serve(f"serve-{name}", workdir, nats, etcd))
            await measure(graph, nats.pid, 16, 200, 0)  # a warm-up: caches, lazy imports
        for concurrency in args.concurrency:
            for run in range(1, args.runs + 1):
                for name, graph in graphs.items():
                    result = await measure(graph, nats.pid, concurrency, args.requests, 100 + run)
                    result.layout = name
                    cpu = {k: round(v, 2) for k, v in result.cpu_ms_per_request.items()}
                    log.info(
                        "%s, concurrency %d, run %d: %.0f req/s, %s", name, concurrency, run, result.requests_per_s, cpu
                    )
                    results.setdefault((name, concurrency), []).append(result)
    return list(results.values())


def medians(results: list[list[PathResult]]) -> dict[str, dict[str, float]]:
    """By "layout @ concurrency": median requests/s, path CPU ms and CPU ms of each process."""
    by_key = {}
    for rs in results:
        services = {s for r in rs for s in r.cpu_ms_per_request}
        figures = {s: median(r.cpu_ms_per_request.get(s, 0.0) for r in rs) for s in services}
        figures.update(
            requests_per_s=median(r.requests_per_s for r in rs), path_cpu_ms=median(r.path_cpu_ms for r in rs)
        )
        by_key[f"{rs[0].layout} @ {rs[0].concurrency}"] = figures
    return by_key


def render_comparison(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], label: str) -> str:
    rows = []
    for key, now in after.items():
        if (then := before.get(key)) is not None:
            rps, cpu = (then["requests_per_s"], now["requests_per_s"]), (then["path_cpu_ms"], now["path_cpu_ms"])
            rows.append(
                [
                    key,
                    f"{rps[0]:.0f}",
                    f"{rps[1]:.0f}",
                    f"{rps[1] / rps[0]:.2f}x",
                    f"{cpu[0]:.2f}",
                    f"{cpu[1]:.2f}",
                    f"{cpu[0] / cpu[1]:.2f}x",
                ]
            )
    headings = (
        "layout @ concurrency | requests/s before | after | after / before | path CPU ms/request before"
        " | after | before / after"
    )
    lines = [f"Before ({label}) and after, measured one after the other in one sitting:", "", *table(headings, rows)]
    return "\n".join(lines) + "\n"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def render(results: list[list[PathResult]], command: str, runs: int) -> str:
    summary, rows = medians(results), []
    for key, m in summary.items():
        layout, _, concurrency = key.partition(" @ ")
        rps, path = f"{m['requests_per_s']:.0f}", f"{m['path_cpu_ms']:.2f}"
        if concurrency == "16":  # the targets are the at 16 in flight
            rps += f" (target >= {TARGET_RPS:g}: {_met(m['requests_per_s'] >= TARGET_RPS)})"
            path += f" {_met(m['path_cpu_ms'] <= TARGET_CPU_MS)}"
        routers = "none" if layout == "router-in-frontend" else f"{m.get('Router', 0.0):.2f}"
        cpu = [f"{m.get(s, 0.0):.2f}" for s in ("Frontend", "Processor", "VllmWorker", "nats-server")]
        rows.append([layout, concurrency, rps, cpu[0], routers, cpu[1], path, cpu[2], cpu[3]])
    headings = (
        "layout | concurrency | requests/s | Frontend | Router processes | Processor (idle)"
        f" | path total (target <= {TARGET_CPU_MS:g} at 16) | mocker workers | nats-server"
    )
    lines = [
        f"Command: `{command}` (medians of {runs} runs each)",
        "",
        (
            f"{WORKERS} mocker workers (speedup-ratio {INFINITE_SPEEDUP:g}), chat requests of {PROMPT_WORDS} words, "
            f"{MAX_TOKENS}-token streams, the Processor pipeline in the Frontend (the default). Two layouts of the "
            "routing: `router-in-frontend` (`embed-router: true`: the Frontend is the router replica, no Router "
            "process) and `router-processes` (the config's 2 Router replicas, called over NATS). "
            "CPU milliseconds per request by process:"
        ),
        "",
        *table(headings, rows),
        "",
        f"Failed requests: {sum(r.failed for rs in results for r in rs)}.",
        "",
    ]
    for key, embedded in summary.items():  # the two layouts side by side, where both were measured
        layout, _, concurrency = key.partition(" @ ")
        if layout == "router-in-frontend" and (processes := summary.get(f"router-processes @ {concurrency}")):
            faster = embedded["requests_per_s"] / processes["requests_per_s"]
            cheaper = processes["path_cpu_ms"] / embedded["path_cpu_ms"]
            lines.append(
                f"- At concurrency {concurrency}, routing in the Frontend instead of in Router processes: "
                f"{faster:.2f}x the requests/s, path CPU per request {cheaper:.2f}x lower."
            )
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.parser("python -m bench.request_path", __doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--requests", type=int, default=1000, help="requests per run")
    parser.add_argument("--save", type=Path, help="also write the results here (JSON), for --before")
    parser.add_argument("--before", type=Path, help="results of an earlier run (--save): add a comparison")
    parser.add_argument("--before-label", default="an earlier version", help="what the earlier run measured")
    args = parser.parse_args(argv)
    cli.setup_logging()
    layouts = {name: LAYOUTS[name] for name in args.layouts}
    with cli.workdir(args.workdir) as workdir, control_plane(workdir) as (nats, etcd):
        results = cli.run(measure_layouts(nats, etcd, workdir, layouts, args))
    command = cli.command_line("python -m bench.request_path", argv)
    if args.save is not None:
        saved = {"command": command, "runs": args.runs, "results": [[asdict(r) for r in rs] for rs in results]}
        args.save.write_text(json.dumps(saved, indent=1))
    report = render(results, command, args.runs)
    if args.before is not None:
        earlier = [[PathResult(**r) for r in rs] for rs in json.loads(args.before.read_text())["results"]]
        report += "\n" + render_comparison(medians(earlier), medians(results), args.before_label)
    publish(report, DOCS_SECTION, args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
