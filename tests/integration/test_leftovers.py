"""No engine outlives its worker (app.launch.leftovers), on real processes and /dev/shm.

A "worker" here is a Python process that starts the guard, then an "engine" child that
holds /dev/shm segments (one open, as vLLM's message queues; one only mapped, as the CPU
build's all-reduce) and has a child of its own, as vLLM's engine core has its workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from app.launch import leftovers

REPO = Path(__file__).resolve().parents[2]
GONE_WITHIN_S = 5.0

ENGINE = """
import mmap, os, subprocess, sys, time
from multiprocessing import shared_memory
queue = shared_memory.SharedMemory(name=sys.argv[1], create=True, size=1 << 20)
fd = os.open("/dev/shm/" + sys.argv[2], os.O_CREAT | os.O_RDWR, 0o600)
os.ftruncate(fd, 1 << 20)
mapped = mmap.mmap(fd, 1 << 20)
os.close(fd)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("ready", flush=True)
time.sleep(600)
"""

WORKER = """
import subprocess, sys, time
from pathlib import Path
from app.launch.leftovers import guard_descendants
guard = guard_descendants(Path(sys.argv[1]))
engine = subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[3], sys.argv[4]], stdout=subprocess.PIPE)
engine.stdout.readline()
print(guard.pid, engine.pid, flush=True)
time.sleep(600)
"""


@dataclass
class Worker:
    proc: subprocess.Popen[str]
    guard: psutil.Process
    engine: psutil.Process
    segments: list[Path]

    @property
    def engine_tree(self) -> list[psutil.Process]:
        return [self.engine, *self.engine.children(recursive=True)]


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "engines" / "ns.VllmWorker.0@127.0.0.1.json"


@pytest.fixture
def start_worker(record: Path) -> Iterator[object]:
    started: list[psutil.Process] = []
    segments: list[Path] = []

    def start() -> Worker:
        names = [f"psm_tandem_test_{uuid.uuid4().hex[:8]}", f"tandem_test_mapped_{uuid.uuid4().hex[:8]}"]
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(record), ENGINE, *names],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        guard_pid, engine_pid = map(int, proc.stdout.readline().split())
        worker = Worker(
            proc, psutil.Process(guard_pid), psutil.Process(engine_pid), [Path("/dev/shm", n) for n in names]
        )
        started.extend([psutil.Process(proc.pid), worker.guard, *worker.engine_tree])
        segments.extend(worker.segments)
        _wait_until_recorded(record, worker)
        return worker

    yield start
    for process in started:
        if process.is_running():
            process.kill()
    for segment in segments:
        segment.unlink(missing_ok=True)


def _wait_until_recorded(record: Path, worker: Worker) -> None:
    """The guard notes the worker's tree once a second: wait until it has seen all of it."""
    wanted = {str(p.pid) for p in worker.engine_tree}
    deadline = time.monotonic() + 20
    while True:
        try:
            noted = json.loads(record.read_text())
        except (OSError, ValueError):
            noted = {"processes": {}, "shm": []}
        if wanted <= noted["processes"].keys() and {str(s) for s in worker.segments} <= set(noted["shm"]):
            return
        assert time.monotonic() < deadline, f"the guard never noted {wanted} and {worker.segments}: {noted}"
        time.sleep(0.1)


def test_a_sigkilled_workers_engine_tree_and_its_segments_are_gone_within_seconds(start_worker, record: Path) -> None:
    worker = start_worker()
    tree = worker.engine_tree
    assert len(tree) >= 2 and all(s.exists() for s in worker.segments)  # (and a resource tracker)

    worker.proc.kill()
    worker.proc.wait()
    _, left = psutil.wait_procs(tree, GONE_WITHIN_S)
    assert left == []
    worker.guard.wait(GONE_WITHIN_S)
    assert [s for s in worker.segments if s.exists()] == []
    assert not record.exists()


def test_a_segment_a_process_outside_the_tree_holds_keeps_its_name(start_worker) -> None:
    worker = start_worker()
    queue, _ = worker.segments
    with queue.open("rb"):  # this test process now holds the engine's queue too
        worker.proc.kill()
        worker.proc.wait()
        worker.guard.wait(GONE_WITHIN_S)
        assert queue.exists()


def test_a_worker_ends_what_a_predecessor_whose_guard_died_too_left(start_worker, record: Path) -> None:
    first = start_worker()
    orphans = first.engine_tree
    first.guard.kill()
    while first.guard.status() != psutil.STATUS_ZOMBIE:  # its parent, the worker, never reaps it
        time.sleep(0.05)
    first.proc.kill()
    first.proc.wait()
    time.sleep(1)
    assert all(p.is_running() for p in orphans) and record.exists()

    second = start_worker()  # the same service replica, restarted: the same record
    assert [p for p in orphans if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    assert [s for s in first.segments if s.exists()] == []
    assert second.engine.is_running() and all(s.exists() for s in second.segments)


def test_a_record_that_cannot_be_written_where_asked_goes_to_the_temporary_directory(tmp_path: Path) -> None:
    """A container's working directory is read-only for its user: the worker must still
    start (and its guard still find a predecessor's leftovers) rather than crash-loop."""
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    record = blocked / "engines" / f"ns.VllmWorker.0@{uuid.uuid4().hex[:8]}.json"
    written = leftovers._writable(record)
    assert written is not None and written.name == record.name
    assert written.parent == Path(tempfile.gettempdir()) / f"tandem-engines-{os.getuid()}"
