"""The appliance as an operator runs it, on this CPU machine (docs/appliance.md).

`docker compose --profile head up` with env files edited the way docs/appliance.md says
(NATS, etcd, Frontend + Processor + Router and a decode worker pinned to core 0, the
small local model in the models volume), a streamed chat completion with the official
`openai` client on port 8000, then a prefill node: the image with env/common.env and
env/prefill.env on the host network (`docker run --network host --env-file ...`, what
`make prefill` runs), its vLLM engine pinned to core 1. A long prompt is then prefilled
by that container: the response names it in X-Tandem-Prefill-Worker and its job counter
rises. Last, the Ray roles: a ray-head and a ray-worker container form one Ray cluster.

The operator's commands are docs/appliance.md's own (its `appliance-cpu` block, read by
tests/docs/blocks.py and run as written, `<head-ip>` and `<ray-head-ip>` being this machine's
127.0.0.1, so every port is the documented default): `make build ENGINE=cpu`, the tiny model
in the models volume, `make head ENGINE=cpu` (compose profile head, through Debian's
docker-compose 1.29: testcontainers' DockerCompose always runs `docker compose`, the v2
plugin, not installable here), its curl, `make prefill ENGINE=cpu NATS_SERVER=...
ETCD_ENDPOINTS=...` as on another node (scripts/docker-node.sh), `make ray-head` and `make
ray-worker RAY_ADDRESS=...`, and `make down ENGINE=cpu` at the end. The test's environment
points them at its own Docker engine and image (DOCKER_HOST, DOCKER, IMAGE), its edited
copy of env/ (TANDEM_ENV_DIR) and its models folder (TANDEM_MODEL_CACHE), the knobs the
Makefile and docs/appliance.md give an operator. Containers that `make` started are then
driven as testcontainers DockerContainers.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx
import openai
import psutil
import pytest
import yaml
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families
from testcontainers.core.container import DockerContainer

from app.runtime import Runtime
from app.settings import RuntimeSettings
from tests.appliance.conftest import BUILD_TIMEOUT_S, REPO_ROOT, cache_dir
from tests.appliance.docker_engine import DockerEngine
from tests.docs.blocks import Command, doc_block
from tests.docs.shell import DocShell, sse_data, user_environment
from tests.e2e.ray_harness import free_ray_port_args
from tests.waiting import wait_for_an_instance

pytestmark = pytest.mark.appliance

BUILD, MAKE_MODEL, MAKE_HEAD, CURL, MAKE_PREFILL, MAKE_RAY_HEAD, MAKE_RAY_WORKER, MAKE_DOWN = doc_block(
    "appliance-cpu"
).expect("make build", "mkdir", "make head", "curl", "make prefill", "make ray-head", "make ray-worker", "make down")
HEAD_CONTAINER = "tandem-head"
# The CPU compose file's default config: the decode engine on core 0 prefills prompts up to
# 64 tokens itself and hands longer ones to PrefillWorkers, whose engines use core 1.
CONFIG = "configs/cpu-tiny-disagg.yaml"
FRONTEND_PORT = 8000  # the config's Frontend port
MODEL = "tiny-llama"
NAMESPACE = "tandem"  # env/common.env's TANDEM_NAMESPACE
NODE_IP = "127.0.0.1"  # both "nodes" are this machine: <head-ip> and <ray-head-ip> of the block
# What the block binds on this machine's network at their defaults: the head's Frontend,
# NATS (and its monitoring), etcd (and its peers), the Ray head's GCS.
FIXED_PORTS = (FRONTEND_PORT, 4222, 8222, 2379, 2380, 6379)
START_TIMEOUT_S = 420
# The prefill node starts while the head's engines hold the cores: its Python imports alone
# took from 1 to 5.5 minutes here, depending on what else the machine ran.
PREFILL_START_TIMEOUT_S = 900
RAY_JOIN_TIMEOUT_S = 300
# Past the config's max-local-prefill-length (64 tokens): prefilled remotely.
LONG_PROMPT = " ".join(f"appliance-{i}" for i in range(80))


@dataclass(frozen=True)
class Deployment:
    env_dir: Path  # the edited copy of env/
    models_dir: Path  # mounted at /models; the block makes tiny-llama there
    nats_server: str
    etcd_endpoints: str

    @property
    def runtime_settings(self) -> RuntimeSettings:
        return RuntimeSettings(
            nats_server=self.nats_server,
            etcd_endpoints=self.etcd_endpoints,
            namespace=NAMESPACE,
            connect_timeout_s=10.0,
        )


def _set(text: str, name: str, value: str) -> str:
    """`name=value` in an env file's text, replacing the line that sets it or appended."""
    line = f"{name}={value}"
    pattern = re.compile(rf"^{re.escape(name)}=.*$", re.MULTILINE)
    return pattern.sub(line, text) if pattern.search(text) else f"{text.rstrip()}\n{line}\n"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    """env/ edited as docs/appliance.md tells an operator, for a one-machine deployment."""
    root = tmp_path_factory.mktemp("appliance")
    env_dir = root / "env"
    shutil.copytree(REPO_ROOT / "env", env_dir)
    nats_server, etcd_endpoints = f"nats://{NODE_IP}:4222", f"http://{NODE_IP}:2379"
    for path in env_dir.glob("*.env"):
        text = path.read_text()
        for placeholder in ("HEAD_NODE_IP", "THIS_NODE_IP", "RAY_HEAD_IP"):
            text = text.replace(placeholder, NODE_IP)
        path.write_text(text)
    common = env_dir / "common.env"
    text = common.read_text()
    for name, value in (("NATS_SERVER", nats_server), ("ETCD_ENDPOINTS", etcd_endpoints), ("CONFIG", CONFIG)):
        text = _set(text, name, value)
    common.write_text(text)
    # Two Ray nodes on one host network: each needs ports of its own for what Ray binds at
    # fixed defaults (the same as tests/e2e/ray_harness.py), and no graph on the Ray head.
    for role in ("ray-head", "ray-worker"):
        path = env_dir / f"{role}.env"
        ports = " ".join(free_ray_port_args())
        head_only = " --include-dashboard=false" if role == "ray-head" else ""
        text = _set(
            path.read_text(), "RAY_START_ARGS", f"--num-cpus=1 --object-store-memory=100000000 {ports}{head_only}"
        )
        text = _set(text, "GRAPH", "") if role == "ray-head" else text
        path.write_text(text)
    return Deployment(env_dir, root / "models", nats_server, etcd_endpoints)


