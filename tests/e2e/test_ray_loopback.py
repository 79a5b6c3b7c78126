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
from transformers import AutoTokenizer

from app.engines.vllm_cpu_ray import CPU_DEVICE_RESOURCE
from app.engines.vllm_ray import RayDevices
from app.launch.ports import free_port
from bench.harness.launch import ServedGraph
from tests.e2e.ray_harness import LOOPBACK_ENV, LOOPBACK_IP, LoopbackRayNode, wait_for_cluster, wait_in_process
from tests.e2e.vllm_reference import vllm_greedy

pytestmark = pytest.mark.e2e

MODEL = "tiny-llama"
MAX_TOKENS = 16
# float32: tensor parallel sums partial products in another order; in bf16 that can flip
# a greedy choice, in float32 it does not.
ENGINE_ARGS = {"block_size": 32, "max_model_len": 2048, "enforce_eager": True, "dtype": "float32"}
CHATS = [
    [{"role": "user", "content": "In the heart of Eldoria, an ancient land of boundless magic, lies Aeloria."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "naïve café — 日本語 🙂 more"}],
]
PROMPT = "The quick brown fox"
GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def reference_texts(tiny_model: Path, tokenizer, tmp_path_factory) -> list[str]:
    """vLLM's own greedy text, tensor parallel 1, for each chat and then the completion prompt."""
    rendered = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in CHATS]
    prompts = [list(tokenizer(text, add_special_tokens=False).input_ids) for text in rendered]
    prompts.append(list(tokenizer(PROMPT).input_ids))
    outputs = vllm_greedy(tiny_model, ENGINE_ARGS, prompts, MAX_TOKENS, tmp_path_factory.mktemp("ray-reference"))
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]


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
    common = {"model": str(tiny_model), "served-model-name": MODEL, "block-size": 32, "max-model-len": 2048}
    config = {
        "Common": common,
        "Frontend": {"served-model-name": MODEL},
        "Processor": {"common-configs": ["model", "max-model-len"]},
        "Router": {"policy": "kv", "common-configs": ["model", "block-size"]},
        "VllmWorker": {
            "engine": "vllm",
            "enforce-eager": True,
            "dtype": "float32",
            "tensor-parallel-size": 2,
            "distributed-executor-backend": "ray",
            "ray-address": ray_head.address,
            "ray-wait-timeout-s": 300,
            "common-configs": ["model", "served-model-name", "block-size", "max-model-len"],
        },
    }
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
    whole = client.chat.completions.create(model=MODEL, messages=CHATS[index], **GREEDY)
    assert whole.choices[0].message.content == reference_texts[index]
    streamed = client.chat.completions.create(model=MODEL, messages=CHATS[index], stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reference_texts[index]


def test_completions_over_ray_equal_tensor_parallel_1(client, reference_texts) -> None:
    completion = client.completions.create(model=MODEL, prompt=PROMPT, **GREEDY)
    assert completion.choices[0].text == reference_texts[-1]
    assert completion.usage.completion_tokens == MAX_TOKENS
