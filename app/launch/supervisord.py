"""supervisord's configuration: one writer for `tandem serve` and the container entrypoint."""

from __future__ import annotations

import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from app.launch import restart_backoff

# After its last program has stopped, a supervisord still needs a moment to exit.
SUPERVISORD_EXIT_S = 10


@dataclass(frozen=True)
class Program:
    name: str
    command: Sequence[str]
    stop_wait_s: int
    environment: Mapping[str, str] = field(default_factory=dict)
    # Lower starts first and stops last; None: supervisord's default.
    priority: int | None = None
    # True where every process of the program must get SIGTERM (a server and its children,
    # a vLLM engine and its subprocesses). A nested supervisord (`tandem serve`) must get
    # it alone, so that it stops its own programs in order.
    stop_as_group: bool = True
    # Programs of one group start and stop together: a service's replicas.
    group: str | None = None
    # A step that runs once and exits 0 (EXITED, never restarted), such as turning etcd's
    # auth on after etcd started; the health check looks for what it leaves behind instead.
    one_shot: bool = False


def nested_stop_wait_s(programs: int, stop_wait_s: int) -> int:
    """How long to wait for a supervisord of `programs` programs to stop: it stops them one
    after another, each within `stop_wait_s`."""
    return programs * stop_wait_s + SUPERVISORD_EXIT_S


def _quote(value: str) -> str:
    # supervisord expands %(name)s in `command` and `environment`: a literal % is doubled.
    return value.replace("%", "%%")


def _environment(values: Mapping[str, str]) -> str:
    return ",".join(f'{name}="{_quote(value)}"' for name, value in values.items())


def config_text(
    programs: Sequence[Program],
    run_dir: Path,
    directory: Path,
    comments: Sequence[str] = (),
    stop_on_fatal: bool = False,
) -> str:
    """The whole config: supervisord in the foreground, its socket and PID file in `run_dir`,
    each program started in `directory` with its output on supervisord's stdout, and
    started again after a backoff when it exits (app/launch/restart_backoff.py).
    `stop_on_fatal`: a program that goes FATAL shuts supervisord down (`tandem serve`)."""
    lines = [
        *(f"; {comment}" for comment in comments),
        "[supervisord]",
        "nodaemon=true",
        # In the foreground supervisord logs to stdout by itself; no second copy in a file.
        "logfile=/dev/null",
        "logfile_maxbytes=0",
        f"pidfile={run_dir / 'supervisord.pid'}",
        f"childlogdir={run_dir}",
        "",
        "[unix_http_server]",
        f"file={run_dir / 'supervisor.sock'}",
        "chmod=0700",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{run_dir / 'supervisor.sock'}",
    ]
    groups: dict[str, list[str]] = {}
    for program in programs:
        if program.group is not None:
            groups.setdefault(program.group, []).append(program.name)
        lines += [
            "",
            f"[program:{program.name}]",
            f"command={_quote(shlex.join(program.command))}",
            f"directory={directory}",
        ]
        if program.priority is not None:
            lines.append(f"priority={program.priority}")
        if program.environment:
            lines.append(f"environment={_environment(program.environment)}")
        stop_as_group = "true" if program.stop_as_group else "false"
        lines += [
            "autostart=true",
            # Never supervisord's immediate restart: the restart listener's, after a backoff.
            "autorestart=false",
            # startsecs=0: a one-shot that finishes within a second did not fail to start
            # (and the mark by which entrypoints/healthcheck.sh knows a one-shot).
            "startsecs=0" if program.one_shot else "startsecs=1",
            "stopsignal=TERM",
            f"stopwaitsecs={program.stop_wait_s}",
            f"stopasgroup={stop_as_group}",
            # Whatever still runs when the wait is over dies with its group.
            "killasgroup=true",
            "stdout_logfile=/dev/stdout",
            "stdout_logfile_maxbytes=0",
            "redirect_stderr=true",
        ]
    for group, names in groups.items():
        lines += ["", f"[group:{group}]", f"programs={','.join(names)}"]
    restarted = [f"{p.group or p.name}:{p.name}" for p in programs if not p.one_shot]
    if restarted:
        lines += [
            "",
            f"[eventlistener:{restart_backoff.NAME}]",
            f"command={_quote(shlex.join(restart_backoff.command(restarted, run_dir, stop_on_fatal)))}",
            f"directory={directory}",
            f"events={','.join(restart_backoff.EVENTS)}",
            # Starts first and stops last: no exit goes unseen.
            "priority=1",
            "autostart=true",
            "autorestart=true",
            # Events wait here while the listener starts (or starts again).
            "buffer_size=1000",
            # Its stdout is the event protocol, kept nowhere; its log lines are on stderr.
            "stdout_logfile=NONE",
            "stderr_logfile=/dev/stdout",
            "stderr_logfile_maxbytes=0",
        ]
    return "\n".join(lines) + "\n"


def supervisord_binary() -> str:
    """supervisord beside this Python (the venv's), else on PATH."""
    beside_python = Path(sys.executable).parent / "supervisord"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("supervisord")
    if found is None:
        raise FileNotFoundError("supervisord not found beside the Python interpreter nor on PATH")
    return found
