"""Two models in one namespace, end to end on mocker workers (issue 16, finding 6).

Two `tandem serve` graphs share NATS, etcd and a namespace, as during a rolling upgrade or
with two models side by side, both from the same tiny model directory: `graphs.agg_router`
serving "model-a" (a KV-aware Router service; a second Frontend of it routes in process,
`embed-router`) and `graphs.agg` serving "model-b" (its pipeline spreads round-robin).
Every VllmWorker of the namespace is on the same topics and in the same instance lists, so
without routing by model a request of one answers from the other's workers with 200.

Each answer's X-Tandem-Worker header is compared with the model records in etcd: every
Frontend's requests reach only workers of its model. A Frontend lists only its model and
answers 404 model_not_found, naming it, to a request for the other. A worker asked for the
other model refuses before any work, with an error its caller re-routes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.errors import WorkerUnavailableError
from app.infra import EtcdServer, NatsServer
from app.openai import WORKER_HEADER
from app.protocol import EngineOutput, PreprocessedRequest, SamplingOptions, StopConditions, names
from testbed.graphs import ServedGraph
from tests.e2e.graph_helpers import mocker_agg_config

pytestmark = pytest.mark.e2e

WORKERS = 2  # of each model
REQUESTS = 8  # per Frontend


@dataclass
class TwoModels:
    kv: ServedGraph  # graphs.agg_router, model-a, the Router service
    embedded: ServedGraph  # a second Frontend of it, with the router in process
    spread: ServedGraph  # graphs.agg, model-b, round-robin

    async def workers_of(self) -> dict[str, set[str]]:
        """Discovery's model records: model name -> the instance ids that registered it."""
        assert self.kv.runtime is not None
        models = await self.kv.runtime.discovery.list_models()
        return {name: {record.instance_id for record in records} for name, records in models.items()}


def _same_namespace(graph: ServedGraph, beside: ServedGraph) -> ServedGraph:
    graph.settings, graph.env["TANDEM_NAMESPACE"] = beside.settings, beside.settings.namespace
    return graph


@pytest.fixture(scope="module")
async def fleet(
    tiny_model: Path, nats_server: NatsServer, etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TwoModels]:
    workdir = tmp_path_factory.mktemp("two-models")
    workers = {"ServiceArgs": {"workers": WORKERS}}
    # A Router process (embed-router: false) for the kv graph, beside the Frontend that
    # routes in process (its override): both pickers must keep to the request's model.
    config_a = {
        **mocker_agg_config(tiny_model, "model-a", frontend={"embed-router": False}, worker=workers),
        "Router": {"policy": "kv"},
    }
    config_b = mocker_agg_config(tiny_model, "model-b", worker=workers)
    urls = (nats_server.url, etcd_server.url)
    kv = ServedGraph("graphs.agg_router:Frontend", config_a, workdir, *urls, name="model-a")
    spread = _same_namespace(ServedGraph("graphs.agg:Frontend", config_b, workdir, *urls, name="model-b"), kv)
    embedded = _same_namespace(
        ServedGraph(
            "graphs.agg_router:Frontend",
            config_a,
            workdir,
            *urls,
            overrides=["--service-name", "Frontend", "--Frontend.embed-router=true"],
            name="model-a-embedded",
        ),
        kv,
    )
    async with kv, spread, embedded:
        await kv.wait_ready(2 * WORKERS, routers=1, processors=2, timeout=180)
        two = TwoModels(kv=kv, embedded=embedded, spread=spread)
        for graph in (spread, embedded):
            await graph.wait_healthy(timeout=120)
        workers_of = await two.workers_of()
        assert {name: len(ids) for name, ids in workers_of.items()} == {"model-a": WORKERS, "model-b": WORKERS}
        yield two


async def _worker_of(http: httpx.AsyncClient, model: str, prompt: str) -> str:
    response = await http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 4})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model
    return response.headers[WORKER_HEADER]


@pytest.mark.parametrize(("frontend", "model"), [("kv", "model-a"), ("embedded", "model-a"), ("spread", "model-b")])
async def test_each_frontends_requests_reach_only_workers_of_its_model(
    fleet: TwoModels, frontend: str, model: str
) -> None:
    graph: ServedGraph = getattr(fleet, frontend)
    async with httpx.AsyncClient(base_url=graph.base_url, timeout=30) as http:
        seen = [await _worker_of(http, model, f"request {i} of {frontend}: tell me a story") for i in range(REQUESTS)]
    workers_of = await fleet.workers_of()
    assert set(seen) <= workers_of[model], f"{frontend} answered {model} from {set(seen) - workers_of[model]}"
    if frontend == "spread":
        # Round-robin over its model's two workers, not over the namespace's four.
        assert set(seen) == workers_of[model] and seen[0::2] == [seen[0]] * (REQUESTS // 2)


async def test_a_frontend_lists_its_model_and_answers_404_for_the_other(fleet: TwoModels) -> None:
    for graph, own, other in ((fleet.kv, "model-a", "model-b"), (fleet.spread, "model-b", "model-a")):
        async with httpx.AsyncClient(base_url=graph.base_url, timeout=30) as http:
            listed = (await http.get("/v1/models")).json()
            assert [card["id"] for card in listed["data"]] == [own]
            response = await http.post("/v1/completions", json={"model": other, "prompt": "hi", "max_tokens": 2})
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert f"`{other}`" in error["message"] and own in error["message"]


async def test_a_worker_refuses_a_request_for_another_model(fleet: TwoModels) -> None:
    assert fleet.kv.runtime is not None
    worker_b = sorted((await fleet.workers_of())["model-b"])[0]
    request = PreprocessedRequest(
        request_id="misrouted",
        model="model-a",
        token_ids=[5, 6, 7],
        sampling=SamplingOptions(temperature=0.0),
        stop=StopConditions(max_tokens=2),
    )
    client = fleet.kv.runtime.client(names.VLLM_WORKER, names.GENERATE)
    outputs: list[Any] = []
    with pytest.raises(WorkerUnavailableError, match=f"{worker_b} serves model `model-b`, not `model-a`"):
        async for output in client.stream(request, target=worker_b, response_type=EngineOutput):
            outputs.append(output)
    assert outputs == []
