"""`tandem serve`: one supervisord program per service of the graph, in the foreground."""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from app.sdk.config import GraphConfig
from app.sdk.runner import REPLICA_ENV
from app.sdk.service import ServiceSpec

# A worker given SIGTERM drains its in-flight requests before exiting; a vLLM engine
# shutting down takes seconds, so supervisord waits this long before SIGKILL.
STOP_WAIT_S = 60


@dataclass(frozen=True)
class Program:
    name: str
    processes: int
    command: list[str]


def programs(services: Sequence[ServiceSpec], config: GraphConfig, overrides: Sequence[str]) -> list[Program]:
    """What supervisord runs: each service in processes of its own (`app.sdk.process`)."""
    out = []
    for spec in services:
        command = [sys.executable, "-m", "app.sdk.process", spec.address]
        if config.path is not None:
            command += ["-f", config.path]
        command += list(overrides)
        out.append(Program(spec.name, config.service_args(spec.name).workers, command))
    return out


def _quote_for_supervisord(command: list[str]) -> str:
    # supervisord expands %(name)s in `command`, so a literal % must be doubled.
    return shlex.join(command).replace("%", "%%")


def supervisord_conf(progs: Sequence[Program], workdir: Path, cwd: Path) -> str:
    lines = [
        "[supervisord]",
        "nodaemon=true",
        # In the foreground supervisord logs to stdout by itself; no second copy in a file.
        "logfile=/dev/null",
        "logfile_maxbytes=0",
        f"pidfile={workdir / 'supervisord.pid'}",
        f"childlogdir={workdir}",
        "",
        "[unix_http_server]",
        f"file={workdir / 'supervisor.sock'}",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{workdir / 'supervisor.sock'}",
    ]
    for prog in progs:
        lines += [
            "",
            f"[program:{prog.name}]",
            f"command={_quote_for_supervisord(prog.command)}",
            "process_name=%(program_name)s_%(process_num)d",
            f"numprocs={prog.processes}",
            "numprocs_start=0",
            f"directory={cwd}",
            f'environment={REPLICA_ENV}="%(process_num)d"',
            "autostart=true",
            "autorestart=true",
            "startsecs=1",
            "stopsignal=TERM",
            f"stopwaitsecs={STOP_WAIT_S}",
            # vLLM starts engine subprocesses: stop and kill the whole group, never orphan them.
            "stopasgroup=true",
            "killasgroup=true",
            "stdout_logfile=/dev/stdout",
            "stdout_logfile_maxbytes=0",
            "redirect_stderr=true",
        ]
    return "\n".join(lines) + "\n"


def supervisord_binary() -> str:
    beside_python = Path(sys.executable).parent / "supervisord"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("supervisord")
    if found is None:
        raise FileNotFoundError("supervisord not found beside the Python interpreter nor on PATH")
    return found


def _append_to_regular_stdout() -> None:
    # Programs' output reaches stdout through supervisord's own O_APPEND open of /dev/stdout,
    # while its log lines go to fd 1. When fd 1 is a file opened without O_APPEND
    # (`tandem serve ... > serve.log`), the two file offsets overwrite each other's lines.
    if stat.S_ISREG(os.fstat(1).st_mode):
        fcntl.fcntl(1, fcntl.F_SETFL, fcntl.fcntl(1, fcntl.F_GETFL) | os.O_APPEND)


def run_supervisord(progs: Sequence[Program]) -> int:
    """Run supervisord in the foreground until it exits; its exit status.

    SIGTERM, SIGINT and SIGHUP sent to this process go on to supervisord, which stops every
    program. supervisord is a child rather than an exec so that its config folder (and
    control socket) is removed afterwards.
    """
    workdir = Path(tempfile.mkdtemp(prefix="tandem-serve-"))
    try:
        conf = workdir / "supervisord.conf"
        conf.write_text(supervisord_conf(progs, workdir, Path.cwd()))
        sys.stdout.flush()
        sys.stderr.flush()
        _append_to_regular_stdout()
        child = subprocess.Popen([supervisord_binary(), "-n", "-c", str(conf)])
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
        return child.wait()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