@pytest.fixture(scope="module")
def shell(
    docker_engine: DockerEngine, tandem_image: str, deployment: Deployment, tmp_path_factory: pytest.TempPathFactory
) -> DocShell:
    """The operator's terminal in the repository, for the block's commands."""
    engine = docker_engine.env()
    env = user_environment(
        DOCKER_HOST=engine["DOCKER_HOST"],
        DOCKER=engine["DOCKER"],
        IMAGE=tandem_image,
        TANDEM_DOCKER_CACHE=str(cache_dir()),
        TANDEM_ENV_DIR=str(deployment.env_dir),
        TANDEM_MODEL_CACHE=str(deployment.models_dir),
    )
    placeholders = {"head-ip": NODE_IP, "ray-head-ip": NODE_IP}
    return DocShell(tmp_path_factory.mktemp("appliance-shell"), env=env, placeholders=placeholders)


class NodeStartedByMake(DockerContainer):
    """A node container that the block's `make ROLE ...` starts, as on another machine
    (scripts/docker-node.sh: `docker run -d --network host --env-file ...`); testcontainers
    drives it from then on (logs, state, stop and removal)."""

    def __init__(self, shell: DocShell, command: Command) -> None:
        super().__init__(image="unused: make starts the container")
        self.shell, self.command = shell, command

    def start(self) -> NodeStartedByMake:
        self.shell.run(self.command)
        role = self.command.words[1]
        self._container = self.get_docker_client().client.containers.get(f"tandem-{role}")
        return self


