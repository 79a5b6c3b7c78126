"""No engine outlives its worker: a guard process that ends a dead worker's descendants.

A vLLM engine runs in processes of its own (the engine core, its executor's workers) that
vLLM starts as the worker's children. When the worker dies by a signal it cannot handle
(SIGKILL, the OOM killer), nothing stops them: they keep the device memory, a core, and the
/dev/shm segments of their message queues (~250 MB each), while supervisord starts a new
worker and a new engine beside them.

`guard_descendants(record)` starts, from the worker, a small guard process in a session of
its own (a signal to the worker's process group does not reach it). The guard notes the
worker's descendants and the /dev/shm files they hold, once a second, in `record` (a JSON
file); when the worker exits by any means, the guard SIGKILLs what is left of them, removes
those files, and exits. A clean stop leaves nothing for it to do.

If the guard itself is gone too (both killed, a node's OOM), the record stays: the next
worker with the same record (the same service replica, restarted by supervisord) ends the
processes it names before it starts its own engine. Processes are named by PID and start
time, so a PID the kernel has given to someone else since is never touched.

Standard library only, like the rest of `app.launch`: the guard imports nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

SCAN_INTERVAL_S = 1.0
# After SIGKILL a process is gone once its parent (init, for an orphan) has reaped it.
KILL_WAIT_S = 5.0
SHM = "/dev/shm/"

# pid -> its start time (clock ticks since boot, /proc/PID/stat's 22nd field)
Processes = dict[int, int]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses.
    return raw[raw.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def parent_pid(pid: int) -> int | None:
    """The process's parent in this PID namespace; None if it is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def _pids() -> list[int]:
    """Every process of this PID namespace, as /proc lists them now."""
    return [int(entry.name) for entry in os.scandir("/proc") if entry.name.isdigit()]


def descendants(root: int, exclude: int | None = None) -> Processes:
    """Every live process below `root` (not `root` itself), from one pass over /proc."""
    children: dict[int, list[int]] = {}
    started: Processes = {}
    for pid in _pids():
        fields = _stat_fields(pid)
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(pid)
        started[pid] = int(fields[19])
    found: Processes = {}
    pending = list(children.get(root, ()))
    while pending:
        pid = pending.pop()
        if pid == exclude or pid in found:
            continue
        found[pid] = started[pid]
        pending += children.get(pid, ())
    return found


def shm_files(pids: Iterable[int]) -> set[str]:
    """The /dev/shm files these processes have open or mapped (vLLM's `psm_*` message
    queues stay open; the CPU build's all-reduce segments may only be mapped)."""
    files: set[str] = set()
    for pid in pids:
        try:
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(fd.path)
                    if target.startswith(SHM):
                        files.add(target)
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    at = line.find(SHM)
                    if at >= 0:
                        files.add(line[at:].rstrip("\n").removesuffix(" (deleted)"))
        except OSError:
            continue  # gone meanwhile
    return files


def end_processes(processes: Mapping[int, int], wait_s: float = KILL_WAIT_S) -> list[int]:
    """SIGKILL those of `processes` still running with their recorded start time; wait until
    they are gone. The PIDs that were killed."""
    killed = []
    for pid, started in processes.items():
        if start_time(pid) != started:
            continue  # gone, or the PID is someone else's now
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except (ProcessLookupError, PermissionError):
            continue
    deadline = time.monotonic() + wait_s
    # A SIGKILLed process leaves /proc once reaped; a zombie's stat still reads "Z".
    while any(_running(pid, processes[pid]) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


def _running(pid: int, started: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and int(fields[19]) == started and fields[0] != "Z"


def remove_unused_files(paths: Iterable[str]) -> None:
    """Remove those of `paths` (under /dev/shm) that no live process holds: a segment the
    dead engine shared with a process outside its tree keeps its name."""
    in_use = shm_files(_pids())
    for path in set(paths) - in_use:
        if path.startswith(SHM):
            with contextlib.suppress(OSError):
                os.unlink(path)


def _write_record(record: Path, processes: Processes, files: set[str]) -> None:
    partial = record.with_suffix(".tmp")
    partial.write_text(json.dumps({"processes": {str(pid): t for pid, t in processes.items()}, "shm": sorted(files)}))
    partial.replace(record)


def read_record(record: Path) -> tuple[Processes, set[str]]:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}, set()
    return {int(pid): int(t) for pid, t in data.get("processes", {}).items()}, set(data.get("shm", ()))


def end_predecessor(record: Path) -> None:
    """End what a predecessor's record names (its guard died with it), then forget it."""
    processes, files = read_record(record)
    if not processes and not files:
        return
    killed = end_processes(processes)
    if killed:
        log.warning("ended %d process(es) a dead predecessor left running: %s", len(killed), killed)
    remove_unused_files(files)
    record.unlink(missing_ok=True)


def guard_descendants(record: Path) -> subprocess.Popen[bytes]:
    """Start the guard for this process (see the module's doc), first ending what a
    predecessor with the same record left. Call before starting the engine."""
    writable = _writable(record)
    command = [sys.executable, "-m", __name__, "--pid", str(os.getpid())]
    if writable is None:
        log.warning("no folder for %s can be written: a dead predecessor's engine cannot be found", record.name)
    else:
        end_predecessor(writable)
        command += ["--record", str(writable)]
    return subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL)


def _writable(record: Path) -> Path | None:
    """`record`, or the same name in a folder of the temporary directory where its own
    folder cannot be made (a container's read-only working directory); None if neither."""
    for folder in (record.parent, Path(tempfile.gettempdir()) / f"tandem-engines-{os.getuid()}"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder / record.name
    return None


def watch(pid: int, record: Path | None) -> None:
    """The guard's loop: note `pid`'s descendants until it exits, then end them."""
    try:
        exited = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # gone before we started: its record (if any) serves its successor
    poller = select.poll()
    poller.register(exited, select.POLLIN)
    processes: Processes = {}
    files: set[str] = set()
    while not poller.poll(SCAN_INTERVAL_S * 1000):
        # Keep what was seen before: an engine that died on its own stays harmless (its
        # start time no longer matches), and a segment it left is still its worker's.
        now = descendants(pid, exclude=os.getpid())
        now_files = shm_files(now)
        if now.keys() - processes.keys() or now_files - files:
            processes.update(now)
            files |= now_files
            if record is not None:
                _write_record(record, processes, files)
    killed = end_processes(processes)
    if killed:
        log.warning("worker %d exited with %d descendant(s) running: killed %s", pid, len(killed), killed)
    remove_unused_files(files)
    if record is not None:
        record.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}", description=__doc__)
    parser.add_argument("--pid", type=int, required=True, help="the worker to guard")
    parser.add_argument("--record", type=Path, help="where to note its descendants (default: nowhere)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s leftovers: %(message)s")
    watch(args.pid, args.record)


if __name__ == "__main__":
    main()
