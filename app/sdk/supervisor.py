"""`tandem serve`: the graph's services as supervisord programs, one per replica, in the foreground."""

from __future__ import annotations

import fcntl
import logging
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

from app import env
from app.launch import restart_backoff
from app.launch.devices import DeviceAssignment, DeviceRequest, NodeDevices, assign_devices
from app.launch.processes import with_parent_death_signal
from app.launch.supervisord import Program, config_text, supervisord_binary
from app.sdk.config import GraphConfig
from app.sdk.graph_watch import GraphWatch
from app.sdk.service import ServiceSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceProcesses:
    """A service's processes on this node: one command, one process per replica."""

    name: str
    command: list[str]
    # Per replica, the GPUs it gets (ServiceArgs.resources.gpu); empty where the service
    # asks for none: it sees the node's devices as its environment gives them.
    devices: list[tuple[str, ...]]

    @property
    def processes(self) -> int:
        return len(self.devices)


def plan(
    services: Sequence[ServiceSpec], config: GraphConfig, overrides: Sequence[str], node: NodeDevices, graph: str
) -> tuple[list[ServiceProcesses], DeviceAssignment]:
    """What supervisord runs: each service in processes of its own (`app.sdk.process`), and
    which of the node's devices each replica gets. `graph` is the address `tandem serve`
    was given: each process learns from it which services its graph has."""
    requests = []
    for spec in services:
        args = config.service_args(spec.name)
        requests.append(DeviceRequest(spec.name, args.workers, args.resources.gpu))
    assignment = assign_devices(requests, node)
    out = []
    for spec in services:
        command = [sys.executable, "-m", "app.sdk.process", spec.address, "--graph", graph]
        if config.path is not None:
            command += ["-f", config.path]
        command += list(overrides)
        out.append(ServiceProcesses(spec.name, command, assignment.replicas[spec.name]))
    return out, assignment


def process_name(service: str, replica: int) -> str:
    return f"{service}_{replica}"


def describe(services: Sequence[ServiceProcesses]) -> list[str]:
    """The plan as `--dry-run` prints it: a line per service, then each replica's devices."""
    lines = []
    for service in services:
        lines.append(f"{service.name}  x{service.processes}  {shlex.join(service.command)}")
        lines += [
            f"  {process_name(service.name, replica)}  {env.CUDA_VISIBLE_DEVICES.name}={','.join(devices)}"
            for replica, devices in enumerate(service.devices)
            if devices
        ]
    return lines


def supervisord_programs(services: Sequence[ServiceProcesses]) -> list[Program]:
    """One program per replica, each service's replicas a group (they start and stop together)."""
    stop_wait_s = env.TANDEM_STOP_WAIT_S.get()
    programs = []
    for service in services:
        for replica, devices in enumerate(service.devices):
            environment = {env.TANDEM_REPLICA.name: str(replica)}
            if devices:
                environment[env.CUDA_VISIBLE_DEVICES.name] = ",".join(devices)
            programs.append(
                Program(
                    process_name(service.name, replica), service.command, stop_wait_s, environment, group=service.name
                )
            )
    return programs


def _append_to_regular_stdout() -> None:
    # Programs' output reaches stdout through supervisord's own O_APPEND open of /dev/stdout,
    # while its log lines go to fd 1. When fd 1 is a file opened without O_APPEND
    # (`tandem serve ... > serve.log`), the two file offsets overwrite each other's lines.
    if stat.S_ISREG(os.fstat(1).st_mode):
        fcntl.fcntl(1, fcntl.F_SETFL, fcntl.fcntl(1, fcntl.F_GETFL) | os.O_APPEND)


def run_supervisord(services: Sequence[ServiceProcesses], watch: GraphWatch | None = None) -> int:
    """Run supervisord in the foreground until it exits; its exit status, or 1 where a
    program went FATAL.

    SIGTERM and SIGINT sent to this process go on to supervisord, which stops every
    program, each draining its requests. SIGHUP does not: supervisord would restart every
    program at once and drop their requests, and the config it would reread is written
    once, here (docs/operations.md, "Restarts, FATAL and signals"). supervisord runs in a
    process group of its own, outside the terminal's foreground group, so that a terminal's
    Ctrl-C or hangup reaches it only through here; it stays in this session, so what counts a
    session's processes (CPU per request in ../shared/peers/dynamo/sidebyside.sh, `ps -s`)
    sees the whole graph. A program that goes FATAL (it could not start, or it keeps dying:
    TANDEM_CRASH_LOOP_EXITS exits in a row) shuts supervisord down
    (app/launch/restart_backoff.py): the graph is not whole, and the layer above (an outer
    supervisord, Docker) starts it again. supervisord is a child rather than an exec so that
    its config folder (and control socket) is removed afterwards. `watch` reports the graph's
    start-up meanwhile, from a thread of its own: it has no say in how or when this ends.
    """
    workdir = Path(tempfile.mkdtemp(prefix="tandem-serve-"))
    try:
        conf = workdir / "supervisord.conf"
        conf.write_text(config_text(supervisord_programs(services), workdir, Path.cwd(), stop_on_fatal=True))
        sys.stdout.flush()
        sys.stderr.flush()
        _append_to_regular_stdout()
        # If this process dies by SIGKILL, supervisord gets the SIGTERM it would have
        # forwarded and stops every program; never a fleet of orphans.
        child = subprocess.Popen(
            with_parent_death_signal([supervisord_binary(), "-n", "-c", str(conf)]), process_group=0
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
        signal.signal(signal.SIGHUP, lambda _signum, _frame: log.warning(SIGHUP_IGNORED))
        # Only now, after supervisord is started: the watch's thread runs gRPC.
        if watch is not None:
            watch.start(child.pid)
        try:
            status = child.wait()
        finally:
            if watch is not None:
                watch.stop()
        fatal = restart_backoff.read_fatal(workdir)
        if fatal:
            said = ", ".join(f"{name} went FATAL ({why})" for name, why in fatal.items())
            log.error("tandem serve exits: %s; every other program was stopped", said)
            _tell_the_containers_healthcheck(f"tandem serve exited: {said}")
            return status or 1
        return status
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


SIGHUP_IGNORED = (
    "SIGHUP ignored: nothing is restarted; to apply a changed config, stop tandem serve (SIGTERM drains) "
    "and start it again (docs/operations.md)"
)


def _tell_the_containers_healthcheck(why: str) -> None:
    """Where this `tandem serve` is a program of the container's supervisord (entrypoints/),
    leave `why` where entrypoints/healthcheck.sh reads it, under the name that supervisord
    knows this process by: its programs are this serve's own, out of that healthcheck's
    sight. The container's restart listener removes the mark once a new serve has run for
    the crash-loop window."""
    name = env.SUPERVISOR_PROCESS_NAME.get()
    run_dir = Path(env.TANDEM_RUN_DIR.get())
    try:
        if name is None or f"[program:{name}]" not in (run_dir / "supervisord.conf").read_text():
            return  # not under the entrypoint's supervisord
        restart_backoff.write_mark(run_dir, name, f"{name}: {why}")
    except OSError as exc:
        log.warning("the container's healthcheck not told why tandem serve exits (%s)", exc)
