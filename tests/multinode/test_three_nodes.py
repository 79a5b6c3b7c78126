"""The seed's multi-node deployment on three "hosts": network namespaces on one bridge,
each running docs/multinode-quickstart.md's block for it as written (tests/multinode/cluster.py).

Node 1 runs NATS and etcd (`tandem infra up`, advertising the node's own address) and
`tandem serve graphs.agg_router:Frontend` (Frontend with the router inside, Processor, decode VllmWorker);
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
import itertools
import json
import logging
import math
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from openai import AsyncOpenAI, AsyncStream
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from app.protocol import PREFILL_ACK_WAIT_S
from app.runtime import Runtime
from tests.debian_packages import install_missing
from tests.docs.shell import DocShell, http_response, sse_data
from tests.e2e.vllm_reference import vllm_greedy
from tests.multinode.cluster import CLIENT_BLOCK, CONFIG, SeedCluster
from tests.netns import Fabric, Node

# Root for the network namespaces: tests/multinode/conftest.py skips the tier without it, or fails it under CI.
pytestmark = pytest.mark.e2e

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
# Two more long chats for the partition test's request loop: the seed prompt's sentences in
# other orders.
_SENTENCES = SEED_PROMPT.split(". ")
PARTITION_CHATS: list[Chat] = [
    *LONG_CHATS,
    [
        {"role": "system", "content": "You chart its deserts."},
        {"role": "user", "content": ". ".join(_SENTENCES[3:] + _SENTENCES[:3])},
    ],
    [{"role": "system", "content": "You read old maps."}, {"role": "user", "content": ". ".join(_SENTENCES[::-1])}],
]
ALL_CHATS = [*PARTITION_CHATS, SHORT_CHAT]


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
    assert all(len(ids[_key(c)]) > 2 * MAX_LOCAL_PREFILL for c in PARTITION_CHATS)
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


async def _stream_chat(cluster: SeedCluster, chat: Chat, request_id: str | None = None) -> tuple[str, str | None]:
    """(text, X-Tandem-Prefill-Worker) of a streamed greedy chat completion sent to node 1."""
    client = AsyncOpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused", timeout=120, max_retries=0)
    async with client.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=chat,
        stream=True,
        temperature=0,
        max_tokens=MAX_TOKENS,
        extra_body={"ignore_eos": True},
        extra_headers={"X-Request-Id": request_id or uuid.uuid4().hex},
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


def _doctor_on_node_1(cluster: SeedCluster) -> tuple[int, dict[str, Any]]:
    """`tandem doctor --json` as an operator runs it on node 1 (the decode node), with its exports."""
    shell = cluster.shells[cluster.head.name]
    status = shell.check(".venv/bin/tandem doctor --json --listen 2 > doctor.json; echo $?", timeout=120)
    return int(status.strip()), json.loads((cluster.node_dir(cluster.head) / "doctor.json").read_text())


async def test_doctor_passes_on_the_three_nodes_and_names_a_prefill_node_whose_side_channel_is_blocked(
    cluster: SeedCluster,
) -> None:
    status, report = _doctor_on_node_1(cluster)
    verdicts = {check["name"]: check["verdict"] for check in report["checks"]}
    assert status == 0 and report["ok"], json.dumps(report, indent=1)
    assert verdicts["nixl-side-channels"] == "PASS" and verdicts["clocks"] == "PASS", verdicts

    # Node 2's firewall refuses its side-channel port: decode engines could not pull its KV.
    node2 = cluster.prefill_nodes[0]
    async with await Runtime.connect(cluster.settings) as runtime:
        (side_channel,) = [
            p.nixl_side_channel
            for p in await runtime.discovery.list_processes()
            if p.host == node2.ip and p.nixl_side_channel
        ]
    port = side_channel.rpartition(":")[2]
    install_missing({"iptables": "iptables"})
    rule = ["INPUT", "-p", "tcp", "--dport", port, "-j", "REJECT", "--reject-with", "tcp-reset"]
    assert node2.run(["iptables", "-I", *rule]).returncode == 0
    try:
        status, report = _doctor_on_node_1(cluster)
    finally:
        node2.run(["iptables", "-D", *rule])
    (failed,) = [check for check in report["checks"] if check["verdict"] == "FAIL"]
    assert status == 1 and failed["name"] == "nixl-side-channels", json.dumps(report, indent=1)
    assert f"NIXL side channel {side_channel} is unreachable" in failed["message"]
    assert f"Open TCP port {port} on {node2.ip}" in failed["message"]


# --- a node cut off (last: it takes node 2 off the network for a while) ---------------------

CUT_S = 15.0  # issue 15, item 5
# From the link's return until node 2 prefills again: its NATS connection, which pings
# every 3 s, dropped during the cut and is made anew at once (measured: 1.4 s; 12-16 s
# when nothing pinged and it waited for TCP's retransmission backoff); its etcd lease,
# expired during the cut, is granted again under the same id within about 1 s.
REJOIN_WITHIN_S = 30.0


@dataclass
class Sent:
    """One request of the loop, as its client saw it."""

    request_id: str
    chat: str
    sent_at: float  # time.monotonic()
    done_at: float
    text: str | None = None
    prefill_worker: str | None = None
    error: str | None = None


async def _request_loop(
    cluster: SeedCluster, chats: list[Chat], stop: asyncio.Event, on_result: Callable[[Sent], None]
) -> None:
    """One client sending `chats` in turn, each after the last one's end, until `stop`."""
    for chat in itertools.cycle(chats):
        if stop.is_set():
            return
        sent = Sent(uuid.uuid4().hex, _key(chat), time.monotonic(), math.inf)
        try:
            sent.text, sent.prefill_worker = await _stream_chat(cluster, chat, sent.request_id)
        except Exception as exc:  # a failed request is what the test counts
            sent.error = f"{type(exc).__name__}: {exc}"
        sent.done_at = time.monotonic()
        on_result(sent)