def _logs(client: docker.DockerClient, name: str, lines: int = 80) -> str:
    try:
        return client.containers.get(name).logs(tail=lines).decode(errors="replace")
    except docker.errors.NotFound:
        return f"(no container {name})"


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def head(shell: DocShell, deployment: Deployment, docker_client: docker.DockerClient) -> Iterator[DocShell]:
    """The block up to `make head ENGINE=cpu`, until the model is served; its `make down` at the end."""
    if in_use := [port for port in FIXED_PORTS if not _port_is_free(port)]:
        pytest.fail(f"the block's containers bind these ports, in use on this machine now: {in_use}")
    shell.run(BUILD, timeout=BUILD_TIMEOUT_S)  # the image tandem_image built: from the build cache
    shell.run(MAKE_MODEL)
    # The containers run as the image's user (uid 10001): the model must be readable by it.
    unreadable = [p for p in deployment.models_dir.rglob("*") if not p.stat().st_mode & 0o004]
    assert not unreadable, f"the models folder is not readable by the containers' user: {unreadable}"
    shell.run(MAKE_HEAD)
    try:
        _wait_for_model(docker_client)
        yield shell
    finally:
        # SIGTERM: supervisord drains the Tandem programs, then stops etcd and NATS.
        shell.run(MAKE_DOWN, timeout=900)
        assert not docker_client.containers.list(all=True), "make down left containers behind"
        for volume in docker_client.volumes.list():  # the head's NATS and etcd data: the next run starts empty
            volume.remove(force=True)


def _wait_for_model(client: docker.DockerClient) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        container = client.containers.get(HEAD_CONTAINER)
        if container.status == "exited" or container.attrs["RestartCount"] > 0:
            break  # supervisord gave up, or the container died and restarts
        try:
            models = httpx.get(f"http://127.0.0.1:{FRONTEND_PORT}/v1/models", timeout=5).json()
            if any(model["id"] == MODEL for model in models.get("data", [])):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(2)
    raise AssertionError(f"the head did not serve {MODEL} within {START_TIMEOUT_S}s:\n{_logs(client, HEAD_CONTAINER)}")


async def test_head_streams_a_chat_completion_on_port_8000(head: DocShell) -> None:
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{FRONTEND_PORT}/v1", api_key="unused")
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me about Eldoria."}],
        stream=True,
        max_tokens=16,
        temperature=0,
    )
    pieces, finish = [], None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    await client.close()
    assert sum(1 for piece in pieces if piece) > 1, "expected the reply in several streamed chunks"
    assert "".join(pieces).strip()
    assert finish in ("length", "stop")


