"""What every graph benchmark's command shares: the Benchmark record, the layouts it serves and the order it
measures them in, its options, the measurement on uvloop, the machine it ran on, and its report: markdown
tables, printed, and with --write-docs its own section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeVar

import msgspec
import psutil
import uvloop

from app.infra import EtcdServer, NatsServer
from bench.harness.load import LoadConfig, Phase
from testbed.graphs import ServedGraph, ServedProcess, control_plane

T = TypeVar("T")
Plane = tuple[NatsServer, EtcdServer]
# A benchmark's section of docs/benchmarks.md is its `## Title` line, the results it writes, this line,
# and the prose written by hand to read them: rewriting the section replaces the results, keeps the rest.
MEASURED_END = "<!-- end of measured results: the text below is kept when the benchmark rewrites them -->"


def table(headings: str, rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table's lines, under `headings` ("a | b | c"); an empty cell is `| |`."""
    columns = headings.split(" | ")
    return [
        "|" + "|".join(f" {cell} " if cell else " " for cell in row) + "|"
        for row in [columns, ["---"] * len(columns), *rows]
    ]


def write_section(path: Path, section: str) -> None:
    """Put `section` (markdown starting with its `## Title` line) in place of the results of the section
    with that title, or append it. Heading-like lines in code fences (a shell comment) do not end a section."""
    title = section.splitlines()[0].rstrip()
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == title), None)
    if start is None:  # a new section, after the others
        lines, start = [text.rstrip("\n") + "\n\n"], 1
    end, in_fence = len(lines), False
    for i in range(start + 1, len(lines)):
        if lines[i].lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and re.match(r"#{1,2} ", lines[i]):
            end = i
            break
    marker = next((i for i in range(start, end) if lines[i].rstrip() == MEASURED_END), None)
    prose = "".join(lines[marker:end]).rstrip("\n") + "\n" if marker is not None else MEASURED_END + "\n"
    rest = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + section.rstrip("\n") + "\n\n" + prose + ("\n" + rest if rest else ""))


def met(ok: bool) -> str:
    """A target's verdict in a table cell, a miss in bold."""
    return "yes" if ok else "**no**"


def cells(figures: Mapping[str, float], columns: Iterable[tuple[str, str]]) -> list[str]:
    """A row's cells: each (figure, format) column's figure formatted, a time in seconds (`..._s`) in ms."""
    return [fmt.format(figures[name] * (1000 if name.endswith("_s") else 1)) for name, fmt in columns]


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(measurement: Coroutine[Any, Any, T]) -> T:
    """Runs a measurement on uvloop (each CPU millisecond the client spends is one the servers do not
    get). A SIGTERM cancels it as Ctrl-C does, so that every server it started is stopped by its PID."""

    async def cancellable() -> T:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await measurement

    try:
        return uvloop.run(cancellable())
    except asyncio.CancelledError:
        raise SystemExit(128 + signal.SIGTERM) from None


def run_note(started: float, load_before: tuple[float, float, float]) -> str:
    """When and on what a run took place, and how busy the machine was: how far to trust the numbers."""
    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    load = [" ".join(f"{v:.2f}" for v in values) for values in (load_before, os.getloadavg())]
    return (
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, {(time.time() - started) / 60:.0f} min, "
        f"on {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), "
        f"{cpu.group(1).strip() if cpu else 'unknown CPU'}, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM; "
        f"load average {load[0]} before, {load[1]} after."
    )


class Servable(Protocol):
    """What a benchmark measures: a graph (Layout), or another server (the direct vLLM of bench/scenarios.py)."""

    def serve(self, name: str, workdir: Path, plane: Plane) -> contextlib.AbstractAsyncContextManager[ServedProcess]:
        """The server up and ready until the block ends."""


@dataclass(frozen=True)
class Layout:
    """A graph as a benchmark serves it, and the instances it must show before it is measured."""

    config: Path
    workers: int
    routers: int | None = None
    prefill_workers: int | None = None
    overrides: tuple[str, ...] = ()  # of `tandem serve`
    graph: str = "graphs.agg_router:Frontend"
    env: Mapping[str, str] | None = None  # of `tandem serve`; None: this process's

    @contextlib.asynccontextmanager
    async def serve(self, name: str, workdir: Path, plane: Plane) -> AsyncIterator[ServedGraph]:
        nats, etcd = plane
        graph = ServedGraph(
            self.graph, self.config, workdir, nats.url, etcd.url, overrides=self.overrides, name=name, env=self.env
        )
        async with graph:
            await graph.wait_ready(
                self.workers, routers=self.routers, processors=1, prefill_workers=self.prefill_workers
            )
            yield graph


# Each layout on a graph of its own, all runs of one before the next; all graphs up at once, their runs
# alternating (an idle graph costs next to nothing; docs/benchmarks.md, "Request path", says why); or
# each run of each layout on a fresh server, one at a time, in alternating order (A B, B A, ...).
Order = Literal["one after the other", "side by side", "alternating"]


