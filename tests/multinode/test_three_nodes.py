"""The seed's multi-node deployment on three "hosts": network namespaces on one bridge,
each running docs/multinode-quickstart.md's block for it as written (tests/multinode/cluster.py).

Node 1 runs NATS and etcd (`tandem infra up`, advertising the node's own address) and
`tandem serve graphs.agg_router:Frontend` (Frontend, Processor, Router, decode VllmWorker);
nodes 2 and 3 run `tandem serve components.prefill_worker:PrefillWorker` with NATS_SERVER
and ETCD_ENDPOINTS pointing at node 1, all with the one config file
configs/cpu-tiny-disagg.yaml, unmodified. The quickstart's client request is sent as its
block shows it, from this machine.

Each `tandem serve` also runs in its own PID and IPC namespace with its own /dev/shm, so
UCX cannot take its same-host shortcuts: the KV a prefill node computed reaches the
decode engine on node 1 only through the prefill node's network interface, which the
tests watch. Greedy outputs must equal vLLM's own (offline `LLM`, one engine, no transfer)
with the config's engine arguments, its dtype included.

Three vLLM engines on two cores: decode on core 0, both prefill engines on core 1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from openai import AsyncOpenAI, AsyncStream
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from app.runtime import Runtime
from tests.docs.shell import DocShell, http_response, sse_data
from tests.e2e.vllm_reference import vllm_greedy
from tests.multinode.cluster import CLIENT_BLOCK, CONFIG, SeedCluster
from tests.netns import Fabric, Node

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Fabric.available(), reason="network namespaces need root, ip and unshare"),
]

log = logging.getLogger(__name__)

SHIPPED = yaml.safe_load(CONFIG.read_text())
MODEL = SHIPPED["Common"]["served-model-name"]
BLOCK_SIZE = SHIPPED["Common"]["block-size"]
MAX_LOCAL_PREFILL = SHIPPED["VllmWorker"]["max-local-prefill-length"]
MAX_TOKENS = 16
DECODE_METRICS_PORT = SHIPPED["VllmWorker"]["metrics-port"]
PREFILL_METRICS_PORT = SHIPPED["PrefillWorker"]["metrics-port"]
# The config's engine arguments, as its workers pass them to vLLM.
ENGINE_ARGS = {
    "block_size": BLOCK_SIZE,
    "max_model_len": SHIPPED["Common"]["max-model-len"],
    "dtype": SHIPPED["Common"]["dtype"],
    "enforce_eager": SHIPPED["VllmWorker"]["enforce-eager"],
}
# Bytes of one KV element in the config's dtype.
KV_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}[SHIPPED["Common"]["dtype"]]

# The seed's client request text (about 200 tokens) in two chats that share no prefix with
# each other nor with the quickstart's client request (the seed's, without a system
# message), so that the decode worker's prefix cache cannot serve one from another.
SEED_PROMPT = (
    "In the heart of Eldoria, an ancient land of boundless magic and mysterious creatures, lies the long-forgotten "
    "city of Aeloria. Once a beacon of knowledge and power, Aeloria was buried beneath the shifting sands of time, "
    "lost to the world for centuries. You are an intrepid explorer, known for your unparalleled curiosity and "
    "courage, who has stumbled upon an ancient map hinting at ests that Aeloria holds a secret so profound that it "
    "has the potential to reshape the very fabric of reality. Your journey will take you through treacherous "
    "deserts, enchanted forests, and across perilous mountain ranges. Your Task: Character Background: Develop a "
    "detailed background for your character. Describe their motivations for seeking out Aeloria, their skills and "
    "weaknesses, and any personal connections to the ancient city or its legends. Are they driven by a quest for "
    "knowledge, a search for lost familt clue is hidden."
)
Chat = list[ChatCompletionMessageParam]

LONG_CHATS: list[Chat] = [
    [{"role": "system", "content": "You are a guide to Eldoria."}, {"role": "user", "content": SEED_PROMPT}],
    [{"role": "system", "content": "You are the map's last keeper."}, {"role": "user", "content": SEED_PROMPT[::-1]}],
]
SHORT_CHAT: Chat = [{"role": "user", "content": "Where is Aeloria?"}]
ALL_CHATS = [*LONG_CHATS, SHORT_CHAT]


def _key(chat: Chat) -> str:
    return json.dumps(chat)


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> dict[str, list[int]]:
    """Each chat's token ids, as the Processor renders them with the model's template."""
    rendered = {
        _key(c): tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in ALL_CHATS
    }
    ids = {key: list(tokenizer(text, add_special_tokens=False).input_ids) for key, text in rendered.items()}
    assert all(len(ids[_key(c)]) > 2 * MAX_LOCAL_PREFILL for c in LONG_CHATS)
    assert len(ids[_key(SHORT_CHAT)]) <= MAX_LOCAL_PREFILL
    return ids


@pytest.fixture(scope="module")
def reference(tiny_model: Path, tokenizer, prompt_ids, tmp_path_factory) -> dict[str, str]:
    """Chat -> vLLM's own greedy completion on one engine, as a client reads it."""
    keys = list(prompt_ids)
    outputs = vllm_greedy(
        tiny_model, ENGINE_ARGS, [prompt_ids[k] for k in keys], MAX_TOKENS, tmp_path_factory.mktemp("reference")
    )
    return {key: tokenizer.decode(ids, skip_special_tokens=True) for key, ids in zip(keys, outputs, strict=True)}


