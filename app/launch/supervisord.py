"""supervisord's configuration: one writer for `tandem serve` and the container entrypoint."""

from __future__ import annotations

import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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


def config_text(programs: Sequence[Program], run_dir: Path, directory: Path, comments: Sequence[str] = ()) -> str:
    """The whole config: supervisord in the foreground, its socket and PID file in `run_dir`,
    each program started in `directory` with its output on supervisord's stdout."""
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
            # startsecs=0: a one-shot that finishes within a second did not fail to start.
            *(["autorestart=false", "startsecs=0"] if program.one_shot else ["autorestart=true", "startsecs=1"]),
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
