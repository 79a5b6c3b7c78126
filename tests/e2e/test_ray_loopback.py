"""A model larger than a node, on one host: two Ray nodes (`tandem ray head` and
`tandem ray worker`, each its own raylet on loopback) and vLLM's CPU build serving the
tiny model with tensor parallel 2 over Ray, one rank per raylet, through
`tandem serve graphs.agg_router:Frontend` with real NATS and etcd.

The worker is served while only the head has joined: it must wait, saying so, and start
once the second raylet joins. Greedy output must equal vLLM's own with tensor parallel 1.
(tests/e2e/test_ray_netns.py runs the same across two network namespaces.)
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import openai
import pytest

from app.engines.vllm_cpu_ray import CPU_DEVICE_RESOURCE
from app.engines.vllm_ray import RayDevices
from app.launch.ports import free_port
from testbed.graphs import ServedGraph
from tests.e2e.graph_configs import agg_router_config, ray_tensor_parallel_2
from tests.e2e.ray_harness import (
    CHATS,
    LOOPBACK_ENV,
    LOOPBACK_IP,
    LoopbackRayNode,
    assert_chat_equals_reference,
    assert_completion_equals_reference,
    reference_texts_at_tensor_parallel_1,
    wait_for_cluster,
    wait_in_process,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def reference_texts(tiny_model: Path, tmp_path_factory) -> list[str]:
    return reference_texts_at_tensor_parallel_1(tiny_model, tmp_path_factory.mktemp("ray-reference"))


@pytest.fixture(scope="module")
def ray_head(reference_texts, tmp_path_factory) -> Iterator[LoopbackRayNode]:
    # After the reference: its engine and Ray's start-up would share the two cores.
    head = LoopbackRayNode("head", tmp_path_factory.mktemp("ray"))
    try:
        wait_for_cluster(head.address, RayDevices(CPU_DEVICE_RESOURCE, 1))
        yield head
    finally:
        head.stop()


def test_wait_gives_up_after_the_timeout_naming_what_is_missing(ray_head: LoopbackRayNode) -> None:
    # More than the cluster will ever have here; the graph below may have joined a second node.
    started = time.monotonic()
    result = wait_in_process(ray_head.address, RayDevices(CPU_DEVICE_RESOURCE, 3), timeout=6, log_interval=2)
    assert result.returncode == 3, result.stderr[-3000:]
    assert re.search(
        rf"need 3 {CPU_DEVICE_RESOURCE} in the Ray cluster at {re.escape(ray_head.address)}, "
        r"have [12] on [12] node\(s\) after 6 s",
        result.stderr,
    ), result.stderr[-3000:]
    waits = re.findall(rf"waiting for the Ray cluster at \S+: need 3 {CPU_DEVICE_RESOURCE}, have", result.stderr)
    assert len(waits) >= 3  # at 0, 2 and 4 s
    assert time.monotonic() - started >= 6


def test_wait_for_a_cluster_that_does_not_answer_says_so() -> None:
    address = f"{LOOPBACK_IP}:{free_port()}"
    result = wait_in_process(address, RayDevices(CPU_DEVICE_RESOURCE, 2), timeout=5, log_interval=2)
    assert result.returncode == 3, result.stderr[-3000:]
    assert f"need 2 {CPU_DEVICE_RESOURCE} in the Ray cluster at {address}, which did not answer" in result.stderr


@pytest.fixture(scope="module")
async def graph(ray_head, tiny_model, nats_server, etcd_server, tmp_path_factory) -> AsyncIterator[ServedGraph]:
    workdir = tmp_path_factory.mktemp("ray-graph")
    config = agg_router_config(tiny_model, max_model_len=2048, worker=ray_tensor_parallel_2(ray_head.address, 300))
    served = ServedGraph("graphs.agg_router:Frontend", config, workdir, nats_server.url, etcd_server.url)
    served.env.update(LOOPBACK_ENV)
    second: LoopbackRayNode | None = None
    served.start()
    try:
        # One raylet offers one CPU worker; tensor parallel 2 needs two: the worker waits.
        deadline = time.monotonic() + 180
        waiting = f"waiting for the Ray cluster at {ray_head.address}: need 2 {CPU_DEVICE_RESOURCE}, have 1 on 1 node"
        while waiting not in served.log_path.read_text(errors="replace"):
            assert served.process is not None and served.process.poll() is None, served.log_tail()
            assert time.monotonic() < deadline, f"the worker never said it waits:\n{served.log_tail()}"
            await asyncio.sleep(0.5)
        second = LoopbackRayNode("worker", workdir, head_address=ray_head.address)
        await served.wait_ready(workers=1, timeout=600)
        yield served
    finally:
        served.stop()
        if second is not None:
            second.stop()


@pytest.fixture(scope="module")
def client(graph: ServedGraph) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{graph.base_url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_worker_started_once_the_second_raylet_joined(graph: ServedGraph) -> None:
    log = graph.log_path.read_text(errors="replace")
    offered = f"offers 2 {CPU_DEVICE_RESOURCE} on 2 nodes (need 2): starting the engine"
    assert offered in log
    assert log.index("have 1 on 1 node") < log.index(offered)


@pytest.mark.parametrize("index", range(len(CHATS)))
def test_tensor_parallel_2_over_ray_greedy_equals_tensor_parallel_1(client, reference_texts, index) -> None:
    assert_chat_equals_reference(client, reference_texts, index)


def test_completions_over_ray_equal_tensor_parallel_1(client, reference_texts) -> None:
    assert_completion_equals_reference(client, reference_texts)