@dataclass(frozen=True)
class Run:
    """One run of one layout, as a benchmark's `measure` gets it."""

    args: argparse.Namespace
    benchmark: Benchmark
    layout: str
    server: ServedProcess
    number: int  # 1 .. --runs
    nats: NatsServer
    etcd: EtcdServer

    @property
    def graph(self) -> ServedGraph:
        assert isinstance(self.server, ServedGraph)
        return self.server

    def load(self, base: LoadConfig | None = None, **changes: Any) -> LoadConfig:
        """The benchmark's load (or `base`) on this server, changed, with --requests where given."""
        return with_requests(base or self.benchmark.load, self.args, url=self.server.base_url, **changes)


def with_requests(load: LoadConfig, args: argparse.Namespace, **changes: Any) -> LoadConfig:
    return dataclasses.replace(load, requests=args.requests or load.requests, **changes)


class Benchmark:
    """A graph benchmark, one subclass each (bench/scenarios.py): its docs section, what it serves, its
    load, and how it measures a run and renders the table; docs/benchmarks.md says how to read it."""

    section: ClassVar[str]  # its `## Title`
    layouts: ClassVar[Mapping[str, Servable]]
    load: ClassVar[LoadConfig]
    order: ClassVar[Order] = "one after the other"
    runs: ClassVar[int] = 3  # --runs by default

    @staticmethod
    def add_options(parser: argparse.ArgumentParser) -> None:
        """Options of this benchmark alone, on the one command line (their help names the benchmark)."""

    async def measure(self, run: Run) -> list[Phase]:
        raise NotImplementedError

    def render(self, phases: list[Phase], args: argparse.Namespace) -> list[str]:
        raise NotImplementedError

    def schedule(self, runs: int) -> list[tuple[list[str], list[tuple[int, str]]]]:
        """The layouts served together, and the (run, layout) pairs measured while they are up, in turn."""
        names, numbers = list(self.layouts), range(1, runs + 1)
        if self.order == "side by side":
            return [(names, [(number, name) for number in numbers for name in names])]
        if self.order == "alternating":
            return [([n], [(number, n)]) for number in numbers for n in (names if number % 2 else names[::-1])]
        return [([name], [(number, name) for number in numbers]) for name in names]

    async def measure_all(self, args: argparse.Namespace, workdir: Path) -> list[Phase]:
        phases: list[Phase] = []
        with control_plane(workdir) as plane:
            for together, turns in self.schedule(args.runs):
                async with contextlib.AsyncExitStack() as stack:
                    servers = {}
                    for name in together:  # a log of its own for each start
                        log_name = re.sub(r"\W+", "-", name) + "-" + os.urandom(3).hex()
                        servers[name] = await stack.enter_async_context(
                            self.layouts[name].serve(log_name, workdir, plane)
                        )
                    for number, name in turns:
                        phases += await self.measure(Run(args, self, name, servers[name], number, *plane))
        return phases


def main(prog: str, benchmarks: Mapping[str, Benchmark], argv: Sequence[str] | None = None) -> int:
    """`python -m MODULE NAME`: measure (in a folder for the servers), then the report: "Command: ...",
    the run note, the benchmark's table, the failed requests."""
    parser = argparse.ArgumentParser(prog=prog, description="docs/benchmarks.md has what each measures.")
    sections = "; ".join(f"{name}: {b.section.removeprefix('## ')}" for name, b in benchmarks.items())
    parser.add_argument("benchmark", choices=benchmarks, help=sections)
    parser.add_argument("--runs", type=int, help="repetitions, the report gives medians (default: the benchmark's)")
    parser.add_argument("--requests", type=int, help="requests per run (default: the benchmark's)")
    parser.add_argument("--write-docs", type=Path, help="put the results in this markdown file's section")
    parser.add_argument("--json-out", type=Path, help="also write every run's results here (JSON)")
    for add_options in dict.fromkeys(b.add_options for b in benchmarks.values()):  # each once
        add_options(parser)
    args = parser.parse_args(argv)
    benchmark = benchmarks[args.benchmark]
    args.runs = args.runs or benchmark.runs
    if args.runs < 1 or (args.requests is not None and args.requests < 1):
        parser.error("--runs and --requests must be >= 1")
    setup_logging()
    started, load_before = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as folder:  # the servers' data and logs
        phases = run(benchmark.measure_all(args, Path(folder)))
    if args.json_out is not None:
        args.json_out.write_bytes(msgspec.json.format(msgspec.json.encode(phases)) + b"\n")
    command = " ".join([prog, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    lines = [f"Command: `{command}` (medians of {args.runs} run(s))", "", run_note(started, load_before), ""]
    lines += [*benchmark.render(phases, args), "", f"Failed requests: {sum(p.summary.failed for p in phases)}."]
    report = "\n".join(lines) + "\n"
    sys.stdout.write(report)
    if args.write_docs is not None:
        write_section(args.write_docs, f"{benchmark.section}\n\n{report}")
    return 0
