"""supervisord's restarts, with a backoff: the event listener each supervisord config runs.

supervisord restarts a program that exits after `startsecs` at once, every time: a worker
whose engine dies of CUDA OOM while loading reloads its model in a tight loop, for ever.
It has no setting for a delay there, so the programs it writes (app/launch/supervisord.py)
have `autorestart=false` and this listener starts them again, each time a little later:

- a program that exits by itself (EXITED) is started again after FIRST_DELAY_S, doubled
  for each exit in a row, up to MAX_DELAY_S: a crash loop costs one start a minute, and a
  program whose cause went away is back within a minute;
- a run that lasted the crash-loop window (TANDEM_CRASH_LOOP_WINDOW_S) was not part of a
  loop: the next exit starts from FIRST_DELAY_S again;
- from the second exit in a row, `RUN_DIR/crash-loop/PROGRAM` says so until the program
  has run for the window (entrypoints/healthcheck.sh reads it);
- a program that goes FATAL (it failed `startretries` starts within `startsecs`) is never
  started again by supervisord: with `--stop-on-fatal` (`tandem serve`) its name goes to
  `RUN_DIR/fatal` and supervisord shuts down, so that `tandem serve` exits non-zero naming
  it (app/sdk/supervisor.py) and the layer above restarts the whole serve;
- so does, with `--stop-on-fatal`, a program whose exits in a row reach
  TANDEM_CRASH_LOOP_EXITS: supervisord never calls FATAL a program that dies after
  `startsecs` (a worker that loads its model for minutes, then dies of CUDA OOM), and
  without this `tandem serve` would restart it for ever, the layer above never told.
  Without `--stop-on-fatal` (the container's supervisord, which has no layer above but
  the healthcheck) it is started again, as before, and its mark stays.

Why a listener rather than a wrapper that sleeps before it execs the program: the listener
sees every way a program ends (SIGKILL by the OOM killer too), a program waiting for its
restart is EXITED in `supervisorctl status` rather than a RUNNING sleep, and the programs'
PIDs stay supervisord's children (the graph watch and the parent-death signal rely on it).
If the listener itself dies, supervisord starts it again and it picks up what is EXITED.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import xmlrpc.client
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from supervisor import childutils

from app import env

log = logging.getLogger("tandem-restarts")

NAME = "tandem-restarts"
EVENTS = ("PROCESS_STATE_RUNNING", "PROCESS_STATE_EXITED", "PROCESS_STATE_FATAL")
FIRST_DELAY_S = 1.0
MAX_DELAY_S = 60.0
# Where the listener leaves its marks, inside the supervisord's run folder.
CRASH_LOOP_DIR = "crash-loop"
FATAL_FILE = "fatal"


class Backoff:
    """How long to wait before starting each program again (no clock or I/O of its own)."""

    def __init__(self, stable_s: float, first_s: float = FIRST_DELAY_S, max_s: float = MAX_DELAY_S) -> None:
        self._first_s, self._max_s, self._stable_s = first_s, max_s, stable_s
        self._exits_in_a_row: dict[str, int] = {}

    def exited(self, program: str, lasted_s: float) -> tuple[float, int]:
        """(the delay before its next start, its exits in a row) once a run of `lasted_s` ended."""
        in_a_row = 1 if lasted_s >= self._stable_s else self._exits_in_a_row.get(program, 0) + 1
        self._exits_in_a_row[program] = in_a_row
        return min(self._first_s * 2 ** (in_a_row - 1), self._max_s), in_a_row

    def stable(self, program: str) -> None:
        """Its run has lasted `stable_s`: the loop, if any, is over."""
        self._exits_in_a_row.pop(program, None)


class _Supervisord:
    """The few calls of supervisord's XML-RPC interface the listener makes. A new proxy for
    each: calls come from timer threads too, and a proxy is not thread-safe."""

    @staticmethod
    def _proxy() -> Any:
        return childutils.getRPCInterface(os.environ).supervisor

    def process_info(self, program: str) -> dict[str, Any]:
        return cast(dict[str, Any], self._proxy().getProcessInfo(program))

    def all_process_info(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._proxy().getAllProcessInfo())

    def start(self, program: str) -> None:
        self._proxy().startProcess(program, False)

    def shutdown(self) -> None:
        self._proxy().shutdown()


def write_mark(run_dir: Path, program_name: str, text: str) -> None:
    """What entrypoints/healthcheck.sh says while `program_name` of the supervisord whose run
    folder is `run_dir` is not healthy, until the listener sees it stay up for the window."""
    mark = run_dir / CRASH_LOOP_DIR / program_name
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_text(text.rstrip("\n") + "\n")


def read_fatal(run_dir: Path) -> dict[str, str]:
    """The programs that went FATAL under a `--stop-on-fatal` listener, each with why."""
    try:
        text = (run_dir / FATAL_FILE).read_text()
    except FileNotFoundError:
        return {}
    fatal: dict[str, str] = {}
    for line in text.splitlines():
        name, _, why = line.partition("\t")
        if name:
            fatal.setdefault(name, why)
    return fatal


class Listener:
    """Reacts to supervisord's events; supervisord's own times (getProcessInfo) say how long
    a run lasted, since its events can reach the listener a second late."""

    def __init__(
        self, programs: Sequence[str], run_dir: Path, stop_on_fatal: bool, loop_exits: int, loop_window_s: float
    ) -> None:
        self._programs = set(programs)
        self._run_dir = run_dir
        self._stop_on_fatal = stop_on_fatal
        self._loop_exits = loop_exits
        self._loop_window_s = loop_window_s
        self._backoff = Backoff(loop_window_s)
        self._supervisord = _Supervisord()
        self._lock = threading.Lock()

    def resume(self) -> None:
        """After a start (its first, or after the listener died): what exited while nobody
        was listening starts again, and what runs is watched for the crash-loop window."""
        try:
            infos = self._supervisord.all_process_info()
        except (OSError, xmlrpc.client.Error) as exc:
            log.error("cannot read supervisord's programs (%s); restarts from the next event on", exc)
            return
        for info in infos:
            program = f"{info['group']}:{info['name']}"
            if program in self._programs and info["statename"] in ("RUNNING", "EXITED"):
                self.handle(
                    f"PROCESS_STATE_{info['statename']}", f"groupname:{info['group']} processname:{info['name']}"
                )

    def handle(self, event: str, payload: str) -> None:
        fields = childutils.get_headers(payload)
        program = f"{fields['groupname']}:{fields['processname']}"
        if event == "PROCESS_STATE_FATAL":
            self._fatal(program, "each of its starts ended within startsecs")
        elif program not in self._programs:
            return
        elif event == "PROCESS_STATE_RUNNING":
            info = self._supervisord.process_info(program)
            stable_at = info["start"] + self._loop_window_s
            self._later(max(0.0, stable_at - info["now"]), self._check_stable, program, info["pid"])
        elif event == "PROCESS_STATE_EXITED":
            self._on_exited(program)

    def _check_stable(self, program: str, pid: int) -> None:
        try:
            info = self._supervisord.process_info(program)
        except (OSError, xmlrpc.client.Error):  # supervisord going away
            return
        if info["statename"] == "RUNNING" and info["pid"] == pid:
            with self._lock:
                self._backoff.stable(program)
            self._crash_loop_file(program).unlink(missing_ok=True)

    def _on_exited(self, program: str) -> None:
        info = self._supervisord.process_info(program)
        lasted_s = max(0, info["stop"] - info["start"])
        with self._lock:
            delay, in_a_row = self._backoff.exited(program, lasted_s)
        name = info["name"]
        in_a_row_said = f"{in_a_row} exits in a row, each within {self._loop_window_s:g} s of its start"
        if in_a_row >= self._loop_exits and self._stop_on_fatal:
            log.warning("%s ended by itself after %d s (%s)", name, lasted_s, in_a_row_said)
            self._fatal(program, in_a_row_said)
            return
        log.warning(
            "%s ended by itself after %d s (%s); starting it again in %.0f s",
            name,
            lasted_s,
            in_a_row_said if in_a_row > 1 else "its first",
            delay,
        )
        if in_a_row >= self._loop_exits:
            log.error("%s is in a crash loop (%s); the healthcheck fails until a run lasts", name, in_a_row_said)
        if in_a_row >= 2:
            write_mark(
                self._run_dir,
                name,
                f"{name} is restarting in a loop: {in_a_row} exits in a row, the last after {lasted_s} s",
            )
        self._later(delay, self._start, program)

    def _start(self, program: str) -> None:
        try:
            self._supervisord.start(program)
        except xmlrpc.client.Fault as exc:
            # Shutting down, or started meanwhile by an operator: nothing to do.
            log.info("%s not started again: %s", program, exc.faultString)
        except OSError as exc:  # supervisord gone: so is the program
            log.info("%s not started again: %s", program, exc)

    def _fatal(self, program: str, why: str) -> None:
        """`program` will not run again (supervisord gave up on it, or its exits in a row
        reached the bound): with --stop-on-fatal, neither does anything else."""
        name = program.partition(":")[2]
        if not self._stop_on_fatal:
            log.error("%s is FATAL (%s); supervisord will not start it again", name, why)
            return
        log.error("%s is FATAL (%s); stopping every program so that tandem serve exits", name, why)
        write_mark(self._run_dir, name, f"{name} went FATAL: {why}")
        with (self._run_dir / FATAL_FILE).open("a") as out:
            out.write(f"{name}\t{why}\n")
        try:
            self._supervisord.shutdown()
        except xmlrpc.client.Fault as exc:  # a second FATAL while it shuts down
            log.info("supervisord not shut down again: %s", exc.faultString)

    def _crash_loop_file(self, program: str) -> Path:
        return self._run_dir / CRASH_LOOP_DIR / program.partition(":")[2]

    @staticmethod
    def _later(delay_s: float, call: Callable[..., None], *args: object) -> None:
        timer = threading.Timer(delay_s, call, args)
        timer.daemon = True
        timer.start()


def command(programs: Sequence[str], run_dir: Path, stop_on_fatal: bool) -> list[str]:
    """The listener's command line; `programs` as `group:name`. The crash-loop bounds are
    read now, from the environment of whoever writes the config, and stay in it to be read."""
    return [
        sys.executable,
        "-m",
        __name__,
        "--loop-exits",
        str(env.TANDEM_CRASH_LOOP_EXITS.get()),
        "--loop-window-s",
        f"{env.TANDEM_CRASH_LOOP_WINDOW_S.get():g}",
        "--run-dir",
        str(run_dir),
        *(["--stop-on-fatal"] if stop_on_fatal else []),
        *programs,
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}", description=__doc__)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--stop-on-fatal", action="store_true")
    parser.add_argument("--loop-exits", type=int, default=env.TANDEM_CRASH_LOOP_EXITS.default)
    parser.add_argument("--loop-window-s", type=float, default=env.TANDEM_CRASH_LOOP_WINDOW_S.default)
    parser.add_argument("programs", nargs="*", metavar="GROUP:NAME", help="the programs to start again")
    args = parser.parse_args(argv)
    # stdout is the event protocol; log lines go to stderr (supervisord's stdout).
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    listener = Listener(args.programs, args.run_dir, args.stop_on_fatal, args.loop_exits, args.loop_window_s)
    listener.resume()
    while True:
        childutils.listener.ready(sys.stdout)
        line = sys.stdin.readline()
        if not line:  # supervisord has gone (by SIGKILL too): nothing left to restart
            return 0
        headers = childutils.get_headers(line)
        payload = sys.stdin.read(int(headers["len"]))
        try:
            listener.handle(headers["eventname"], payload)
        except (OSError, xmlrpc.client.Error):  # supervisord busy or going: the next event tells
            log.exception("%s not handled", headers["eventname"])
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
