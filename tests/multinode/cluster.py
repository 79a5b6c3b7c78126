"""The seed's three-node deployment ("Single node sized models", steps 1 to 6) on a `Fabric`,
run from docs/multinode-quickstart.md's own blocks.

Each node runs its block as an operator types it (tests/docs/shell.py), in its own network
namespace, with `<node1-ip>` and `<this-node-ip>` replaced by the namespaces' addresses:

- node 1, `quickstart-node1`: exports its address, `tandem infra up` (NATS + etcd bound to
  and advertising it), exports the two URLs, makes the tiny model, and `tandem serve
  graphs.agg_router:Frontend -f configs/cpu-tiny-disagg.yaml`;
- nodes 2 and 3, `quickstart-prefill-node`: the two exports pointing at node 1, their own
  address, the tiny model, and `tandem serve components.prefill_worker:PrefillWorker`.

`tandem serve` also runs in a private PID/IPC namespace with its own /dev/shm, as on a
separate host. The nodes share this machine's filesystem: each gets a working directory
of its own, where `.venv` and `configs` link to the repository's and `models/` (what its
`tandem model make-tiny` writes) and `.state` (what its `tandem infra` records) are its
own, so that no node writes another's files, nor the repository's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from app.protocol import InstanceRecord
from app.runtime import Runtime
from app.settings import RuntimeSettings
from tests.docs.blocks import REPO, doc_blocks
from tests.docs.shell import DocShell
from tests.netns import Fabric, Node
from tests.waiting import wait_healthy

log = logging.getLogger(__name__)

NODE1_BLOCK, PREFILL_NODE_BLOCK, CLIENT_BLOCK = doc_blocks(
    "quickstart-node1", "quickstart-prefill-node", "quickstart-client"
)
CONFIG = REPO / "configs" / "cpu-tiny-disagg.yaml"  # the one the blocks serve
FRONTEND_PORT = 8000  # the config's; every node has its own port space
# What a node's working directory shares with the repository: the rest is the node's own.
SHARED_WITH_REPO = (".venv", "configs")


class SeedCluster:
    """Head node `fabric.nodes[0]` and prefill nodes `fabric.nodes[1:]`."""

    def __init__(self, fabric: Fabric, workdir: Path) -> None:
        self.fabric = fabric
        self.head, *self.prefill_nodes = fabric.nodes
        self.host_ip = fabric.host_ip  # where the test itself reaches the nodes from
        self.workdir = workdir
        self.shells = {node.name: self._shell(node) for node in fabric.nodes}
        self.urls: dict[str, str] = {}  # what `tandem infra up` printed on node 1
        self._infra_started = False

    def node_dir(self, node: Node) -> Path:
        return self.workdir / node.name

    def model_dir(self, node: Node) -> Path:
        """Where the node's own `tandem model make-tiny models/tiny-llama` wrote the model."""
        return self.node_dir(node) / "models" / "tiny-llama"

    def _shell(self, node: Node) -> DocShell:
        directory = self.node_dir(node)
        directory.mkdir(parents=True)
        for name in SHARED_WITH_REPO:
            (directory / name).symlink_to(REPO / name)
        placeholders = {"node1-ip": self.head.ip, "this-node-ip": node.ip}
        return DocShell(self.workdir / f"{node.name}-logs", cwd=directory, placeholders=placeholders, node=node)

    @property
    def settings(self) -> RuntimeSettings:
        """How the test (on the host, through the bridge) reaches the fleet's NATS and etcd."""
        return RuntimeSettings(nats_server=self.urls["NATS_SERVER"], etcd_endpoints=self.urls["ETCD_ENDPOINTS"])

    @property
    def base_url(self) -> str:
        return f"http://{self.head.ip}:{FRONTEND_PORT}"

    async def start(self, timeout: float = 420.0) -> None:
        """Node 1's block first (the others need its NATS and etcd), then the prefill nodes'."""
        began = time.monotonic()
        head = self.shells[self.head.name]
        export_address, infra_up, export_nats, export_etcd, make_model, serve = NODE1_BLOCK.expect(
            "export", "tandem infra up", "export", "export", "tandem model make-tiny", "tandem serve"
        )
        head.run(export_address)
        self._infra_started = True  # even if `up` fails half-way, `infra down` stops what it started
        # Not in a private PID namespace: the servers detach from the command and outlive it, as on a head node.
        self.urls = dict(line.split("=", 1) for line in head.run(infra_up, timeout=120).split())
        for command in (export_nats, export_etcd, make_model):
            head.run(command)
        head.start(serve)
        await self.wait_serving("VllmWorker", "generate", self.head, timeout)
        await wait_healthy(f"{self.base_url}/health", timeout, self.assert_running, self.log_tails)
        log.info("node 1 serving after %.0f s", time.monotonic() - began)

        PREFILL_NODE_BLOCK.expect("export", "export", "export", "tandem model make-tiny", "tandem serve")
        for node in self.prefill_nodes:
            for command in PREFILL_NODE_BLOCK.commands:
                self.shells[node.name].execute(command)
        await asyncio.gather(*(self.wait_serving("PrefillWorker", "status", n, timeout) for n in self.prefill_nodes))
        log.info("prefill nodes serving after %.0f s", time.monotonic() - began)

    def stop(self) -> None:
        """Every node's `tandem serve` at once (each drains its own), then node 1's NATS and etcd."""
        with ThreadPoolExecutor(len(self.shells)) as pool:
            list(pool.map(DocShell.stop_all, self.shells.values()))
        if self._infra_started:
            self.shells[self.head.name].check(".venv/bin/tandem infra down", timeout=120)

    @contextlib.contextmanager
    def cut_off(self, node: Node) -> Iterator[None]:
        """`node`'s cable unplugged at the switch: the bridge's end of its veth down, then up.

        Nothing on the node is told: its sockets stay open and its packets are dropped, as
        when a link fails between hosts (its own eth0 just loses carrier).
        """
        # tests/netns.py names the bridge's end of node i's veth `<tag>h<i>`.
        port = f"{self.fabric.tag}h{self.fabric.nodes.index(node) + 1}"
        subprocess.run(["ip", "link", "set", port, "down"], check=True)
        try:
            yield
        finally:
            subprocess.run(["ip", "link", "set", port, "up"], check=True)

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

    def assert_running(self) -> None:
        for name, shell in self.shells.items():
            for started in shell.background:
                assert started.poll() is None, f"{started.command} on {name} exited\n{self.log_tails()}"

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(shell.background_tails(lines) for shell in self.shells.values())
