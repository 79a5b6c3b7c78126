"""The multi-node guide's last scenario on four "hosts": disaggregated serving of a model
larger than a node, on two Ray clusters (docs/multinode.md, "The disaggregated deployment
on CPU nodes, with the small model"), run from that section's own blocks.

- node 1: NATS and etcd (`tandem infra up`, advertising node 1's address), the decode
  cluster's Ray head and `tandem serve graphs.agg:Frontend` (Frontend, Processor, the
  decode VllmWorker: tensor parallel 2 on vLLM's Ray executor);
- node 2: `tandem ray worker` of the decode cluster;
- node 3: given only NATS_SERVER, ETCD_ENDPOINTS (and its own address), the prefill
  cluster's Ray head and `tandem serve components.prefill_worker:PrefillWorker`, tensor
  parallel 2 as well;
- node 4: `tandem ray worker` of the prefill cluster.

All with configs/cpu-tiny-disagg-ray.yaml (configs/mutinode_disagg_r1.yaml's keys, small
sizes). Each node is a network namespace with its own PID/IPC namespace and /dev/shm
(tests/netns.py); a node's `tandem serve` joins its Ray head's namespaces, as on one host.
Each Ray node offers one CPU worker slot, so each engine has one rank per node of its
cluster; the decode ranks pull the KV the prefill ranks computed over NIXL, rank by rank.

Two engines of two ranks each on two cores, each rank a process of its own: nodes 1 and 3
on core 0, nodes 2 and 4 on core 1 (`taskset` around each Ray node, as docs/multinode.md
advises where nodes share a machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml
from openai import AsyncOpenAI, AsyncStream
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from app.engines.vllm_cpu_ray import CPU_DEVICE_RESOURCE
from app.runtime import Runtime
from app.settings import RuntimeSettings
from tests.docs.blocks import REPO, Command, doc_blocks
from tests.e2e.ray_harness import HEAD_ONLY_ARGS, SMALL_NODE_ARGS, TANDEM, short_temp_dir
from tests.e2e.vllm_reference import vllm_greedy
from tests.netns import Fabric, Node, NodeProcess
from tests.waiting import wait_healthy

# Root for the network namespaces: tests/multinode/conftest.py skips the tier without it, or fails it under CI.
pytestmark = pytest.mark.e2e

NODE1_BLOCK, NODE3_BLOCK, RAY_WORKER_BLOCK = doc_blocks(
    "multinode-cpu-disagg-node1", "multinode-cpu-disagg-node3", "multinode-cpu-disagg-ray-worker"
)
CONFIG_NAME = "configs/cpu-tiny-disagg-ray.yaml"  # the one the blocks serve
CONFIG = yaml.safe_load((REPO / CONFIG_NAME).read_text())
MODEL = CONFIG["Common"]["served-model-name"]
BLOCK_SIZE = CONFIG["Common"]["block-size"]
MAX_LOCAL_PREFILL = CONFIG["VllmWorker"]["max-local-prefill-length"]
DECODE_METRICS_PORT = CONFIG["VllmWorker"]["metrics-port"]
GCS_PORT = 6379  # the blocks' (Ray's default); every node has its own port space
FRONTEND_PORT = CONFIG["Frontend"]["port"]
MAX_TOKENS = 16
# vLLM's own answer: tensor parallel 1, no transfer, the config's engine arguments.
ENGINE_ARGS = {
    "block_size": BLOCK_SIZE,
    "max_model_len": CONFIG["Common"]["max-model-len"],
    "dtype": CONFIG["Common"]["dtype"],
    "enforce_eager": CONFIG["VllmWorker"]["enforce-eager"],
}
# What the test's own shell may hold that must not leak into a "host": each node is
# configured by what the blocks export and nothing else.
_HOST_ONLY = ("NATS_SERVER", "ETCD_", "TANDEM_", "VLLM_HOST_IP", "RAY_", "GLOO_", "VLLM_NIXL_", "VLLM_CPU_OMP")
START_TIMEOUT_S = 600.0

Chat = list[ChatCompletionMessageParam]
LONG_CHAT: Chat = [
    {"role": "system", "content": "You are a guide to Eldoria."},
    {
        "role": "user",
        "content": "In the heart of Eldoria, an ancient land of boundless magic and mysterious creatures, lies the "
        "long-forgotten city of Aeloria. Once a beacon of knowledge and power, Aeloria was buried beneath the "
        "shifting sands of time, lost to the world for centuries. You are an intrepid explorer, known for your "
        "unparalleled curiosity and courage, who has stumbled upon an ancient map hinting that Aeloria holds a "
        "secret so profound that it has the potential to reshape the very fabric of reality.",
    },
]
SHORT_CHAT: Chat = [{"role": "user", "content": "Where is Aeloria?"}]
CHATS = {"long": LONG_CHAT, "short": SHORT_CHAT}


@dataclass
class Host:
    """One node as an operator's terminal on it: what its commands exported, what they started."""

    node: Node
    workdir: Path
    core: int  # the core its Ray node (and so that node's engine rank) is given
    env: dict[str, str] = field(default_factory=dict)
    ray: NodeProcess | None = None
    ray_temp_dir: str | None = None
    serve: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    def export(self, command: Command) -> None:
        """An `export NAME=VALUE` line (placeholders already substituted)."""
        (word, assignment) = command.words
        assert word == "export", command
        name, value = assignment.split("=", 1)
        self.env[name] = value

    def run(self, command: Command, timeout: float = 120) -> str:
        result = self.node.run(["bash", "-c", command.text], env=self.env, cwd=self.workdir, timeout=timeout)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def start_ray(self, command: Command) -> None:
        """`tandem ray head|worker`, small (tests/e2e/ray_harness.py) and on this node's core."""
        self.ray_temp_dir = short_temp_dir(f"tr{self.core}")
        extra = ["--", f"--temp-dir={self.ray_temp_dir}", *SMALL_NODE_ARGS]
        if command.starts_with("tandem ray head"):
            extra += HEAD_ONLY_ARGS
        command = command.with_arguments(*extra)
        log = self.workdir / "ray.log"
        self.logs.append(log)
        with log.open("ab") as out:
            self.ray = self.node.popen(
                ["taskset", "-c", str(self.core), "bash", "-c", command.text],
                env=self.env,
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def in_ray_namespaces(self, argv: list[str], **kwargs) -> subprocess.Popen[bytes]:
        """`argv` on the same "host" as this node's Ray (its PID, IPC and mount namespaces).

        vLLM's engine core is a Ray driver: it must share the head raylet's host.
        """
        assert self.ray is not None
        return subprocess.Popen(
            [
                "nsenter",
                f"--target={self.ray.pid}",
                "--net",
                "--pid",
                "--ipc",
                "--mount",
                f"--wd={self.workdir}",
                "--",
                *argv,
            ],
            env=self.env,
            cwd=self.workdir,
            **kwargs,
        )

    def start_serve(self, command: Command) -> None:
        log = self.workdir / "serve.log"
        self.logs.append(log)
        with log.open("ab") as out:
            self.serve = self.in_ray_namespaces(["bash", "-c", command.text], stdout=out, stderr=subprocess.STDOUT)

    def serve_log(self) -> str:
        return (self.workdir / "serve.log").read_text(errors="replace")

    def assert_running(self) -> None:
        for process in (self.ray, self.serve):
            assert process is None or process.poll() is None, f"a process on {self.node.name} exited\n{self.tails()}"

    def tails(self, lines: int = 40) -> str:
        return "\n".join(
            f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
            for log in self.logs
            if log.exists()
        )

    def stop(self) -> None:
        if self.serve is not None and self.serve.poll() is None:
            # nsenter passes no signal on: stop its child (`bash` running `tandem serve`) and the tree below.
            for child in psutil.Process(self.serve.pid).children():
                _terminate_tree(child)
            try:
                self.serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.serve.kill()
                self.serve.wait()
        if self.ray is not None:
            self.ray.stop(timeout=30)
        if self.ray_temp_dir is not None:
            shutil.rmtree(self.ray_temp_dir, ignore_errors=True)


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


def _node_env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_HOST_ONLY)}
    # `tandem` on the PATH, as after installing it; the node's own state directory for `tandem infra`.
    return {
        **env,
        "PATH": f"{Path(TANDEM).parent}:{env.get('PATH', '')}",
        "TANDEM_STATE_DIR": str(workdir / ".state"),
        "RAY_USAGE_STATS_ENABLED": "0",
    }


