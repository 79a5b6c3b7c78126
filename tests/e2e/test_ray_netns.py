"""A model larger than a node across two "hosts": network namespaces on one bridge, each
node with its own PID and IPC namespace and its own /dev/shm (tests/netns.py).

Node 1 (the head) runs what docs/multinode.md gives an operator: `tandem infra up --host`
(NATS, etcd), `tandem ray head`, and `tandem serve graphs.agg_router:Frontend` with a
VllmWorker of tensor parallel 2 on vLLM's Ray executor; node 2 runs `tandem ray worker
--address HEAD:6379`, started only once the worker on node 1 says it waits for it. Each
Ray node offers one CPU worker, so the two ranks run one per node and all-reduce over the
veth (Gloo over TCP; vLLM's shared-memory all-reduce cannot reach across nodes). The
client is the official openai package on port 8000 of node 1; greedy output must equal
vLLM's own with tensor parallel 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
import yaml

from app.engines.vllm_cpu_ray import CPU_DEVICE_RESOURCE
from app.runtime import Runtime
from app.settings import RuntimeSettings
from tests.capabilities import require_fabric
from tests.e2e.graph_configs import agg_router_config, ray_tensor_parallel_2
from tests.e2e.ray_harness import (
    CHATS,
    HEAD_ONLY_ARGS,
    SMALL_NODE_ARGS,
    TANDEM,
    assert_chat_equals_reference,
    assert_completion_equals_reference,
    reference_texts_at_tensor_parallel_1,
    short_temp_dir,
)
from tests.netns import Fabric, Node, NodeProcess
from tests.waiting import wait_healthy

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True, scope="module")
def _network_namespaces() -> None:
    # Module-scoped and autouse: before the vLLM reference and the fabric.
    require_fabric()


REPO = Path(__file__).resolve().parents[2]
GCS_PORT = 6379  # each node has its own port space: the documented default
FRONTEND_PORT = 8000
# What the test's own shell may hold that must not leak into a "host": each node is
# configured by what docs/multinode.md exports and nothing else.
_HOST_ONLY = ("NATS_SERVER", "ETCD_", "TANDEM_", "VLLM_HOST_IP", "RAY_", "GLOO_", "VLLM_NIXL_")


def node_env(node: Node, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_HOST_ONLY)}
    return {
        **env,
        "VLLM_HOST_IP": node.ip,
        "GLOO_SOCKET_IFNAME": "eth0",
        "TANDEM_ADVERTISE_HOST": node.ip,
        "RAY_USAGE_STATS_ENABLED": "0",
        **extra,
    }


class RayNode:
    """`tandem ray head|worker` on a private node, its temp dir removed on stop."""

    def __init__(self, node: Node, role: str, workdir: Path, head: Node | None = None) -> None:
        self.temp_dir = short_temp_dir(f"tn{role[0]}")
        self.log_path = workdir / f"ray-{role}-{node.name}.log"
        where = ["--port", str(GCS_PORT)] if head is None else ["--address", f"{head.ip}:{GCS_PORT}"]
        with open(self.log_path, "ab") as log:
            self.process: NodeProcess = node.popen(
                [
                    TANDEM,
                    "ray",
                    role,
                    *where,
                    "--",
                    f"--temp-dir={self.temp_dir}",
                    *SMALL_NODE_ARGS,
                    *(HEAD_ONLY_ARGS if head is None else []),
                ],
                env=node_env(node),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        self.process.stop(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def on_same_node(ray_node: RayNode, argv: list[str], **kwargs) -> subprocess.Popen[bytes]:
    """Start `argv` in the network, PID, IPC and mount namespaces of `ray_node`'s node.

    vLLM's engine core is a Ray driver: it must share the head raylet's host (its /dev/shm,
    its processes), as `tandem serve` and `tandem ray head` do on a real head node.
    """
    target = ray_node.process.pid
    return subprocess.Popen(
        ["nsenter", f"--target={target}", "--net", "--pid", "--ipc", "--mount", "--", *argv], **kwargs
    )


@pytest.fixture(scope="module")
def reference_texts(tiny_model: Path, tmp_path_factory) -> list[str]:
    return reference_texts_at_tensor_parallel_1(tiny_model, tmp_path_factory.mktemp("netns-reference"))


@pytest.fixture(scope="module")
def fabric(reference_texts) -> Iterator[Fabric]:
    # After the reference engine: it and the nodes' start-ups would share the two cores.
    with Fabric(2) as fabric:
        yield fabric


class HeadNode:
    """Node 1: NATS + etcd, the Ray head, and `tandem serve` beside it."""

    def __init__(self, node: Node, workdir: Path) -> None:
        self.node = node
        self.workdir = workdir
        self.state_env = node_env(node, TANDEM_STATE_DIR=str(workdir / "infra"))
        up = node.run([TANDEM, "infra", "up", "--host", node.ip], env=self.state_env, timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr
        self.urls = dict(line.split("=", 1) for line in up.stdout.split())
        self.ray = RayNode(node, "head", workdir)
        self.serve_log = workdir / "serve.log"
        self.serve: subprocess.Popen[bytes] | None = None

    def start_serve(self, config: Path) -> None:
        env = node_env(self.node, NATS_SERVER=self.urls["NATS_SERVER"], ETCD_ENDPOINTS=self.urls["ETCD_ENDPOINTS"])
        with open(self.serve_log, "ab") as log:
            self.serve = on_same_node(
                self.ray,
                [TANDEM, "serve", "graphs.agg_router:Frontend", "-f", str(config)],
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.serve_log.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def ray_status(self) -> str:
        """`ray status` on node 1, as an operator checks the cluster."""
        status = on_same_node(
            self.ray,
            [str(Path(TANDEM).with_name("ray")), "status", f"--address={self.node.ip}:{GCS_PORT}"],
            env=node_env(self.node),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        return status.communicate(timeout=60)[0].decode(errors="replace")

    def stop(self) -> None:
        if self.serve is not None and self.serve.poll() is None:
            # nsenter waits for `tandem serve`, its child in the node's PID namespace, and
            # passes no signal on: stop that child, then nsenter ends by itself.
            for child in psutil.Process(self.serve.pid).children():
                _terminate_tree(child)
            try:
                self.serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.serve.kill()
                self.serve.wait()
        self.ray.stop()
        down = self.node.run([TANDEM, "infra", "down"], env=self.state_env, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr


def _terminate_tree(process: psutil.Process, timeout: float = 90.0) -> None:
    descendants = process.children(recursive=True)
    process.terminate()
    try:
        process.wait(timeout)
    except psutil.TimeoutExpired:
        process.kill()
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


@pytest.fixture(scope="module")
async def cluster(fabric: Fabric, tiny_model: Path, tmp_path_factory) -> AsyncIterator[HeadNode]:
    head_node, second_node = fabric.nodes
    workdir = tmp_path_factory.mktemp("ray-netns")
    head = HeadNode(head_node, workdir)
    second: RayNode | None = None
    try:
        config = workdir / "graph.yaml"
        config.write_text(yaml.safe_dump(_config(tiny_model, head_node.ip)))
        head.start_serve(config)
        # One Ray node offers one CPU worker; tensor parallel 2 needs two: the worker waits.
        waiting = (
            f"waiting for the Ray cluster at {head_node.ip}:{GCS_PORT}: need 2 {CPU_DEVICE_RESOURCE}, have 1 on 1 node"
        )
        deadline = time.monotonic() + 240
        while waiting not in head.log():
            assert head.serve is not None and head.serve.poll() is None, head.log_tail()
            assert time.monotonic() < deadline, f"the worker never said it waits:\n{head.log_tail()}"
            await asyncio.sleep(0.5)
        second = RayNode(second_node, "worker", workdir, head=head_node)
        await _wait_serving(head, timeout=600)
        yield head
    finally:
        head.stop()
        if second is not None:
            second.stop()


def _config(model: Path, head_ip: str) -> dict[str, Any]:
    worker = ray_tensor_parallel_2(f"{head_ip}:{GCS_PORT}", wait_timeout_s=600)
    return agg_router_config(model, max_model_len=2048, worker=worker, frontend={"port": FRONTEND_PORT})


async def _wait_serving(head: HeadNode, timeout: float) -> None:
    settings = RuntimeSettings(nats_server=head.urls["NATS_SERVER"], etcd_endpoints=head.urls["ETCD_ENDPOINTS"])
    deadline = time.monotonic() + timeout

    def assert_serving() -> None:
        assert head.serve is not None and head.serve.poll() is None, head.log_tail()

    async with await Runtime.connect(settings) as runtime:
        watch = await runtime.discovery.watch_instances("VllmWorker", "generate")
        try:
            while True:
                assert_serving()
                try:
                    await watch.wait_until(lambda items: len(items) >= 1, 2.0)
                    break
                except TimeoutError:
                    assert time.monotonic() < deadline, f"no VllmWorker after {timeout}s\n{head.log_tail()}"
        finally:
            await watch.close()
    url = f"http://{head.node.ip}:{FRONTEND_PORT}/health"
    await wait_healthy(url, deadline - time.monotonic(), assert_serving, head.log_tail)


@pytest.fixture(scope="module")
def client(cluster: HeadNode) -> Iterator[openai.OpenAI]:
    base_url = f"http://{cluster.node.ip}:{FRONTEND_PORT}/v1"
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_engine_ranks_span_both_nodes(cluster: HeadNode) -> None:
    log = cluster.log()
    assert f"offers 2 {CPU_DEVICE_RESOURCE} on 2 nodes (need 2): starting the engine" in log
    status = cluster.ray_status()
    # Both nodes' single CPU worker slot is taken by the engine's two ranks.
    assert f"2.0/2.0 {CPU_DEVICE_RESOURCE}" in status, status


@pytest.mark.parametrize("index", range(len(CHATS)))
def test_tensor_parallel_2_across_nodes_greedy_equals_tensor_parallel_1(client, reference_texts, index) -> None:
    assert_chat_equals_reference(client, reference_texts, index)


def test_completions_across_nodes_equal_tensor_parallel_1(client, reference_texts) -> None:
    assert_completion_equals_reference(client, reference_texts)
