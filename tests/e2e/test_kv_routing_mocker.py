"""KV-aware routing end to end: `tandem serve graphs.agg_router:Frontend` on mocker workers.

Real NATS and etcd, the real graph under supervisord (4 mocker VllmWorkers, and either the
router inside the Frontend, the default, or 2 Router replicas, which the Router section's
`ServiceArgs.workers` asks for), requests through the
official `openai` client. Each graph is stopped by PID when its tests are done. The
operator's `tandem router` and `tandem disagg` commands run as the real binary against
each layout's graph, and leave its live tunables as they found them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.disagg.tunables import MAX_LOCAL_PREFILL_LENGTH, MAX_PREFILL_QUEUE_SIZE
from app.infra import EtcdServer, NatsServer
from app.launch.ports import free_port
from bench.harness.load import WORDS
from testbed.graphs import TANDEM, ServedGraph

pytestmark = pytest.mark.e2e

WORKERS = 4
ROUTERS = 2
MODEL = "tiny-llama"
PREFIX_WORDS = 400  # ~720 tokens: 45 blocks of 16
# A lease this short makes a killed worker's instance leave within seconds.
LEASE_TTL_S = 3

CONFIG = """
Common:
  model: {model}
  served-model-name: {name}
  block-size: 16
  max-model-len: 2048
Frontend:
  served-model-name: {name}
Processor:
  common-configs: [model, max-model-len]
Router:
  policy: kv
  metrics-port: {metrics_port}
  common-configs: [model, block-size]
VllmWorker:
  engine: mocker
  vocab-size: 3000
  eos-token-id: 2
  # Prefill long enough (~150 ms for a 720-token prompt) that concurrent first
  # requests are all still pending when the next one is routed.
  prefill-ms-per-token: 0.2
  ServiceArgs:
    workers: {workers}
  common-configs: [model, served-model-name, block-size, max-model-len]
