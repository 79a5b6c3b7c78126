"""Embedded NATS (with JetStream) and etcd servers: start, health-check, stop.

Used two ways: the `tandem infra up|down|status` command (servers detached from the CLI,
their state under `.state/`) and the test fixtures (servers owned by the pytest process);
their command lines are app.launch.servers', which the container entrypoint uses too.
Every server is stopped by the PID recorded when it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app import env
from app.launch.processes import STOP_TIMEOUT_S, pid_alive, stop_pid
from app.launch.servers import (
    dial_address,
    etcd_command,
    etcd_tls_flags,
    find_binary,
    nats_command,
    nats_secure_config,
)
from app.node import configured_node_address
from app.protocol.names import ETCD_ROOT
from app.runtime.etcd_auth import enable_etcd_auth

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 15.0


def default_host() -> str:
    """Where `tandem infra up` binds by default: this node's configured address, else loopback.

    A head node that exports TANDEM_ADVERTISE_HOST or VLLM_HOST_IP (as every node of a fleet
    does, for its instance records and NIXL side channel) thereby serves NATS and etcd to the others.
    """
    return configured_node_address() or "127.0.0.1"


def _http_ok(url: str, expect: str | None = None, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0, context=context) as resp:
            body = resp.read().decode(errors="replace")
            return resp.status == 200 and (expect is None or expect in body)
    except (urllib.error.URLError, OSError, ValueError):
        return False


# The user every Tandem process of a fleet connects as, to NATS and to etcd.
FLEET_USER = "tandem"


@dataclass(frozen=True)
class SecureFiles:
    """What `infra up --secure` keeps in one owner-only folder: a CA, the servers'
    certificates, the passwords (each in a file of its own, to be mounted as a secret) and
    etcd's token-signing key. Made once; server certificates are issued at every start."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca-key.pem"

    @property
    def nats_password_file(self) -> Path:
        return self.folder / "nats-password"

    @property
    def etcd_password_file(self) -> Path:
        return self.folder / "etcd-password"

    @property
    def etcd_root_password_file(self) -> Path:
        return self.folder / "etcd-root-password"

    def cert(self, server: str) -> tuple[Path, Path]:
        """The certificate and key files of `server` ("nats", "etcd")."""
        return self.folder / f"{server}.pem", self.folder / f"{server}-key.pem"

    def token_keys(self) -> tuple[Path, Path]:
        """etcd's JWT signing key pair (private, public)."""
        return self.folder / "etcd-token-key.pem", self.folder / "etcd-token-key.pub.pem"

    @classmethod
    def ensure(cls, folder: Path) -> SecureFiles:
        from app.launch import pki  # here: only --secure needs `cryptography`

        files = cls(Path(folder).resolve())
        pki.ensure_ca(files.ca_cert, files.ca_key)
        for password in (files.nats_password_file, files.etcd_password_file, files.etcd_root_password_file):
            pki.ensure_password(password)
        pki.ensure_signing_key(*files.token_keys())
        return files

    def issue(self, server: str, host: str) -> tuple[Path, Path]:
        """A fresh certificate of `server` for the address clients dial (`host`'s) and loopback."""
        from app.launch import pki

        cert, key = self.cert(server)
        pki.issue_server_cert(self.ca_cert, self.ca_key, cert, key, [dial_address(host), "127.0.0.1", "localhost"])
        return cert, key

    def head_files(self) -> list[Path]:
        """What a node that runs NATS and etcd reads (`entrypoints/render.py`): everything but
        the CA's key, which signs any certificate the fleet trusts and stays where it was made."""
        return [
            self.ca_cert,
            *self.cert("nats"),
            *self.cert("etcd"),
            *self.token_keys(),
            self.nats_password_file,
            self.etcd_password_file,
            self.etcd_root_password_file,
        ]

    def node_files(self) -> list[Path]:
        """What every other node reads: the CA and the fleet user's two passwords."""
        return [self.ca_cert, self.nats_password_file, self.etcd_password_file]

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_cert))

    @staticmethod
    def password(path: Path) -> str:
        return path.read_text().strip()


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

    def prepare(self) -> None:
        """Write what the command line names (config, certificates) before each start."""

    def start(self, timeout: float = HEALTH_TIMEOUT_S) -> None:
        """Start detached (own session, so a terminal's Ctrl-C does not reach it) and wait for health."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.prepare()
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
    """nats-server with JetStream on, file store in the data dir, HTTP monitor for health.

    With `secure`: TLS required and the fleet user's password (a config file, see
    `nats_secure_config`), the monitor on loopback only.
    """

    name = "nats"

    def __init__(
        self, host: str, port: int, monitor_port: int, state_dir: Path, secure: SecureFiles | None = None
    ) -> None:
        super().__init__(host, port, state_dir)
        self.monitor_port = monitor_port
        self.secure = secure
        self.config_path = self.state_dir / "nats.conf"

    @property
    def url(self) -> str:
        if self.secure is not None:
            return f"tls://{FLEET_USER}@{dial_address(self.host)}:{self.port}"
        return f"nats://{dial_address(self.host)}:{self.port}"

    def prepare(self) -> None:
        if self.secure is None:
            return
        from app.launch import pki

        cert, key = self.secure.issue(self.name, self.host)
        password = self.secure.password(self.secure.nats_password_file)
        config = nats_secure_config(
            self.data_dir, self.host, self.port, self.monitor_port, cert, key, FLEET_USER, password
        )
        pki.write_private(self.config_path, config.encode())

    def command(self) -> list[str]:
        if self.secure is not None:
            return [find_binary("nats-server"), "-c", str(self.config_path)]
        return nats_command(find_binary("nats-server"), self.data_dir, self.port, self.monitor_port, self.host)

    def healthy(self) -> bool:
        monitor_host = "127.0.0.1" if self.secure is not None else dial_address(self.host)
        return _http_ok(f"http://{monitor_host}:{self.monitor_port}/healthz?js-enabled-only=true")


class EtcdServer(ServerProcess):
    """A single-member etcd cluster.

    With `secure`: https client URLs and authentication on, a root user and the fleet user,
    whose role may read and write Tandem's keys (ETCD_ROOT) and nothing else.
    """

    name = "etcd"

    def __init__(
        self, host: str, port: int, peer_port: int, state_dir: Path, secure: SecureFiles | None = None
    ) -> None:
        super().__init__(host, port, state_dir)
        self.peer_port = peer_port
        self.secure = secure

    @property
    def url(self) -> str:
        scheme = "https" if self.secure is not None else "http"
        return f"{scheme}://{dial_address(self.host)}:{self.port}"

    def prepare(self) -> None:
        if self.secure is not None:
            self.secure.issue(self.name, self.host)

    def command(self) -> list[str]:
        tls_flags = None
        if self.secure is not None:
            tls_flags = etcd_tls_flags(*self.secure.cert(self.name), *self.secure.token_keys())
        return etcd_command(
            find_binary("etcd"), self.data_dir, self.host, self.port, self.peer_port, tls_flags=tls_flags
        )

    def healthy(self) -> bool:
        context = self.secure.ssl_context() if self.secure is not None else None
        return _http_ok(f"{self.url}/health", expect='"health":"true"', context=context)

    def start(self, timeout: float = HEALTH_TIMEOUT_S) -> None:
        """Start, wait for health and, with `secure`, turn auth on where it is not yet (an
        event loop of its own: from async code, call it in a thread, like every blocking start)."""
        super().start(timeout)
        if self.secure is not None:
            secure_etcd(f"{dial_address(self.host)}:{self.port}", self.secure)


def secure_etcd(endpoint: str, secure: SecureFiles) -> None:
    """Turn auth on, where it is not yet, at the etcd at `endpoint` (host:port, one of its
    certificate's names): root and the fleet user, with the passwords of `secure`'s files."""
    asyncio.run(
        enable_etcd_auth(
            endpoint,
            secure.ca_cert.read_bytes(),
            root_password=secure.password(secure.etcd_root_password_file),
            user=FLEET_USER,
            password=secure.password(secure.etcd_password_file),
            prefix=ETCD_ROOT,
        )
    )


def secure_exports(nats_url: str, etcd_url: str, secure: SecureFiles) -> dict[str, str]:
    """What every node exports to join a secure fleet: the URLs, the CA, the password files.

    The password files must reach each node (a mounted secret); their paths here are this
    node's.
    """
    return {
        env.NATS_SERVER.name: nats_url,
        env.NATS_PASSWORD_FILE.name: str(secure.nats_password_file),
        env.NATS_TLS_CA.name: str(secure.ca_cert),
        env.ETCD_ENDPOINTS.name: etcd_url,
        env.ETCD_USER.name: FLEET_USER,
        env.ETCD_PASSWORD_FILE.name: str(secure.etcd_password_file),
        env.ETCD_TLS_CA.name: str(secure.ca_cert),
    }


# --- the appliance's secrets (`tandem infra secrets`, docs/security.md) ---------------------
# The folders `write_appliance_secrets` makes: the authority stays on the host that made it,
# `head` is mounted read-only into the head's container, `node` into every other node's.
AUTHORITY, HEAD_BUNDLE, NODE_BUNDLE = "authority", "head", "node"


def _copy_private(files: list[Path], folder: Path, owner: tuple[int, int] | None) -> None:
    from app.launch import pki

    for source in files:
        pki.write_private(folder / source.name, source.read_bytes())
    if owner is not None:
        for path in (folder, *(folder / source.name for source in files)):
            os.chown(path, *owner)


def write_appliance_secrets(folder: Path, host: str, owner: tuple[int, int] | None = None) -> SecureFiles:
    """A fleet's CA, certificates and passwords for containers, without starting a server.

    Made in `folder`/authority (kept: a second run reuses the CA and the passwords and
    issues fresh server certificates for `host`, the head's address), then copied owner-only
    into `folder`/head and `folder`/node, owned by `owner` (uid, gid: the image's user, who
    reads them through a read-only mount). Returns the authority's files.
    """
    authority = SecureFiles.ensure(Path(folder) / AUTHORITY)
    for server in ("nats", "etcd"):
        authority.issue(server, host)
    _copy_private(authority.head_files(), authority.folder.parent / HEAD_BUNDLE, owner)
    _copy_private(authority.node_files(), authority.folder.parent / NODE_BUNDLE, owner)
    return authority


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
    secure: bool = False,
) -> dict[str, str]:
    """Start NATS and etcd detached unless they already run; return what every node exports.

    `host` (default: `default_host()`) is the address both bind and advertise; a wildcard
    binds everywhere and advertises this node's address (app.node). Returns
    `{"NATS_SERVER": ..., "ETCD_ENDPOINTS": ...}`; with `secure`, both servers require TLS
    and the fleet user's password (`SecureFiles` under `root`/secure), and the exports
    name the CA and the password files too (`secure_exports`).
    """
    host = host or default_host()
    root = root or state_dir()
    state = _load_state(root)
    running = [name for name in ("nats", "etcd") if _running(state.get(name))]
    if any(state[name].get("secure", False) != secure for name in running):
        raise RuntimeError(
            f"{', '.join(running)} already run{'s' if len(running) == 1 else ''} "
            f"{'with' if not secure else 'without'} --secure: `tandem infra down` first"
        )
    files = SecureFiles.ensure(root / "secure") if secure else None
    if "nats" not in running:
        nats = NatsServer(host, nats_port, nats_monitor_port, root / "nats", secure=files)
        nats.start()
        state["nats"] = {
            "pid": nats.pid,
            "url": nats.url,
            "monitor_port": nats_monitor_port,
            "log": str(nats.log_path),
            "secure": secure,
        }
        _save_state(root, state)
    if "etcd" not in running:
        etcd = EtcdServer(host, etcd_port, etcd_peer_port, root / "etcd", secure=files)
        try:
            etcd.start()
        except BaseException:
            etcd.stop()  # started but never made secure: not left running
            raise
        state["etcd"] = {
            "pid": etcd.pid,
            "url": etcd.url,
            "peer_port": etcd_peer_port,
            "log": str(etcd.log_path),
            "secure": secure,
        }
        _save_state(root, state)
    if files is not None:
        return secure_exports(state["nats"]["url"], state["etcd"]["url"], files)
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
        secure=args.secure,
    )
    prefix = "export " if args.export else ""
    for key, value in urls.items():
        sys.stdout.write(f"{prefix}{key}={value}\n")
    if args.secure:
        files = sorted(
            {urls[env.NATS_TLS_CA.name], urls[env.NATS_PASSWORD_FILE.name], urls[env.ETCD_PASSWORD_FILE.name]}
        )
        sys.stderr.write(
            f"other nodes: copy {', '.join(files)} there (a read-only secret), and export the same "
            "with their paths there (docs/security.md)\n"
        )
    return 0


def _owner(raw: str | None) -> tuple[int, int] | None:
    if raw is None:
        return None
    uid, _, gid = raw.partition(":")
    if not uid.isdigit() or not (gid or uid).isdigit():
        raise SystemExit(f"tandem infra secrets: --owner {raw!r} is not UID or UID:GID (numbers)")
    return int(uid), int(gid or uid)


def _cmd_secrets(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    try:
        write_appliance_secrets(folder, args.host, _owner(args.owner))
    except PermissionError as exc:
        sys.stderr.write(f"tandem infra secrets: {exc}: --owner needs root (sudo), or chown the folders yourself\n")
        return 1
    mounted = SecureFiles(Path(args.mount))
    nats_url = f"tls://{FLEET_USER}@{dial_address(args.host)}:{args.nats_port}"
    etcd_url = f"https://{dial_address(args.host)}:{args.etcd_port}"
    for key, value in secure_exports(nats_url, etcd_url, mounted).items():
        sys.stdout.write(f"{key}={value}\n")
    sys.stderr.write(
        f"mount {folder / HEAD_BUNDLE} read-only at {args.mount} on the head, a copy of {folder / NODE_BUNDLE} "
        f"on every other node; {folder / AUTHORITY} (the CA's key) stays here (docs/security.md)\n"
    )
    return 0


def _cmd_enable_auth(args: argparse.Namespace) -> int:
    secure = SecureFiles(Path(args.secrets))
    url = f"https://{args.endpoint}/health"
    deadline = time.monotonic() + args.timeout
    while not _http_ok(url, expect='"health":"true"', context=secure.ssl_context()):
        if time.monotonic() > deadline:
            sys.stderr.write(f"tandem infra enable-auth: etcd at {url} not healthy after {args.timeout:g} s\n")
            return 1
        time.sleep(0.2)
    secure_etcd(args.endpoint, secure)
    if args.done_file:
        Path(args.done_file).write_text("etcd auth on\n")
    log.info("etcd at %s: authentication on (user %s, prefix %s)", args.endpoint, FLEET_USER, ETCD_ROOT)
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
    up.add_argument(
        "--secure",
        action="store_true",
        help="TLS and a fleet password on both: writes a CA, certificates and passwords under the state "
        "dir's secure/ (0600) and prints the exports every node needs (docs/security.md)",
    )
    up.add_argument("--nats-port", type=int, default=env.NATS_PORT.default)
    up.add_argument("--nats-monitor-port", type=int, default=env.NATS_MONITOR_PORT.default)
    up.add_argument("--etcd-port", type=int, default=env.ETCD_PORT.default)
    up.add_argument("--etcd-peer-port", type=int, default=env.ETCD_PEER_PORT.default)
    up.set_defaults(func=_cmd_up)

    secrets = commands.add_parser(
        "secrets",
        help="write a fleet's CA, certificates and passwords for the appliance (no server started) "
        "and print the exports every node needs",
    )
    secrets.add_argument("folder", help="made owner-only: authority/ stays here, head/ and node/ are mounted")
    secrets.add_argument("--host", required=True, help="the head's address, as the other nodes dial it")
    secrets.add_argument(
        "--owner", default=None, help="UID[:GID] owning head/ and node/: the image's user (10001) reads them"
    )
    secrets.add_argument(
        "--mount",
        default=env.TANDEM_SECRETS_DIR.default,
        help="where the containers see the files: the paths the exports name",
    )
    secrets.add_argument("--nats-port", type=int, default=env.NATS_PORT.default)
    secrets.add_argument("--etcd-port", type=int, default=env.ETCD_PORT.default)
    secrets.set_defaults(func=_cmd_secrets)

    enable_auth = commands.add_parser(
        "enable-auth",
        help="once etcd answers over TLS, turn its auth on (root, and the fleet user confined to Tandem's "
        "prefix), passwords read from the secrets folder; the appliance head runs it after etcd starts",
    )
    enable_auth.add_argument("--secrets", required=True, help="the folder of ca.pem and the etcd passwords")
    enable_auth.add_argument("--endpoint", required=True, help="host:port of etcd, a name its certificate has")
    enable_auth.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for etcd's health")
    enable_auth.add_argument("--done-file", default=None, help="written once auth is on (the health check reads it)")
    enable_auth.set_defaults(func=_cmd_enable_auth)

    down = commands.add_parser("down", help="stop the servers `infra up` started")
    down.set_defaults(func=_cmd_down)

    status = commands.add_parser("status", help="show what runs where")
    status.set_defaults(func=_cmd_status)