def test_the_documents_curl_streams_a_reply(head: DocShell) -> None:
    events = list(sse_data(head.run(CURL)))
    assert events and events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(event) for event in events[:-1]]
    pieces = [chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"]]
    assert "".join(pieces).strip()


async def test_head_container_is_healthy_and_not_root(head: DocShell, docker_client: docker.DockerClient) -> None:
    container = docker_client.containers.get(HEAD_CONTAINER)
    # The image's HEALTHCHECK (every program RUNNING; NATS, etcd and the Frontend answering);
    # compose's interval is 10 s.
    deadline = time.monotonic() + 90
    while container.attrs["State"]["Health"]["Status"] != "healthy" and time.monotonic() < deadline:
        await asyncio.sleep(2)
        container.reload()
    health = container.attrs["State"]["Health"]
    assert health["Status"] == "healthy", health["Log"][-3:]
    uid = container.exec_run(["id", "-u"]).output.decode().strip()
    assert uid not in ("", "0"), f"the head runs as uid {uid!r}"
    programs = container.exec_run(["supervisorctl", "-c", "/tmp/tandem-supervisor/supervisord.conf", "status"])
    names = {line.split()[0] for line in programs.output.decode().splitlines() if line.strip()}
    assert names == {"nats", "etcd", "tandem-graph", "tandem-restarts"}  # the last: the restart backoff


@pytest.fixture(scope="module")
async def prefill_node(
    head: DocShell, deployment: Deployment, docker_client: docker.DockerClient
) -> AsyncIterator[DockerContainer]:
    """A prefill node as docs/appliance.md starts it on another machine, until its PrefillWorker serves."""
    container = NodeStartedByMake(head, MAKE_PREFILL).start()
    try:
        await wait_for_an_instance(
            deployment.runtime_settings,
            "PrefillWorker",
            "status",
            PREFILL_START_TIMEOUT_S,
            logs=lambda: _logs(docker_client, "tandem-prefill"),
        )
        yield container
    finally:
        # docker stop first (SIGTERM: the worker drains); testcontainers' stop removes it.
        container.get_wrapped_container().stop(timeout=60)
        container.stop()


async def _prefill_status(deployment: Deployment) -> dict:
    async with await Runtime.connect(deployment.runtime_settings) as runtime:
        client = runtime.client("PrefillWorker", "status")
        (worker,) = await client.watch()
        return await client.call({}, target=worker, timeout=10)


async def test_long_prompt_is_prefilled_by_the_prefill_container(
    prefill_node: DockerContainer, deployment: Deployment, docker_client: docker.DockerClient
) -> None:
    before = await _prefill_status(deployment)
    pulled_before = await _decode_pulled_kv()
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{FRONTEND_PORT}/v1", api_key="unused", timeout=120)
    started = time.monotonic()
    response = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": LONG_PROMPT}],
        stream=True,
        max_tokens=8,
        temperature=0,
    )
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in response.parse() if chunk.choices])
    took_s = time.monotonic() - started
    await client.close()
    after = await _prefill_status(deployment)
    pulled = {key: value - pulled_before[key] for key, value in (await _decode_pulled_kv()).items()}

    assert text.strip()
    assert response.headers.get("x-tandem-prefill-worker") == before["worker_id"], (
        f"not prefilled by the prefill container {before['worker_id']}:\n{_logs(docker_client, HEAD_CONTAINER, 30)}"
    )
    assert after["worker_id"] == before["worker_id"]
    # One more job done: prefilled, and its answer taken by the decode worker that asked.
    assert after.get("done", 0) == before.get("done", 0) + 1, (
        f"prefill job counts {before} -> {after}:\n{_logs(docker_client, 'tandem-prefill', 40)}"
    )
    # The decode engine pulled the prompt's KV from the other container over NIXL: vLLM
    # counts the prompt's tokens as external when it schedules the pull, NIXL the bytes it
    # moved; and the prefill engine learned that its blocks were read (a transfer that
    # stalls is recomputed once vLLM's 30 s KV lease expires, which private PID and IPC
    # namespaces caused: "... retrieved by 0 remote worker(s) before lease expired").
    prefill_log = _logs(docker_client, "tandem-prefill", 200)
    assert pulled["tokens"] >= 64 and pulled["bytes"] > 0 and "before lease expired" not in prefill_log, (
        f"the decode engine's KV pull: {pulled} (request took {took_s:.1f}s):\n"
        f"{_logs(docker_client, HEAD_CONTAINER, 60)}\n{prefill_log}"
    )
    # Each engine worker keeps to the core its config binds: vLLM's NIXL connector would pin
    # both to the machine's last core, where the decode engine starved while the prefill
    # engine busy-polled for its KV to be pulled (until the KV's lease ran out: the stall
    # above). app/engines/vllm_cpu_nixl.py keeps them apart.
    assert _engine_worker_cores(docker_client, HEAD_CONTAINER) == _configured_cores("VllmWorker")
    assert _engine_worker_cores(docker_client, "tandem-prefill") == _configured_cores("PrefillWorker")


def _engine_worker_cores(client: docker.DockerClient, name: str) -> list[list[int]]:
    """The CPU affinity of each vLLM engine worker process (VLLM::Worker) in a container.

    `docker top` names the processes by their PIDs on the host, where psutil reads them.
    """
    top = client.containers.get(name).top(ps_args="-eo pid,args")
    pids = [int(row[0]) for row in top["Processes"] if row[1].startswith("VLLM::Worker")]
    return [sorted(psutil.Process(pid).cpu_affinity()) for pid in pids]


def _configured_cores(service: str) -> list[list[int]]:
    binds = yaml.safe_load((REPO_ROOT / CONFIG).read_text())[service]["cpu-omp-threads-bind"]
    return [[int(core) for core in binds[0].split(",")]]