class DisaggRayClusters:
    """Nodes 1+2 the decode Ray cluster, nodes 3+4 the prefill one."""

    def __init__(self, fabric: Fabric, workdir: Path, model: Path) -> None:
        self.hosts: list[Host] = []
        for index, node in enumerate(fabric.nodes):
            directory = workdir / node.name
            (directory / "models").mkdir(parents=True)
            # Every node has the same model at the config's relative path (the guide makes it on each).
            (directory / "models" / "tiny-llama").symlink_to(model)
            (directory / "configs").symlink_to(REPO / "configs")
            self.hosts.append(Host(node, directory, core=index % 2, env=_node_env(directory)))
        self.node1, self.node2, self.node3, self.node4 = self.hosts
        ips = {f"node{i + 1}-ip": host.node.ip for i, host in enumerate(self.hosts)}
        self.placeholders = ips
        self.urls: dict[str, str] = {}
        self._infra_up = False

    def _values(self, host: Host, ray_head: Host | None = None) -> dict[str, str]:
        values = {**self.placeholders, "this-node-ip": host.node.ip}
        if ray_head is not None:
            values["ray-head-ip"] = ray_head.node.ip
        return values

    @property
    def settings(self) -> RuntimeSettings:
        return RuntimeSettings(nats_server=self.urls["NATS_SERVER"], etcd_endpoints=self.urls["ETCD_ENDPOINTS"])

    async def start(self) -> None:
        """Each cluster's head and `tandem serve`, then its worker once the engine waits for it.

        The wait is only for the shared filesystem: Ray records "the cluster this machine
        joined" in /tmp/ray, which all four "hosts" share, so each engine finds its
        cluster before the next cluster's head starts.
        """
        export_ip, export_gloo, infra_up, export_nats, export_etcd, ray_head, serve = (
            c.substituted(self._values(self.node1))
            for c in NODE1_BLOCK.expect(
                "export", "export", "tandem infra up", "export", "export", "tandem ray head", "tandem serve"
            )
        )
        self.node1.export(export_ip)
        self.node1.export(export_gloo)
        self._infra_up = True  # even if `up` fails half-way, `infra down` stops what it started
        self.urls = dict(line.split("=", 1) for line in self.node1.run(infra_up).split())
        self.node1.export(export_nats)
        self.node1.export(export_etcd)
        assert {k: self.node1.env[k] for k in self.urls} == self.urls, "the block exports what `infra up` printed"
        self.node1.start_ray(ray_head)
        self.node1.start_serve(serve)
        await self._join_when_waited_for(self.node1, self.node2)

        *exports, ray_head, serve = (
            c.substituted(self._values(self.node3))
            for c in NODE3_BLOCK.expect(
                "export", "export", "export", "export", "export", "tandem ray head", "tandem serve"
            )
        )
        for command in exports:
            self.node3.export(command)
        self.node3.start_ray(ray_head)
        self.node3.start_serve(serve)
        await self._join_when_waited_for(self.node3, self.node4)

        await self.wait_serving("VllmWorker", "generate", self.node1)
        await self.wait_serving("PrefillWorker", "status", self.node3)
        await wait_healthy(f"{self.base_url}/health", START_TIMEOUT_S, self.assert_running, self.tails)

    async def _join_when_waited_for(self, head: Host, worker: Host) -> None:
        waiting = f"waiting for the Ray cluster at {head.node.ip}:{GCS_PORT}: need 2 {CPU_DEVICE_RESOURCE}, have 1"
        deadline = time.monotonic() + 240
        while waiting not in head.serve_log():
            self.assert_running()
            assert time.monotonic() < deadline, f"the engine on {head.node.name} never said it waits:\n{self.tails()}"
            await asyncio.sleep(0.5)
        export_ip, export_gloo, ray_worker = (
            c.substituted(self._values(worker, ray_head=head))
            for c in RAY_WORKER_BLOCK.expect("export", "export", "tandem ray worker")
        )
        worker.export(export_ip)
        worker.export(export_gloo)
        worker.start_ray(ray_worker)

    async def wait_serving(self, service: str, endpoint: str, host: Host) -> None:
        """Until an instance of `service` records `host`'s address in etcd (its engine is up by then)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        async with await Runtime.connect(self.settings) as runtime:
            watch = await runtime.discovery.watch_instances(service, endpoint)
            try:
                while True:
                    self.assert_running()
                    try:
                        await watch.wait_until(lambda items: any(r.host == host.node.ip for r in items.values()), 2.0)
                        return
                    except TimeoutError:
                        assert time.monotonic() < deadline, f"no {service} on {host.node.name}\n{self.tails()}"
            finally:
                await watch.close()

    @property
    def base_url(self) -> str:
        return f"http://{self.node1.node.ip}:{FRONTEND_PORT}"

    def assert_running(self) -> None:
        for host in self.hosts:
            host.assert_running()

    def tails(self, lines: int = 40) -> str:
        return "\n".join(host.tails(lines) for host in self.hosts)

    def stop(self) -> None:
        # The graphs first (each drains and stops its engine), then the Ray nodes, then NATS and
        # etcd. The two clusters' hosts stop side by side: one after the other took 77 s in CI.
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(Host.stop, [host for host in (self.node3, self.node1) if host.serve is not None]))
            list(pool.map(Host.stop, (self.node4, self.node2)))
        if self._infra_up:
            result = self.node1.node.run(
                ["bash", "-c", "tandem infra down"], env=self.node1.env, cwd=self.node1.workdir, timeout=120
            )
            assert result.returncode == 0, result.stdout + result.stderr

    def engine_rank_nodes(self, head: Host) -> list[str]:
        """The node addresses of the vLLM worker actors alive in `head`'s Ray cluster, as Ray reports them."""
        probe = (
            "import json, sys, ray, ray._private.state as state\n"
            "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
            "ips = {n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes()}\n"
            "actors = state.actors().values()\n"
            "print(json.dumps(sorted(ips[a['Address']['NodeID']] for a in actors\n"
            "    if a['State'] == 'ALIVE' and a['ActorClassName'].endswith('RayWorkerProc'))))\n"
        )
        process = head.in_ray_namespaces(
            [sys.executable, "-c", probe, f"{head.node.ip}:{GCS_PORT}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err.decode(errors="replace")
        return json.loads(out.decode().strip().splitlines()[-1])


# --- fixtures: the reference first (one engine on the two cores), then the four nodes --------


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> dict[str, list[int]]:
    """Each chat's token ids, as the Processor renders them with the model's template."""
    rendered = {
        k: tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for k, c in CHATS.items()
    }
    ids = {k: list(tokenizer(text, add_special_tokens=False).input_ids) for k, text in rendered.items()}
    assert len(ids["long"]) > 2 * MAX_LOCAL_PREFILL
    assert len(ids["short"]) <= MAX_LOCAL_PREFILL
    return ids


@pytest.fixture(scope="module")
def reference(tiny_model: Path, tokenizer, prompt_ids, tmp_path_factory) -> dict[str, str]:
    """Chat -> vLLM's own greedy completion at tensor parallel 1, as a client reads it."""
    keys = list(prompt_ids)
    outputs = vllm_greedy(
        tiny_model, ENGINE_ARGS, [prompt_ids[k] for k in keys], MAX_TOKENS, tmp_path_factory.mktemp("reference")
    )
    return {key: tokenizer.decode(ids, skip_special_tokens=True) for key, ids in zip(keys, outputs, strict=True)}


@pytest.fixture(scope="module")
async def clusters(reference, tiny_model: Path, tmp_path_factory) -> AsyncIterator[DisaggRayClusters]:
    with Fabric(4) as fabric:
        deployment = DisaggRayClusters(fabric, tmp_path_factory.mktemp("disagg-ray"), tiny_model)
        try:
            await deployment.start()
            yield deployment
        finally:
            deployment.stop()


# --- reading what the nodes expose ----------------------------------------------------------


def _counter(host: Host, port: int, name: str, **labels: str) -> float:
    """A counter's value on a worker's /metrics at the node's address (0 before its first event)."""
    with urllib.request.urlopen(f"http://{host.node.ip}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{name}_total" and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def _decode_counters(clusters: DisaggRayClusters) -> Mapping[str, float]:
    node1 = clusters.node1
    return {
        "remote": _counter(node1, DECODE_METRICS_PORT, "tandem_worker_prefill_decisions", decision="remote"),
        "local": _counter(node1, DECODE_METRICS_PORT, "tandem_worker_prefill_decisions", decision="local"),
        "pulled_tokens": _counter(node1, DECODE_METRICS_PORT, "tandem_worker_external_kv_prompt_tokens"),
        "pulled_bytes": _counter(node1, DECODE_METRICS_PORT, "tandem_worker_kv_transfer_bytes"),
        "failed_pulls": _counter(node1, DECODE_METRICS_PORT, "tandem_worker_kv_transfer_failures"),
    }


async def _prefill_workers(clusters: DisaggRayClusters) -> dict[str, str]:
    """PrefillWorker instance id -> the host its etcd record advertises."""
    async with await Runtime.connect(clusters.settings) as runtime:
        watch = await runtime.discovery.watch_instances("PrefillWorker", "status")
        try:
            return {record.instance_id: record.host for record in watch.items.values()}
        finally:
            await watch.close()


async def _stream_chat(clusters: DisaggRayClusters, chat: Chat) -> tuple[str, str | None]:
    """(text, X-Tandem-Prefill-Worker) of a streamed greedy chat completion sent to node 1's port 8000."""
    client = AsyncOpenAI(base_url=f"{clusters.base_url}/v1", api_key="unused", timeout=120, max_retries=0)
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


def _kv_bytes_per_token(model: Path) -> int:
    config = json.loads((model / "config.json").read_text())
    # K and V of every layer, float32 (the config's dtype), all KV heads (both ranks' halves).
    assert CONFIG["Common"]["dtype"] == "float32"
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * 4


# --- the tests ------------------------------------------------------------------------------


def test_nats_and_etcd_run_on_node_1_only_and_the_others_reach_them_there(clusters: DisaggRayClusters) -> None:
    node1 = clusters.node1.node
    assert clusters.urls == {"NATS_SERVER": f"nats://{node1.ip}:4222", "ETCD_ENDPOINTS": f"http://{node1.ip}:2379"}
    probe = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)"
    for host in clusters.hosts[1:]:
        for port in (4222, 2379):
            assert host.node.run([sys.executable, "-c", probe, node1.ip, str(port)]).returncode == 0
            assert host.node.run([sys.executable, "-c", probe, "127.0.0.1", str(port)]).returncode != 0, host


def test_each_engines_ranks_run_on_its_own_clusters_two_nodes(clusters: DisaggRayClusters) -> None:
    decode_nodes = clusters.engine_rank_nodes(clusters.node1)
    prefill_nodes = clusters.engine_rank_nodes(clusters.node3)
    assert decode_nodes == sorted([clusters.node1.node.ip, clusters.node2.node.ip])
    assert prefill_nodes == sorted([clusters.node3.node.ip, clusters.node4.node.ip])


async def test_long_prompt_is_prefilled_on_the_prefill_cluster_and_its_kv_pulled_by_decode(
    clusters: DisaggRayClusters, reference, prompt_ids, tiny_model: Path
) -> None:
    workers = await _prefill_workers(clusters)
    before = _decode_counters(clusters)

    text, prefill_worker = await _stream_chat(clusters, LONG_CHAT)

    after = _decode_counters(clusters)
    assert prefill_worker in workers, f"not prefilled by a PrefillWorker: {prefill_worker!r}"
    assert workers[prefill_worker] == clusters.node3.node.ip
    assert text == reference["long"]
    assert after["remote"] - before["remote"] == 1
    # Pulled, not recomputed after a failed pull (the config's kv_load_failure_policy).
    assert after["failed_pulls"] == before["failed_pulls"]
    # The decode engine took the prompt's KV (every full block) from the connector: both
    # ranks' halves of it, which together are the whole KV of those tokens.
    full_blocks_tokens = (len(prompt_ids["long"]) - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert after["pulled_tokens"] - before["pulled_tokens"] >= full_blocks_tokens
    assert after["pulled_bytes"] - before["pulled_bytes"] >= full_blocks_tokens * _kv_bytes_per_token(tiny_model)


async def test_short_prompt_is_prefilled_by_the_decode_engine(clusters: DisaggRayClusters, reference) -> None:
    before = _decode_counters(clusters)

    text, prefill_worker = await _stream_chat(clusters, SHORT_CHAT)

    after = _decode_counters(clusters)
    assert text == reference["short"]
    assert prefill_worker is None
    assert after["local"] - before["local"] == 1
    assert after["pulled_tokens"] == before["pulled_tokens"]
