"""What every graph benchmark's command shares: its options, a folder for the servers, the measurement
on uvloop, the machine it ran on, and its report (printed, and with --write-docs its docs section)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import psutil
import uvloop

from bench.harness.report import write_section

T = TypeVar("T")


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


class RunNote:
    """When and on what a run took place, and how busy the machine was: how far to trust the numbers."""

    def __init__(self) -> None:
        self.started, self.load_before = time.time(), os.getloadavg()

    def __str__(self) -> str:
        cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        load = [" ".join(f"{v:.2f}" for v in values) for values in (self.load_before, os.getloadavg())]
        return (
            f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(self.started))}, "
            f"{(time.time() - self.started) / 60:.0f} min, on {os.cpu_count()} CPUs (nproc "
            f"{len(os.sched_getaffinity(0))}), {cpu.group(1).strip() if cpu else 'unknown CPU'}, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; load average {load[0]} before, {load[1]} after."
        )


def main(
    module: str,
    argv: Sequence[str] | None,
    section: str | Callable[[argparse.Namespace], str],  # the docs section's `## Title`, or of the options
    measure: Callable[[argparse.Namespace, Path], Coroutine[Any, Any, T]],
    render: Callable[[T, argparse.Namespace], list[str]],
    options: Callable[[argparse.ArgumentParser], object] = lambda _: None,
) -> int:
    """`python -m MODULE`: measure (in a folder for the servers), then the report: "Command: ...", the
    RunNote, `render`'s lines. `options` adds a benchmark's own options to the shared ones."""
    prog = f"python -m {module}"
    parser = argparse.ArgumentParser(prog=prog, description="docs/benchmarks.md has what it measures.")
    parser.add_argument("--runs", type=int, default=3, help="repetitions; the report gives medians")
    parser.add_argument("--requests", type=int, help="requests per run (default: the benchmark's)")
    parser.add_argument("--write-docs", type=Path, help="put the results in this markdown file's section")
    parser.add_argument("--json-out", type=Path, help="also write every run's results here (JSON)")
    options(parser)
    args = parser.parse_args(argv)
    if args.runs < 1 or (args.requests is not None and args.requests < 1):
        parser.error("--runs and --requests must be >= 1")
    setup_logging()
    note = RunNote()
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as folder:  # the servers' data and logs
        results = run(measure(args, Path(folder)))
    if args.json_out is not None:
        args.json_out.write_bytes(msgspec.json.format(msgspec.json.encode(results)) + b"\n")
    command = " ".join([prog, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    lines = [f"Command: `{command}` (medians of {args.runs} run(s))", "", str(note), "", *render(results, args)]
    report = "\n".join(lines).rstrip("\n") + "\n"
    sys.stdout.write(report)
    if args.write_docs is not None:
        title = section if isinstance(section, str) else section(args)
        write_section(args.write_docs, f"{title}\n\n{report}")
    return 0