@pytest.fixture(scope="module")
async def cluster(reference, tmp_path_factory) -> AsyncIterator[SeedCluster]:
    with Fabric(3) as fabric:
        seed = SeedCluster(fabric, tmp_path_factory.mktemp("multinode"))
        try:
            await seed.start()
            yield seed
        finally:
            seed.stop()


# --- what a node exposes, read the way an operator on another host would -------------------


def _tx_bytes(node: Node) -> int:
    """Bytes the node has sent through its one network interface (veth to the bridge)."""
    result = node.run(["cat", "/sys/class/net/eth0/statistics/tx_bytes"], check=True)
    return int(result.stdout)


def _counter(node: Node, port: int, name: str, **labels: str) -> float:
    """A counter's value on a worker's /metrics at the node's address (0 before its first event)."""
    with urllib.request.urlopen(f"http://{node.ip}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{name}_total" and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def _prefill_jobs_done(node: Node) -> float:
    return _counter(node, PREFILL_METRICS_PORT, "tandem_prefill_jobs", outcome="done")


def _kv_bytes_per_token(model: Path) -> int:
    config = json.loads((model / "config.json").read_text())
    # K and V, of every layer.
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * KV_DTYPE_BYTES


async def _instance_hosts(cluster: SeedCluster, service: str, endpoint: str) -> dict[str, str]:
    """instance id -> the host its etcd record advertises."""
    async with await Runtime.connect(cluster.settings) as runtime:
        watch = await runtime.discovery.watch_instances(service, endpoint)
        try:
            return {record.instance_id: record.host for record in watch.items.values()}
        finally:
            await watch.close()


async def _stream_chat(cluster: SeedCluster, chat: Chat) -> tuple[str, str | None]:
    """(text, X-Tandem-Prefill-Worker) of a streamed greedy chat completion sent to node 1."""
    client = AsyncOpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused", timeout=120, max_retries=0)
    async with client.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=chat,
        stream=True,
        temperature=0,
        max_tokens=MAX_TOKENS,
        extra_body={"ignore_eos": True},
        extra_headers={"X-Request-Id": uuid.uuid4().hex},
    ) as response:
        prefill_worker = response.headers.get("x-tandem-prefill-worker")
        stream = await response.parse()
        assert isinstance(stream, AsyncStream)  # stream=True (the streaming wrapper loses create's overloads)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    await client.close()
    return text, prefill_worker


# --- the tests ----------------------------------------------------------------------------


async def test_head_node_serves_nats_and_etcd_on_its_own_address(cluster: SeedCluster) -> None:
    head = cluster.head
    # What `tandem infra up` printed on node 1 is what nodes 2 and 3 export.
    assert cluster.urls == {"NATS_SERVER": f"nats://{head.ip}:4222", "ETCD_ENDPOINTS": f"http://{head.ip}:2379"}
    # etcd also answers on node 1's loopback (the seed's --listen-client-urls note) ...
    probe = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)"
    assert head.run([sys.executable, "-c", probe, "http://127.0.0.1:2379/health"]).returncode == 0
    # ... but another node reaches it only at node 1's address.
    other = cluster.prefill_nodes[0]
    assert other.run([sys.executable, "-c", probe, f"http://{head.ip}:2379/health"]).returncode == 0
    assert other.run([sys.executable, "-c", probe, "http://127.0.0.1:2379/health"]).returncode != 0


async def test_every_node_advertises_its_own_address(cluster: SeedCluster) -> None:
    head, node2, node3 = cluster.head, *cluster.prefill_nodes
    for service, endpoint in [
        ("VllmWorker", "generate"),
        ("VllmWorker", "prefill_done"),
        ("Router", "route"),
        ("Processor", "chat_completions"),
    ]:
        assert set((await _instance_hosts(cluster, service, endpoint)).values()) == {head.ip}, service
    assert sorted((await _instance_hosts(cluster, "PrefillWorker", "status")).values()) == sorted([node2.ip, node3.ip])
    # Every NATS client dialled node 1's address from its own node (the test: from the bridge).
    with urllib.request.urlopen(f"http://{head.ip}:8222/connz", timeout=5) as response:  # noqa: ASYNC210 - nothing else on this loop
        client_ips = {connection["ip"] for connection in json.load(response)["connections"]}
    assert {head.ip, node2.ip, node3.ip} <= client_ips <= {head.ip, node2.ip, node3.ip, cluster.host_ip}


