"""Embedded NATS (with JetStream) and etcd servers: start, health-check, stop.

Used two ways: the `tandem infra up|down|status` command (servers detached from the CLI,
their state under `.state/`) and the test fixtures (servers owned by the pytest process);
their command lines are app.launch.servers', which the container entrypoint uses too.
Every server is stopped by the PID recorded when it started.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from app import env
from app.launch.processes import STOP_TIMEOUT_S, pid_alive, stop_pid
from app.launch.servers import dial_address, etcd_command, find_binary, nats_command
from app.node import configured_node_address

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 15.0


def default_host() -> str:
    """Where `tandem infra up` binds by default: this node's configured address, else loopback.

    A head node that exports TANDEM_ADVERTISE_HOST or VLLM_HOST_IP (as every node of a fleet
    does, for its instance records and NIXL side channel) thereby serves NATS and etcd to the others.
    """
    return configured_node_address() or "127.0.0.1"


def _http_ok(url: str, expect: str | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            body = resp.read().decode(errors="replace")
            return resp.status == 200 and (expect is None or expect in body)
    except (urllib.error.URLError, OSError, ValueError):
        return False


class ServerProcess:
    """One server process on a fixed port and data directory.

    `restart()` keeps both, so clients can reconnect to the same address and find
    their data (JetStream streams, etcd keys) again.
    """

    name = "server"

    def __init__(self, host: str, port: int, state_dir: Path) -> None:
        self.host = host
        self.port = port
        self.state_dir = Path(state_dir)
        self.data_dir = self.state_dir / "data"
        self.log_path = self.state_dir / f"{self.name}.log"
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def healthy(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = HEALTH_TIMEOUT_S) -> None:
        """Start detached (own session, so a terminal's Ctrl-C does not reach it) and wait for health."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self._proc.pid
        log.info("started %s pid=%d on %s", self.name, self.pid, self.url)
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = HEALTH_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self._proc.returncode} at start; see {self.log_path}"
                )
            if self.healthy():
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} on {self.url} not healthy after {timeout:.0f}s; see {self.log_path}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        if self.pid is None:
            return
        stop_pid(self.pid, timeout, self._proc)
        log.info("stopped %s pid=%d", self.name, self.pid)
        self.pid = None
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class NatsServer(ServerProcess):
    """nats-server with JetStream on, file store in the data dir, HTTP monitor for health."""

    name = "nats"

    def __init__(self, host: str, port: int, monitor_port: int, state_dir: Path) -> None:
        super().__init__(host, port, state_dir)
        self.monitor_port = monitor_port

    @property
    def url(self) -> str:
        return f"nats://{dial_address(self.host)}:{self.port}"

    def command(self) -> list[str]:
        return nats_command(find_binary("nats-server"), self.data_dir, self.port, self.monitor_port, self.host)

    def healthy(self) -> bool:
        return _http_ok(f"http://{dial_address(self.host)}:{self.monitor_port}/healthz?js-enabled-only=true")


class EtcdServer(ServerProcess):
    """A single-member etcd cluster."""

    name = "etcd"

    def __init__(self, host: str, port: int, peer_port: int, state_dir: Path) -> None:
        super().__init__(host, port, state_dir)
        self.peer_port = peer_port

    @property
    def url(self) -> str:
        return f"http://{dial_address(self.host)}:{self.port}"

    def command(self) -> list[str]:
        return etcd_command(find_binary("etcd"), self.data_dir, self.host, self.port, self.peer_port)

    def healthy(self) -> bool:
        return _http_ok(f"{self.url}/health", expect='"health":"true"')


# --- `tandem infra` ----------------------------------------------------------------------


def state_dir() -> Path:
    return Path(env.TANDEM_STATE_DIR.get()).resolve()


def _state_file(root: Path) -> Path:
    return root / "infra.json"


