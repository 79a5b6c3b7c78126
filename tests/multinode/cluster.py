"""The seed's three-node deployment ("Single node sized models", steps 1 to 6) on a `Fabric`.

Each node runs the commands docs/multinode-quickstart.md gives an operator, in its own
network namespace (and, for `tandem serve`, its own PID/IPC namespace and /dev/shm):

- node 1: `tandem infra up` (NATS + etcd bound to and advertising the node's address,
  taken from TANDEM_ADVERTISE_HOST), then `tandem serve graphs.agg_router:Frontend -f CONFIG`;
- nodes 2, 3: `NATS_SERVER=... ETCD_ENDPOINTS=... tandem serve
  components.prefill_worker:PrefillWorker -f CONFIG`.

Node 1 gets its own address through TANDEM_ADVERTISE_HOST (`tandem infra up` binds it);
nodes 2 and 3 get exactly the guide's two exports and nothing else: what they advertise
(instance records, NIXL side channel) must be found from the route to NATS.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from app.runtime import Runtime
from app.runtime.discovery import InstanceRecord
from app.settings import RuntimeSettings
from tests.netns import Fabric, Node, NodeProcess

log = logging.getLogger(__name__)

TANDEM = str(Path(sys.executable).with_name("tandem"))
REPO = Path(__file__).resolve().parents[2]
FRONTEND_PORT = 8000  # the config's; every node has its own port space

# What the test's own shell may hold that must not leak into a "host" of the fleet: each
# node is configured only by what the seed exports.
_HOST_ONLY = ("NATS_SERVER", "ETCD_", "TANDEM_", "VLLM_NIXL_", "VLLM_HOST_IP", "UCX_")


def node_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_HOST_ONLY)}
    return {**env, **extra}


class SeedCluster:
    """Head node `fabric.nodes[0]` and prefill nodes `fabric.nodes[1:]`."""

    def __init__(self, fabric: Fabric, config: Path, overrides: Sequence[str], workdir: Path) -> None:
        self.head, *self.prefill_nodes = fabric.nodes
        self.host_ip = fabric.host_ip  # where the test itself reaches the nodes from
        self.config = config
        self.overrides = list(overrides)
        self.workdir = workdir
        self.state_dir = workdir / "head-state"
        self.urls: dict[str, str] = {}
        self.logs: dict[str, Path] = {}
        self._serving: list[tuple[Node, NodeProcess]] = []
        self._infra_started = False

    @property
    def settings(self) -> RuntimeSettings:
        """How the test (on the host, through the bridge) reaches the fleet's NATS and etcd."""
        return RuntimeSettings(nats_server=self.urls["NATS_SERVER"], etcd_endpoints=self.urls["ETCD_ENDPOINTS"])

    @property
    def base_url(self) -> str:
        return f"http://{self.head.ip}:{FRONTEND_PORT}"

    # --- step 1: NATS and etcd on the head node --------------------------------------

    def infra_up(self) -> None:
        """`tandem infra up` on node 1; its printed URLs are what the other nodes export.

        Not in a private PID namespace: the servers detach from the command, and outlive
        it until `infra_down`, as on a real head node.
        """
        self._infra_started = True  # even if `up` fails half-way, `down` stops what it started
        result = self.head.run([TANDEM, "infra", "up"], env=self._head_infra_env(), timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        self.urls = dict(line.split("=", 1) for line in result.stdout.split())

    def infra_down(self) -> None:
        result = self.head.run([TANDEM, "infra", "down"], env=self._head_infra_env(), timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr

    def _head_infra_env(self) -> dict[str, str]:
        return node_env(TANDEM_ADVERTISE_HOST=self.head.ip, TANDEM_STATE_DIR=str(self.state_dir))

    # --- steps 4 to 6: `tandem serve` on each node -------------------------------------

    def serve(self, node: Node, address: str) -> NodeProcess:
        log_path = self.workdir / f"{node.name}.log"
        self.logs[node.name] = log_path
        env = node_env(NATS_SERVER=self.urls["NATS_SERVER"], ETCD_ENDPOINTS=self.urls["ETCD_ENDPOINTS"])
        with open(log_path, "ab") as output:
            process = node.popen(
                [TANDEM, "serve", address, "-f", str(self.config), *self.overrides],
                env=env, cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self._serving.append((node, process))
        return process

    async def start(self, timeout: float = 420.0) -> None:
        """Node 1 first (the others need its NATS and etcd), then the prefill nodes together."""
        began = time.monotonic()
        self.infra_up()
        self.serve(self.head, "graphs.agg_router:Frontend")
        await self.wait_serving("VllmWorker", "generate", self.head, timeout)
        await self.wait_http(f"{self.base_url}/health", timeout)
        log.info("node 1 serving after %.0f s", time.monotonic() - began)
        for node in self.prefill_nodes:
            self.serve(node, "components.prefill_worker:PrefillWorker")
        await asyncio.gather(*(self.wait_serving("PrefillWorker", "status", n, timeout) for n in self.prefill_nodes))
        log.info("prefill nodes serving after %.0f s", time.monotonic() - began)

    def stop(self) -> None:
        """Every node's `tandem serve` at once (each drains its own), then node 1's NATS and etcd."""
        with ThreadPoolExecutor(max(1, len(self._serving))) as pool:
            list(pool.map(lambda serving: serving[1].stop(timeout=90), self._serving))
        self._serving.clear()
        if self._infra_started:
            self.infra_down()

    # --- waiting, with the logs of whatever died ----------------------------------------

    async def wait_serving(self, service: str, endpoint: str, node: Node, timeout: float) -> None:
        """Until an instance of `service` records `node`'s address in etcd (its engine is up by then)."""
        deadline = time.monotonic() + timeout

        def on_node(items: dict[str, InstanceRecord]) -> bool:
            return any(record.host == node.ip for record in items.values())

        async with await Runtime.connect(self.settings) as runtime:
            watch = await runtime.discovery.watch_instances(service, endpoint)
            try:
                while True:
                    self.assert_running()
                    try:
                        await watch.wait_until(on_node, 2.0)
                        return
                    except TimeoutError:
                        if time.monotonic() > deadline:
                            raise AssertionError(
                                f"no {service} on {node.name} ({node.ip}) after {timeout}s\n{self.log_tails()}"
                            ) from None
            finally:
                await watch.close()

    async def wait_http(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.assert_running()
            try:
                with await asyncio.to_thread(urllib.request.urlopen, url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            await asyncio.sleep(0.5)
        raise AssertionError(f"{url} not healthy after {timeout}s\n{self.log_tails()}")

    def assert_running(self) -> None:
        for node, process in self._serving:
            assert process.poll() is None, f"tandem serve on {node.name} exited\n{self.log_tails()}"

    def log_tails(self, lines: int = 40) -> str:
        tails = []
        for name, path in self.logs.items():
            tail = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            tails.append(f"--- {name} ({path})\n{tail}")
        return "\n".join(tails)