async def test_long_prompts_are_prefilled_on_nodes_2_and_3_and_their_kv_crosses_the_network(
    cluster: SeedCluster, reference, prompt_ids, tiny_model: Path
) -> None:
    head, prefill_nodes = cluster.head, cluster.prefill_nodes
    node_of = await _instance_hosts(cluster, "PrefillWorker", "status")  # instance id -> node address
    sent_before = {node.ip: _tx_bytes(node) for node in prefill_nodes}
    done_before = {node.ip: _prefill_jobs_done(node) for node in prefill_nodes}
    remote_before = _counter(head, DECODE_METRICS_PORT, "tandem_worker_prefill_decisions", decision="remote")
    pulled_before = _counter(head, DECODE_METRICS_PORT, "tandem_worker_external_kv_prompt_tokens")

    # Both at once: each prefill worker takes one job at a time, so each node gets one.
    results = await asyncio.gather(*(_stream_chat(cluster, chat) for chat in LONG_CHATS))

    served_by: dict[str, list[str]] = {}
    for chat, (text, prefill_worker) in zip(LONG_CHATS, results, strict=True):
        assert text == reference[_key(chat)]
        assert prefill_worker in node_of, f"not prefilled by a PrefillWorker: {prefill_worker!r}"
        served_by.setdefault(node_of[prefill_worker], []).append(_key(chat))
    assert sorted(served_by) == sorted(node.ip for node in prefill_nodes), served_by
    remote = _counter(head, DECODE_METRICS_PORT, "tandem_worker_prefill_decisions", decision="remote")
    assert remote - remote_before == len(LONG_CHATS)
    # The decode engine on node 1 took the prompts' KV from the connector, not from its own prefill.
    pulled = _counter(head, DECODE_METRICS_PORT, "tandem_worker_external_kv_prompt_tokens") - pulled_before
    assert pulled >= sum((len(prompt_ids[_key(chat)]) - 1) // BLOCK_SIZE * BLOCK_SIZE for chat in LONG_CHATS)

    per_token = _kv_bytes_per_token(tiny_model)
    for node in prefill_nodes:
        assert _prefill_jobs_done(node) - done_before[node.ip] == 1
        # The prompt's KV (every full block of it, at least) left the prefill node over its wire.
        kv_bytes = sum(len(prompt_ids[key]) // BLOCK_SIZE * BLOCK_SIZE * per_token for key in served_by[node.ip])
        sent = _tx_bytes(node) - sent_before[node.ip]
        log.info("%s (%s) sent %d bytes for %d bytes of KV", node.name, node.ip, sent, kv_bytes)
        assert sent >= kv_bytes, f"{node.name} sent {sent} bytes for {kv_bytes} bytes of KV"


async def test_short_prompt_stays_on_node_1(cluster: SeedCluster, reference) -> None:
    head, prefill_nodes = cluster.head, cluster.prefill_nodes
    done_before = [_prefill_jobs_done(node) for node in prefill_nodes]
    local_before = _counter(head, DECODE_METRICS_PORT, "tandem_worker_prefill_decisions", decision="local")

    text, prefill_worker = await _stream_chat(cluster, SHORT_CHAT)

    assert text == reference[_key(SHORT_CHAT)]
    assert prefill_worker is None
    assert _counter(head, DECODE_METRICS_PORT, "tandem_worker_prefill_decisions", decision="local") - local_before == 1
    assert [_prefill_jobs_done(node) for node in prefill_nodes] == done_before


def test_every_node_made_the_same_model(cluster: SeedCluster, tiny_model: Path) -> None:
    """Each node's `tandem model make-tiny` (default seed) wrote the files the reference ran on."""
    expected = {path.name: path.read_bytes() for path in tiny_model.iterdir()}
    for node in [cluster.head, *cluster.prefill_nodes]:
        made = cluster.model_dir(node)
        assert {path.name: path.read_bytes() for path in made.iterdir()} == expected, node.name


async def test_the_quickstarts_client_request_is_prefilled_on_a_prefill_node(cluster: SeedCluster, tmp_path) -> None:
    """The client block, as written, from this machine (which reaches node 1 through the bridge)."""
    (curl,) = CLIENT_BLOCK.expect("curl")
    prefill_workers = await _instance_hosts(cluster, "PrefillWorker", "status")
    client = DocShell(tmp_path, placeholders={"node1-ip": cluster.head.ip})
    response = http_response(await asyncio.to_thread(client.run, curl))
    assert response.status == 200, response.body[:2000]
    assert response.headers.get("x-tandem-prefill-worker") in prefill_workers, response.headers
    events = list(sse_data(response.body))
    assert events[-1] == "[DONE]"
    assert "".join(
        chunk["choices"][0]["delta"].get("content") or "" for chunk in map(json.loads, events[:-1]) if chunk["choices"]
    ).strip()