"""


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def prompt(group: int, request: int) -> str:
    prefix = random.Random(f"prefix-{group}").choices(WORDS, k=PREFIX_WORDS)
    suffix = random.Random(f"suffix-{group}-{request}").choices(WORDS, k=20)
    return " ".join(prefix + suffix)


async def ask(client: openai.AsyncOpenAI, text: str) -> tuple[str, int, int]:
    """(worker id, prompt tokens, cached prompt tokens) of one chat completion."""
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=4, extra_body={"ignore_eos": True}
    )
    completion = raw.parse()
    assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
    return (
        raw.headers["X-Tandem-Worker"],
        completion.usage.prompt_tokens,
        completion.usage.prompt_tokens_details.cached_tokens or 0,
    )


async def tandem(graph: ServedGraph, *args: str) -> subprocess.CompletedProcess[str]:
    """`tandem ARGS` as an operator runs it against the graph: the binary, with the graph's
    NATS_SERVER, ETCD_ENDPOINTS and TANDEM_NAMESPACE."""
    return await asyncio.to_thread(
        subprocess.run, [TANDEM, *args], env=graph.env, capture_output=True, text=True, timeout=60
    )


async def tandem_ok(graph: ServedGraph, *args: str) -> list[str]:
    """The lines `tandem ARGS` printed; it must have succeeded."""
    done = await tandem(graph, *args)
    assert done.returncode == 0, f"tandem {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout.splitlines()


async def logged(graph: ServedGraph, text: str, times: int, timeout: float = 15.0) -> None:
    """Until the graph's log holds `text` `times` times (supervisord relays each process's lines)."""
    deadline = time.monotonic() + timeout
    while (found := graph.log_path.read_text(errors="replace").count(text)) < times:
        assert time.monotonic() < deadline, f"{text!r} logged {found} times, not {times}:\n{graph.log_tail()}"
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def served_graph(
    policy: str,
    tiny_model: Path,
    tmp_path: Path,
    nats: NatsServer,
    etcd: EtcdServer,
    metrics_port: int,
    embed_router: bool = False,
) -> AsyncIterator[ServedGraph]:
    config = tmp_path / "graph.yaml"
    config.write_text(CONFIG.format(model=tiny_model, name=MODEL, workers=WORKERS, metrics_port=metrics_port))
    overrides = [f"--Router.policy={policy}"]
    if not embed_router:
        # Router replicas (2 or more) are what asks for Router processes instead of the default.
        overrides.append(f"--Router.ServiceArgs.workers={ROUTERS}")
    graph = ServedGraph(
        "graphs.agg_router:Frontend", config, tmp_path, nats.url, etcd.url, overrides=overrides, lease_ttl_s=LEASE_TTL_S
    )
    async with graph:
        await graph.wait_ready(WORKERS, routers=0 if embed_router else ROUTERS, processors=1, timeout=90)
        yield graph


def openai_client(graph: ServedGraph) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{graph.base_url}/v1", api_key="unused", timeout=30, max_retries=0)


@pytest.fixture(scope="class")
def router_metrics_port() -> int:
    """Router replica i serves /metrics on this port + i: all of them must be free."""
    port = free_port()
    while not all(_port_free(port + i) for i in range(ROUTERS)):
        port = free_port()
    return port


# Class-scoped: each graph runs only while its class's tests do. The KV-aware tests run
# twice: with the router inside the Frontend (the default), and with 2 Router replicas.
@pytest.fixture(scope="class", params=["router-processes", "router-in-frontend"])
def embed_router(request: pytest.FixtureRequest) -> bool:
    return request.param == "router-in-frontend"


ServePolicy = Callable[..., contextlib.AbstractAsyncContextManager[ServedGraph]]


@pytest.fixture(scope="class")
def serve_policy(
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
    nats_server: NatsServer,
    etcd_server: EtcdServer,
    router_metrics_port: int,
) -> ServePolicy:
    """`async with serve_policy(policy, embed_router) as graph`: the graph with that Router policy."""

    def serve(policy: str, embed_router: bool = False) -> contextlib.AbstractAsyncContextManager[ServedGraph]:
        workdir = tmp_path_factory.mktemp(policy)
        return served_graph(policy, tiny_model, workdir, nats_server, etcd_server, router_metrics_port, embed_router)

    return serve


@pytest.fixture(scope="class")
async def kv_graph(embed_router: bool, serve_policy: ServePolicy) -> AsyncIterator[ServedGraph]:
    async with serve_policy("kv", embed_router) as graph:
        yield graph


@pytest.fixture(scope="class")
async def round_robin_graph(serve_policy: ServePolicy) -> AsyncIterator[ServedGraph]:
    async with serve_policy("round-robin") as graph:
        yield graph


class TestKvRouting:
    @pytest.fixture
    def client(self, kv_graph: ServedGraph) -> openai.AsyncOpenAI:
        return openai_client(kv_graph)

    async def test_a_prefix_group_stays_on_the_worker_that_holds_it_and_groups_spread(
        self, client: openai.AsyncOpenAI
    ) -> None:
        groups = range(4)
        # The groups' first requests all at once: each router accounts for the prefills
        # it (and the other replica) placed, so they can't all pile onto one worker.
        firsts = await asyncio.gather(*(ask(client, prompt(g, 0)) for g in groups))
        home = {g: worker for g, (worker, _, _) in zip(groups, firsts, strict=True)}
        assert len(set(home.values())) > 1, f"every prefix group went to one worker: {home}"
        for g in groups:
            for request in range(1, 4):
                worker, prompt_tokens, cached = await ask(client, prompt(g, request))
                assert worker == home[g], f"group {g} request {request} left its worker"
                # The shared prefix is 95 % of the words: all of it but a partial block was cached.
                assert cached >= 0.8 * prompt_tokens, (g, request, prompt_tokens, cached)

    async def test_the_routing_runs_where_the_config_says(self, kv_graph: ServedGraph, embed_router: bool) -> None:
        routers = await kv_graph.instances("Router", "route")
        if embed_router:
            assert not routers and "Router" not in kv_graph.service_pids()
        else:
            assert len(routers) == ROUTERS and len(kv_graph.service_pids()["Router"]) == ROUTERS

    async def test_the_routers_metrics_show_their_decisions_and_hit_rate(
        self, kv_graph: ServedGraph, embed_router: bool, router_metrics_port: int
    ) -> None:
        # Each Router replica on the metrics port + its index; a Frontend's embedded router
        # there too and on the Frontend's own /metrics.
        urls = [f"http://127.0.0.1:{router_metrics_port + replica}/metrics" for replica in range(ROUTERS)]
        if embed_router:
            urls = [urls[0], f"{kv_graph.base_url}/metrics"]
        decisions, hit_rates = [], []
        async with httpx.AsyncClient(timeout=10) as http:
            for url in urls:
                text = (await http.get(url)).text
                values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
                decisions.append(values["tandem_router_decisions_total"])
                hit_rates.append(values["tandem_router_hit_rate"])
                assert values["tandem_router_decision_seconds_count"] == values["tandem_router_decisions_total"]
        if embed_router:
            assert decisions[0] == decisions[1], "the two views of one embedded router disagree"
            decisions.pop()
        # The test before sent 16 requests, most of them sharing cached prefixes.
        assert sum(decisions) >= 16
        assert max(hit_rates) > 0.5

    async def test_tandem_router_set_show_reset_switch_every_replicas_policy_live(
        self, kv_graph: ServedGraph, client: openai.AsyncOpenAI, embed_router: bool
    ) -> None:
        replicas = 1 if embed_router else ROUTERS
        # Each replica logs the policy it takes from etcd: the test waits for all of them.
        took_round_robin = "live tunable router/policy: LivePolicy(policy='round-robin', knobs={})"
        took_kv_back = "live tunable router/policy: LivePolicy(policy='kv', knobs={}) (as configured)"
        round_robin = 'router/policy={"policy": "round-robin", "knobs": {}}'
        log = kv_graph.log_path.read_text(errors="replace")
        round_robins, kv_backs = log.count(took_round_robin), log.count(took_kv_back)

        assert await tandem_ok(kv_graph, "router", "show") == ["router/policy: as configured (no live value)"]
        same = prompt(20, 0)
        kv_workers = {(await ask(client, same))[0] for _ in range(3)}
        assert len(kv_workers) == 1, f"KV routing spread identical requests: {kv_workers}"
        try:
            assert await tandem_ok(kv_graph, "router", "set", "--policy", "round-robin") == [round_robin]
            await logged(kv_graph, took_round_robin, round_robins + replicas)
            assert await tandem_ok(kv_graph, "router", "show") == [round_robin]
            # Every replica walks the workers in turn: one of them routes at least WORKERS of these.
            workers = [(await ask(client, same))[0] for _ in range(2 * WORKERS)]
            assert set(workers) == set(await kv_graph.instances("VllmWorker", "generate")), workers

            refused = await tandem(kv_graph, "router", "set", "--policy", "fastest")
            assert refused.returncode == 1 and "unknown router policy 'fastest'" in refused.stderr, refused
            assert await tandem_ok(kv_graph, "router", "show") == [round_robin]
        finally:
            reset = await tandem_ok(kv_graph, "router", "reset")
        assert reset == ["router: back to each router replica's configured policy"]
        assert await tandem_ok(kv_graph, "router", "show") == ["router/policy: as configured (no live value)"]
        await logged(kv_graph, took_kv_back, kv_backs + replicas)
        # KV-aware again: a new prefix group stays on the worker its first request went to.
        home, _, _ = await ask(client, prompt(21, 0))
        for request in range(1, 4):
            worker, prompt_tokens, cached = await ask(client, prompt(21, request))
            assert worker == home, f"request {request} left its prefix's worker after the reset"
            assert cached >= 0.8 * prompt_tokens, (request, prompt_tokens, cached)

    async def test_tandem_disagg_show_prints_what_set_stored_and_reset_restores_the_configured(
        self, kv_graph: ServedGraph
    ) -> None:
        assert kv_graph.runtime is not None
        discovery = kv_graph.runtime.discovery
        keys = (MAX_LOCAL_PREFILL_LENGTH.key, MAX_PREFILL_QUEUE_SIZE.key)
        as_configured = [f"{key}: as configured (no live value)" for key in keys]
        stored = [f"{MAX_LOCAL_PREFILL_LENGTH.key}=512", f"{MAX_PREFILL_QUEUE_SIZE.key}=8"]

        assert await tandem_ok(kv_graph, "disagg", "show") == as_configured
        try:
            assert (
                await tandem_ok(
                    kv_graph, "disagg", "set", "--max-local-prefill-length", "512", "--max-prefill-queue-size", "8"
                )
                == stored
            )
            assert await tandem_ok(kv_graph, "disagg", "show") == stored
            assert [await discovery.get_tunable(key) for key in keys] == [512, 8]  # in the graph's namespace

            refused = await tandem(kv_graph, "disagg", "set", "--max-prefill-queue-size", "-1")
            assert refused.returncode == 1 and MAX_PREFILL_QUEUE_SIZE.key in refused.stderr, refused
            assert await tandem_ok(kv_graph, "disagg", "show") == stored
        finally:
            reset = await tandem_ok(kv_graph, "disagg", "reset")
        assert reset == ["disagg: back to each VllmWorker's configured thresholds"]
        assert await tandem_ok(kv_graph, "disagg", "show") == as_configured
        assert [await discovery.get_tunable(key) for key in keys] == [None, None]

    async def test_a_killed_worker_is_no_longer_chosen_and_requests_keep_succeeding(
        self, kv_graph: ServedGraph, client: openai.AsyncOpenAI
    ) -> None:
        victim, _, _ = await ask(client, prompt(10, 0))
        records = await kv_graph.instances("VllmWorker", "generate")
        os.kill(records[victim].pid, signal.SIGKILL)
        deadline = time.monotonic() + 4 * LEASE_TTL_S
        while victim in await kv_graph.instances("VllmWorker", "generate"):
            assert time.monotonic() < deadline, "the killed worker's instance never left"
            await asyncio.sleep(0.2)
        # Its group's prefix now lives nowhere: the router must place it on a live worker.
        answers = [await ask(client, prompt(10, request)) for request in range(1, 4)]
        answers += await asyncio.gather(*(ask(client, prompt(g, 9)) for g in range(8)))
        assert victim not in {worker for worker, _, _ in answers}


class TestRoundRobinRouting:
    @pytest.fixture
    def client(self, round_robin_graph: ServedGraph) -> openai.AsyncOpenAI:
        return openai_client(round_robin_graph)

    async def test_the_same_requests_spread_over_every_worker(
        self, round_robin_graph: ServedGraph, client: openai.AsyncOpenAI
    ) -> None:
        workers = [(await ask(client, prompt(0, request)))[0] for request in range(2 * WORKERS)]
        assert set(workers) == set(await round_robin_graph.instances("VllmWorker", "generate"))