async def _decode_pulled_kv() -> dict[str, float]:
    """The head's decode worker: prompt tokens whose KV it pulled from a prefill engine, and bytes moved."""
    port = yaml.safe_load((REPO_ROOT / CONFIG).read_text())["VllmWorker"]["metrics-port"]
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"http://{NODE_IP}:{port}/metrics")).raise_for_status().text
    samples = {
        sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples
    }
    return {
        "tokens": samples["tandem_worker_external_kv_prompt_tokens_total"],
        "bytes": samples["tandem_worker_kv_transfer_bytes_total"],
    }


def _dashboard_metrics() -> set[str]:
    """The Tandem metric names the shipped Grafana dashboard queries."""
    dashboard = json.loads((REPO_ROOT / "compose" / "grafana" / "dashboards" / "tandem-serving.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    return {name for expr in exprs for name in re.findall(r"\btandem_[a-z_]+", expr)}


def _scrape_targets() -> dict[str, list[str]]:
    """compose/prometheus.yml's static targets by job."""
    config = yaml.safe_load((REPO_ROOT / "compose" / "prometheus.yml").read_text())
    return {
        job["job_name"]: [t for group in job["static_configs"] for t in group["targets"]]
        for job in config["scrape_configs"]
    }


async def test_every_metric_on_the_dashboard_is_served(prefill_node: DockerContainer, deployment: Deployment) -> None:
    """The metrics profile's Prometheus scrapes the head at the shipped file's targets and
    each prefill node at its PrefillWorker's metrics-port; every series the dashboard
    queries must be on one of them (after one remote prefill and one error, so that
    labeled counters have samples)."""
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{FRONTEND_PORT}/v1", api_key="unused", timeout=120)
    await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": LONG_PROMPT}], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    await client.close()
    targets = _scrape_targets()
    head_targets = targets["tandem-frontend"] + targets["tandem-router"] + targets["tandem-worker"]
    prefill_target = f"{NODE_IP}:{yaml.safe_load((REPO_ROOT / CONFIG).read_text())['PrefillWorker']['metrics-port']}"
    served: set[str] = set()
    async with httpx.AsyncClient(timeout=10) as http:
        for target in [*head_targets, prefill_target]:
            text = (await http.get(f"http://{target}/metrics")).raise_for_status().text
            served |= {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    missing = _dashboard_metrics() - served
    assert not missing, f"the dashboard queries series nobody serves: {sorted(missing)}"


def _ray_cluster_slots(client: docker.DockerClient, address: str) -> float:
    """The vLLM CPU worker slots that `ray status`, run in the Ray head container, counts."""
    result = client.containers.get("tandem-ray-head").exec_run(["ray", "status", f"--address={address}"])
    found = re.search(r"/([0-9.]+) vllm_cpu_worker", result.output.decode(errors="replace"))
    return float(found.group(1)) if found else 0.0


def test_ray_head_and_worker_containers_form_one_cluster(head: DocShell, docker_client: docker.DockerClient) -> None:
    """`make ray-head` and `make ray-worker RAY_ADDRESS=...` as on two nodes: the head's
    cluster then offers both nodes' vLLM CPU worker slots (one each)."""
    worker_command = MAKE_RAY_WORKER.substituted(head.placeholders)
    ray_address = next(word for word in worker_command.words if word.startswith("RAY_ADDRESS=")).split("=", 1)[1]
    nodes = [NodeStartedByMake(head, MAKE_RAY_HEAD)]
    try:
        nodes[0].start()
        nodes.append(NodeStartedByMake(head, MAKE_RAY_WORKER))
        nodes[1].start()
        deadline = time.monotonic() + RAY_JOIN_TIMEOUT_S
        while (slots := _ray_cluster_slots(docker_client, ray_address)) < 2 and time.monotonic() < deadline:
            time.sleep(3)
        assert slots == 2, (
            f"the Ray cluster offers {slots} vLLM CPU worker slots, not 2:\n"
            f"{_logs(docker_client, 'tandem-ray-head', 30)}\n{_logs(docker_client, 'tandem-ray-worker', 30)}"
        )
    finally:
        for node in reversed(nodes):
            if node._container is not None:
                node.get_wrapped_container().stop(timeout=60)
                node.stop()
