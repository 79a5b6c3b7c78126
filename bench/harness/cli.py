"""What every benchmark's command shares: common options, logging, running it, the machine it ran on."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil
import uvloop

T = TypeVar("T")


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A graph benchmark's parser, with the options they all take."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="repetitions; the report gives medians")
    parser.add_argument("--workdir", type=Path, help="keep servers' data and logs here (default: a temporary folder)")
    parser.add_argument("--write-docs", type=Path, help="put the results in this markdown file's section")
    return parser


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


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    """The command as given, for the report to say how to measure again."""
    return " ".join([prog, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


@contextlib.contextmanager
def workdir(path: Path | None) -> Iterator[Path]:
    """`path` (servers' data and logs are kept), or a temporary folder removed at the end."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as folder:
        yield Path(folder)


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
