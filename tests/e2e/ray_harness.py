"""Ray nodes for tests: `tandem ray head|worker`, as an operator runs them, stopped by PID.

On one host (loopback) every node needs ports of its own for what Ray otherwise binds at
fixed defaults, and a temp dir of its own (a short one: Ray's unix sockets live there).
Nothing here calls `ray stop`: it kills every Ray process of the machine by name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.engines.vllm_ray import RayDevices
from app.launch.ports import free_port
from bench.harness.launch import stop_process_tree

TANDEM = str(Path(sys.executable).with_name("tandem"))

# Every Ray node and vLLM rank on loopback: node addresses, and Gloo's interface (it
# otherwise binds the address the host name resolves to).
LOOPBACK_IP = "127.0.0.1"
LOOPBACK_ENV = {"VLLM_HOST_IP": LOOPBACK_IP, "GLOO_SOCKET_IFNAME": "lo", "RAY_USAGE_STATS_ENABLED": "0"}
# Small and few: the machine is shared. The object store only carries vLLM's control
# messages here; one CPU for Ray's own task workers (vLLM's actors ask for none).
SMALL_NODE_ARGS = ["--num-cpus=1", "--object-store-memory=100000000"]
# Ray refuses --include-dashboard on worker nodes.
HEAD_ONLY_ARGS = ["--include-dashboard=false"]


def short_temp_dir(prefix: str) -> str:
    # Ray's socket paths must stay under the 107-byte unix socket limit.
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def loopback_port_args() -> list[str]:
    """Ports Ray would otherwise take at fixed defaults (two nodes on one host would clash)."""
    names = (
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
    )
    return [f"--{name}={free_port()}" for name in names]


class LoopbackRayNode:
    """`tandem ray head` or `tandem ray worker` on this host, on loopback."""

    def __init__(self, role: str, workdir: Path, head_address: str | None = None) -> None:
        self.role = role
        self.temp_dir = short_temp_dir(f"t{role[0]}")
        self.log_path = workdir / f"ray-{role}-{os.getpid()}-{time.monotonic_ns()}.log"
        self.gcs_port = free_port() if role == "head" else None
        self.address = f"{LOOPBACK_IP}:{self.gcs_port}" if role == "head" else head_address
        where = ["--port", str(self.gcs_port)] if role == "head" else ["--address", str(head_address)]
        extra = [*SMALL_NODE_ARGS, f"--temp-dir={self.temp_dir}", *loopback_port_args()]
        if role == "head":
            extra += [*HEAD_ONLY_ARGS, f"--ray-client-server-port={free_port()}"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [TANDEM, "ray", role, *where, "--node-ip-address", LOOPBACK_IP, "--", *extra],
                env={**os.environ, **LOOPBACK_ENV},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        stop_process_tree(self.process, timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


_WAIT_PROBE = """
import logging, sys
from app.engines.vllm_ray import RayClusterTimeoutError, RayDevices, wait_for_ray_devices
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
address, resource, count, timeout, interval = sys.argv[1:]
try:
    wait_for_ray_devices(RayDevices(resource, int(count)), address, float(timeout), float(interval))
except RayClusterTimeoutError as exc:
    print(f"RayClusterTimeoutError: {exc}", file=sys.stderr)
    sys.exit(3)
"""


def wait_in_process(
    address: str, need: RayDevices, timeout: float, log_interval: float = 30.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The product's wait for devices, in a process of its own as in a worker.

    A process of its own, as in a worker: Ray keeps one connection per process.
    """
    return subprocess.run(
        [sys.executable, "-c", _WAIT_PROBE, address, need.resource, str(need.count), str(timeout), str(log_interval)],
        env={**os.environ, **LOOPBACK_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout + 120,
    )


def wait_for_cluster(address: str, need: RayDevices, timeout: float = 120.0) -> None:
    """Until the cluster at `address` answers and offers `need`."""
    result = wait_in_process(address, need, timeout)
    assert result.returncode == 0, result.stderr[-3000:]
