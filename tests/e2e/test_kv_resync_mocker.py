"""A Router replica restarted under a prefix workload sees at once what the workers cached
before it started (app/router/kv_resync.py asks each worker's `kv_blocks` for its cache).

`tandem serve graphs.agg_router:Frontend` on 4 mocker VllmWorkers and 2 Router replicas,
real NATS and etcd. Prefix groups are cached on their home workers, one Router replica is
SIGKILLed and supervisord starts a new one. The new replica, asked at once, names each
group's home worker with the overlap the worker's own prefix cache then reports (the oracle:
the `cached_tokens` of a completion of the same prompt), and `tandem status` shows its hit
rate, from the `RouterReport` it publishes, the oracle's. Before the re-sync it
saw none of those blocks: it picked by load alone, and blocks the workers stored after
its start hung off parents it never saw, dropped as orphans, until evicted.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.infra import EtcdServer, NatsServer
from app.protocol import RouteDecision, RouteRequest, names
from bench.harness.load import WORDS
from testbed.graphs import ServedGraph
from tests.e2e.graph_helpers import of_service, status_until

pytestmark = pytest.mark.e2e

WORKERS = 4
ROUTERS = 2
GROUPS = 6
MODEL = "tiny-llama"
BLOCK = 16
LEASE_TTL_S = 3


def config(model: Path) -> dict[str, Any]:
    return {
        "Common": {"model": str(model), "served-model-name": MODEL, "block-size": BLOCK, "max-model-len": 2048},
        "Frontend": {"served-model-name": MODEL},
        "Processor": {"common-configs": ["model", "max-model-len"]},
        "Router": {
            "policy": "kv",
            "report-interval-s": 0.5,
            "ServiceArgs": {"workers": ROUTERS},
            "common-configs": ["model", "block-size"],
        },
        "VllmWorker": {
            "engine": "mocker",
            "vocab-size": 3000,
            "eos-token-id": 2,
            "ServiceArgs": {"workers": WORKERS},
            "common-configs": ["model", "served-model-name", "block-size", "max-model-len"],
        },
    }


def prompt(group: int, request: int) -> str:
    prefix = random.Random(f"prefix-{group}").choices(WORDS, k=300)
    suffix = random.Random(f"suffix-{group}-{request}").choices(WORDS, k=20)
    return " ".join(prefix + suffix)


@pytest.fixture(scope="module")
async def graph(
    tiny_model: Path, nats_server: NatsServer, etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServedGraph]:
    served = ServedGraph(
        "graphs.agg_router:Frontend",
        config(tiny_model),
        tmp_path_factory.mktemp("kv-resync"),
        nats_server.url,
        etcd_server.url,
        lease_ttl_s=LEASE_TTL_S,
    )
    async with served:
        await served.wait_ready(WORKERS, routers=ROUTERS, processors=1, timeout=120)
        yield served


async def complete(http: httpx.AsyncClient, text: str) -> tuple[str, int]:
    """(worker, cached prompt blocks) of one completion: what the worker's cache held of it."""
    answer = await http.post("/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 2})
    assert answer.status_code == 200, answer.text
    cached = answer.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    return answer.headers["X-Tandem-Worker"], cached // BLOCK


async def tokens(http: httpx.AsyncClient, text: str) -> list[int]:
    answer = await http.post("/tokenize", json={"model": MODEL, "prompt": text})
    assert answer.status_code == 200, answer.text
    token_ids: list[int] = answer.json()["tokens"]
    return token_ids


async def test_a_restarted_router_replica_routes_prefixes_cached_before_it_started(graph: ServedGraph) -> None:
    assert graph.runtime is not None
    async with httpx.AsyncClient(base_url=graph.base_url, timeout=30) as http:
        home = {g: (await complete(http, prompt(g, 0)))[0] for g in range(GROUPS)}
        assert len(set(home.values())) > 1, f"every prefix group went to one worker: {home}"
        asked = {g: await tokens(http, prompt(g, 1)) for g in range(GROUPS)}

        before = await graph.instances(names.ROUTER, names.ROUTE)
        victim = sorted(before)[0]
        os.kill(before[victim].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while not (restarted := set(await graph.instances(names.ROUTER, names.ROUTE)) - set(before)):
            assert time.monotonic() - killed_at < 60, f"no new Router replica:\n{graph.log_tail()}"
            await asyncio.sleep(0.1)
        (replica,) = restarted
        up_s = time.monotonic() - killed_at

        # Asked as soon as it serves: it routes by the blocks cached before it started.
        router = graph.runtime.client(names.ROUTER, names.ROUTE)
        decisions = {}
        for g in range(GROUPS):
            request = RouteRequest(request_id=f"resync-{g}", token_ids=asked[g], model=MODEL)
            decisions[g] = await router.call(request, target=replica, response_type=RouteDecision)
        # The oracle: what the home worker's own cache holds of the same prompt.
        oracle = {g: await complete(http, prompt(g, 1)) for g in range(GROUPS)}

    picked = {g: (decision.worker_id, decision.overlap_blocks) for g, decision in decisions.items()}
    assert picked == {g: (home[g], held) for g, (_, held) in oracle.items()}, f"restarted {up_s:.1f}s after its kill"
    assert {g: worker for g, (worker, _) in oracle.items()} == home
    oracle_rate = sum(held for _, held in oracle.values()) / sum(d.prompt_blocks for d in decisions.values())
    assert oracle_rate > 0.8

    def reports_the_oracles_hit_rate(status: dict[str, Any]) -> bool:
        (state,) = [r["router"] for r in of_service(status, names.ROUTER) if r["instance_id"] == replica] or [None]
        # Oracle completions it routed count too: their overlaps are the oracle's as well.
        return state is not None and state["decisions"] >= GROUPS and state["hit_rate"] >= oracle_rate - 0.05

    status = await status_until(
        graph, reports_the_oracles_hit_rate, timeout=10, what="the restarted replica's hit rate"
    )
    # The re-syncs it made are counted (its metrics carry the same counts): one per worker on its start.
    (state,) = [r["router"] for r in of_service(status, names.ROUTER) if r["instance_id"] == replica]
    assert state["kv_resyncs"].get("start") == WORKERS and state["kv_resync_failures"] == {}, state