def _load_state(root: Path) -> dict[str, Any]:
    path = _state_file(root)
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def _save_state(root: Path, state: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    _state_file(root).write_text(json.dumps(state, indent=2) + "\n")


def _running(entry: dict[str, Any] | None) -> bool:
    return entry is not None and pid_alive(int(entry["pid"]))


def infra_up(
    host: str | None = None,
    nats_port: int = env.NATS_PORT.default,
    nats_monitor_port: int = env.NATS_MONITOR_PORT.default,
    etcd_port: int = env.ETCD_PORT.default,
    etcd_peer_port: int = env.ETCD_PEER_PORT.default,
    root: Path | None = None,
) -> dict[str, str]:
    """Start NATS and etcd detached unless they already run; return their client URLs.

    `host` (default: `default_host()`) is the address both bind and advertise; a wildcard
    binds everywhere and advertises this node's address (app.node). Returns
    `{"NATS_SERVER": ..., "ETCD_ENDPOINTS": ...}`, the values every node exports.
    """
    host = host or default_host()
    root = root or state_dir()
    state = _load_state(root)
    if not _running(state.get("nats")):
        nats = NatsServer(host, nats_port, nats_monitor_port, root / "nats")
        nats.start()
        state["nats"] = {"pid": nats.pid, "url": nats.url, "monitor_port": nats_monitor_port, "log": str(nats.log_path)}
        _save_state(root, state)
    if not _running(state.get("etcd")):
        etcd = EtcdServer(host, etcd_port, etcd_peer_port, root / "etcd")
        etcd.start()
        state["etcd"] = {"pid": etcd.pid, "url": etcd.url, "peer_port": etcd_peer_port, "log": str(etcd.log_path)}
        _save_state(root, state)
    return {"NATS_SERVER": state["nats"]["url"], "ETCD_ENDPOINTS": state["etcd"]["url"]}


def infra_down(root: Path | None = None) -> list[str]:
    """Stop the servers `infra_up` started; return the names of those that were running."""
    root = root or state_dir()
    state = _load_state(root)
    stopped = []
    for name in ("etcd", "nats"):
        entry = state.pop(name, None)
        if _running(entry):
            stop_pid(int(entry["pid"]))
            stopped.append(name)
    _save_state(root, state)
    return stopped


def infra_status(root: Path | None = None) -> dict[str, dict[str, Any]]:
    """What `infra_up` recorded, each entry with `running` set from its PID."""
    root = root or state_dir()
    state = _load_state(root)
    return {name: {**entry, "running": _running(entry)} for name, entry in state.items()}


def _cmd_up(args: argparse.Namespace) -> int:
    urls = infra_up(
        host=args.host,
        nats_port=args.nats_port,
        nats_monitor_port=args.nats_monitor_port,
        etcd_port=args.etcd_port,
        etcd_peer_port=args.etcd_peer_port,
    )
    prefix = "export " if args.export else ""
    for key, value in urls.items():
        sys.stdout.write(f"{prefix}{key}={value}\n")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    stopped = infra_down()
    sys.stdout.write(f"stopped: {', '.join(stopped) or 'nothing was running'}\n")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    status = infra_status()
    if not status:
        sys.stdout.write(f"no infra recorded in {state_dir()}\n")
        return 1
    all_running = True
    for name, entry in status.items():
        state = "running" if entry["running"] else "stopped"
        all_running &= entry["running"]
        sys.stdout.write(f"{name}: {state} pid={entry['pid']} url={entry['url']} log={entry['log']}\n")
    return 0 if all_running else 1


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register `infra up|down|status` on the `tandem` command."""
    infra = subparsers.add_parser("infra", help="embedded NATS + etcd for a single machine")
    commands = infra.add_subparsers(dest="infra_command", required=True)

    up = commands.add_parser("up", help="start NATS (JetStream) and etcd detached; idempotent")
    up.add_argument("--export", action="store_true", help="print `export VAR=...` lines for eval")
    up.add_argument(
        "--host",
        default=None,
        help="address to bind and advertise: this node's own address for a multi-node fleet "
        "(default: $TANDEM_ADVERTISE_HOST, else $VLLM_HOST_IP, else 127.0.0.1); 0.0.0.0 binds everywhere "
        "and advertises this node's address",
    )
    up.add_argument("--nats-port", type=int, default=env.NATS_PORT.default)
    up.add_argument("--nats-monitor-port", type=int, default=env.NATS_MONITOR_PORT.default)
    up.add_argument("--etcd-port", type=int, default=env.ETCD_PORT.default)
    up.add_argument("--etcd-peer-port", type=int, default=env.ETCD_PEER_PORT.default)
    up.set_defaults(func=_cmd_up)

    down = commands.add_parser("down", help="stop the servers `infra up` started")
    down.set_defaults(func=_cmd_down)

    status = commands.add_parser("status", help="show what runs where")
    status.set_defaults(func=_cmd_status)