def _reaches_head(node: Node, head: Node) -> bool:
    """Whether `node` gets an answer from node 1's NATS monitoring port within 2 s."""
    probe = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)"
    return node.run([sys.executable, "-c", probe, f"http://{head.ip}:8222/healthz"]).returncode == 0


def _prefill_redeliveries(head: Node) -> int:
    """Prefill jobs delivered more than once so far (deliveries less jobs delivered), as node
    1's NATS monitoring port shows the queue's one JetStream consumer."""
    with urllib.request.urlopen(f"http://{head.ip}:8222/jsz?consumers=true", timeout=5) as response:
        (account,) = json.load(response)["account_details"]
    (stream,) = account["stream_detail"]
    (consumer,) = stream["consumer_detail"]
    return consumer["delivered"]["consumer_seq"] - consumer["delivered"]["stream_seq"]


async def test_node_2_cut_off_for_15_s_fails_no_request_and_takes_jobs_again_when_back(
    cluster: SeedCluster, reference
) -> None:
    """Node 2's link down for 15 s under a steady loop of long and short requests: none fails,
    every text is vLLM's own, none sent and answered while it was away was prefilled there,
    and it takes prefill jobs again once the link is back, and still does one ack-wait later."""
    head, (node2, node3) = cluster.head, cluster.prefill_nodes
    # Each prompt's reference differs from every other's: KV handed to the wrong request shows.
    assert len({reference[_key(chat)] for chat in ALL_CHATS}) == len(ALL_CHATS)
    decisions_before = {
        decision: _counter(head, DECODE_METRICS_PORT, "tandem_worker_prefill_decisions", decision=decision)
        for decision in ("remote", "fallback", "local")
    }
    redeliveries_before = _prefill_redeliveries(head)
    results: list[Sent] = []
    stop = asyncio.Event()
    # A request sent after since[node] and prefilled there sets prefilled_on[node].
    since = {node2.ip: -math.inf, node3.ip: -math.inf}
    prefilled_on = {node2.ip: asyncio.Event(), node3.ip: asyncio.Event()}
    async with await Runtime.connect(cluster.settings) as runtime:
        watch = await runtime.discovery.watch_instances("PrefillWorker", "status")

        def ids_on(node: Node) -> set[str]:
            return {instance for instance, record in watch.items.items() if record.host == node.ip}

        worker_ids = {node2.ip: ids_on(node2), node3.ip: ids_on(node3)}
        assert all(worker_ids.values()), watch.items

        def on_result(sent: Sent) -> None:
            results.append(sent)
            for ip, ids in worker_ids.items():
                if sent.prefill_worker in ids and sent.sent_at > since[ip]:
                    prefilled_on[ip].set()

        async def node_2_prefills(after: float, what: str) -> None:
            since[node2.ip] = after
            prefilled_on[node2.ip].clear()
            try:
                await asyncio.wait_for(prefilled_on[node2.ip].wait(), after + REJOIN_WITHIN_S - time.monotonic())
            except TimeoutError:
                raise AssertionError(
                    f"node 2 prefilled no request sent {what} (registered as {sorted(ids_on(node2))})\n"
                    f"{cluster.log_tails()}"
                ) from None

        loops = [
            asyncio.create_task(_request_loop(cluster, PARTITION_CHATS[0::2], stop, on_result)),
            asyncio.create_task(_request_loop(cluster, PARTITION_CHATS[1::2], stop, on_result)),
            asyncio.create_task(_request_loop(cluster, [SHORT_CHAT], stop, on_result)),
        ]
        try:
            # Both prefill nodes take jobs before the cut.
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in prefilled_on.values())), 60)
            since[node2.ip] = math.inf
            cut_at = time.monotonic()
            with cluster.cut_off(node2):
                assert not await asyncio.to_thread(_reaches_head, node2, head), "node 2 still reaches node 1"
                # The fault as etcd sees it: node 2's lease runs out (TTL 10 s) while it is away.
                try:
                    await watch.wait_until(lambda _: not ids_on(node2), cut_at + CUT_S - time.monotonic())
                except TimeoutError:
                    raise AssertionError(f"node 2's PrefillWorker still registered {CUT_S:g}s into the cut") from None
                await asyncio.sleep(cut_at + CUT_S - time.monotonic())
            link_up_at = time.monotonic()
            await node_2_prefills(link_up_at, f"within {REJOIN_WITHIN_S:g}s of its link's return")
            rejoined_at = time.monotonic()
            worker_ids[node2.ip] |= ids_on(node2)
            # Still so once every job it held during the cut was redelivered or acked: a
            # worker that takes one job and then stops pulling has not rejoined.
            await node_2_prefills(rejoined_at + PREFILL_ACK_WAIT_S, f"{PREFILL_ACK_WAIT_S:g}s after it prefilled again")
        finally:
            stop.set()
            await asyncio.gather(*loops)
            await watch.close()

    during = [sent for sent in results if cut_at <= sent.sent_at and sent.done_at <= link_up_at]
    decisions = {
        decision: _counter(head, DECODE_METRICS_PORT, "tandem_worker_prefill_decisions", decision=decision) - before
        for decision, before in decisions_before.items()
    }
    slowest = max(results, key=lambda sent: sent.done_at - sent.sent_at)
    log.info(
        "%d requests, %d of them sent and done during the cut; prefill decisions %s; %d jobs redelivered; "
        "slowest request %.1f s (%s, prefilled by %s); node 2 prefilled again %.1f s after its link returned",
        len(results),
        len(during),
        decisions,
        _prefill_redeliveries(head) - redeliveries_before,
        slowest.done_at - slowest.sent_at,
        slowest.request_id,
        slowest.prefill_worker,
        rejoined_at - link_up_at,
    )
    failed = [sent for sent in results if sent.error is not None]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed}\n{cluster.log_tails()}"
    wrong = [sent for sent in results if sent.text != reference[sent.chat]]
    assert not wrong, f"{len(wrong)} of {len(results)} texts differ from vLLM's: {wrong}"
    assert not [sent for sent in during if sent.prefill_worker in worker_ids[node2.ip]], during
    # Long prompts kept going remote during the cut, to node 3.
    assert [sent for sent in during if sent.prefill_worker in worker_ids[node3.ip]], during
    # Neither node's PrefillWorker stopped pulling on the way (its puller task ended, say):
    # two long prompts at once go one to each, as before the cut.
    pair = await asyncio.gather(*(_stream_chat(cluster, chat) for chat in LONG_CHATS))
    assert [text for text, _ in pair] == [reference[_key(chat)] for chat in LONG_CHATS]
    served_by = {ip for ip, ids in worker_ids.items() for _, prefill_worker in pair if prefill_worker in ids}
    assert served_by == {node2.ip, node3.ip}, f"two long prompts at once were prefilled by {pair}"
