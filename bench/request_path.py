"""The request path at infinite worker speed: requests/s and CPU milliseconds per request by process."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.harness import cli
from bench.harness.launch import REPO, SERVED_MODEL, Layout, ServedGraph, control_plane, measure_layouts
from bench.harness.report import met, table
from bench.harness.stats import Phase, median_rows
from bench.loadgen import LoadConfig, run_load

log = logging.getLogger(__name__)

WORKERS, SPEEDUP = 2, 1e6  # mocker workers whose speedup-ratio removes every simulated delay
LOAD = LoadConfig(url="", model=SERVED_MODEL, requests=1000, prompt_tokens=32, max_tokens=16, ignore_eos=True)
PATH_SERVICES = ("Frontend", "Processor", "Router")  # whose CPU is the request path's
TARGET_RPS, TARGET_CPU_MS = 600.0, 1.5  # the issue's, at concurrency 16
NO_DELAYS = (f"--VllmWorker.ServiceArgs.workers={WORKERS}", f"--VllmWorker.speedup-ratio={SPEEDUP:g}")
# Where the routing runs: inside the Frontend (embed-router), or in the config's 2 Router replicas.
MOCKERS = REPO / "configs" / "mocker-8.yaml"
LAYOUTS = {
    "router-in-frontend": Layout(MOCKERS, WORKERS, routers=0, overrides=(*NO_DELAYS, "--Frontend.embed-router=true")),
    "router-processes": Layout(MOCKERS, WORKERS, routers=2, overrides=(*NO_DELAYS, "--Frontend.embed-router=false")),
}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads): /proc/<pid>/stat fields 14 and 15."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def measure(args: argparse.Namespace, workdir: Path) -> list[Phase]:
    phases = []
    with control_plane(workdir) as (nats, etcd):

        async def run(layout: str, graph: ServedGraph, run: int) -> None:
            # CPU milliseconds per request: each process's own CPU time over the phase, over the requests
            # completed, hardly moves when other work shares the machine (requests/s does).
            pids = {**graph.service_pids(), **({"nats-server": [nats.pid]} if nats.pid else {})}

            def cpu() -> dict[str, float]:
                return {service: sum(cpu_seconds(p) for p in ps) for service, ps in pids.items()}

            if run == 1:  # a warm-up: caches, lazy imports
                await run_load(dataclasses.replace(LOAD, url=graph.base_url, concurrency=16, requests=200))
            for concurrency in args.concurrency:
                load = dataclasses.replace(LOAD, url=graph.base_url, concurrency=concurrency, seed=100 + run)
                before = cpu()
                summary, _ = await run_load(dataclasses.replace(load, requests=args.requests or load.requests))
                after = cpu()
                cpu_ms = {s: (after[s] - before[s]) * 1000.0 / max(summary.completed, 1) for s in pids}
                path = sum(cpu_ms.get(service, 0.0) for service in PATH_SERVICES)
                phases.append(Phase((layout, str(concurrency)), summary, {**cpu_ms, "path": path}))
                log.info("%s, concurrency %d, run %d: %s", layout, concurrency, run, phases[-1].extra)

        await measure_layouts(LAYOUTS, workdir, (nats, etcd), args.runs, run, side_by_side=True)
    return phases


def render(phases: list[Phase], args: argparse.Namespace) -> list[str]:
    figures, rows = median_rows(phases), []
    for (layout, concurrency), m in sorted(figures.items(), key=lambda row: int(row[0][1])):
        rps, path = f"{m['request_throughput']:.0f}", f"{m['path']:.2f}"
        if concurrency == "16":  # the targets are the at 16 in flight
            rps += f" (target >= {TARGET_RPS:g}: {met(m['request_throughput'] >= TARGET_RPS)})"
            path += f" {met(m['path'] <= TARGET_CPU_MS)}"
        routers = "none" if layout == "router-in-frontend" else f"{m.get('Router', 0.0):.2f}"
        cpu = [f"{m.get(s, 0.0):.2f}" for s in ("Frontend", "Processor", "VllmWorker", "nats-server")]
        rows.append([layout, concurrency, rps, cpu[0], routers, cpu[1], path, cpu[2], cpu[3]])
    headings = (
        "layout | concurrency | requests/s | Frontend | Router processes | Processor (idle)"
        f" | path total (target <= {TARGET_CPU_MS:g} at 16) | mocker workers | nats-server"
    )
    lines = [
        f"{WORKERS} mocker workers (speedup-ratio {SPEEDUP:g}), chat requests of {LOAD.prompt_tokens} words, "
        f"{LOAD.max_tokens}-token streams, the Processor pipeline in the Frontend (the default). Two layouts of the "
        "routing: `router-in-frontend` (`embed-router: true`: the Frontend is the router replica, no Router "
        "process) and `router-processes` (the config's 2 Router replicas, called over NATS). "
        "CPU milliseconds per request by process:",
        "",
        *table(headings, rows),
        "",
        f"Failed requests: {sum(p.summary.failed for p in phases)}.",
        "",
    ]
    for (layout, concurrency), embedded in figures.items():  # the two layouts side by side
        if layout == "router-in-frontend" and (processes := figures.get(("router-processes", concurrency))):
            lines.append(
                f"- At concurrency {concurrency}, routing in the Frontend instead of in Router processes: "
                f"{embedded['request_throughput'] / processes['request_throughput']:.2f}x the requests/s, "
                f"path CPU per request {processes['path'] / embedded['path']:.2f}x lower."
            )
    return lines


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64], help="requests in flight")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main("bench.request_path", argv, "## Request path (mockers at infinite speed)", measure, render, options)


if __name__ == "__main__":
    sys.exit(main())
