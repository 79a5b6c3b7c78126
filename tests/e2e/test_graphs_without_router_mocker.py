"""The router-less graphs and how a graph fails, end to end on mocker workers.

Real NATS and etcd, `tandem serve` under supervisord:
- `graphs.agg` (Frontend -> Processor -> VllmWorker, the R1 configs' graph): the pipeline
  spreads requests over the workers itself, with no Router anywhere;
- `graphs.disagg` (the same plus PrefillWorkers): a long prompt is prefilled remotely;
- a Frontend of `graphs.agg_router` with no Router running answers 503 naming the Router,
  and never spreads requests behind the Router's back;
- an invalid request that only the engine can see (a prompt past the worker's model length,
  under a Processor configured for longer prompts) is a 400 with the engine's own message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from app.infra import EtcdServer, NatsServer
from testbed.graphs import ServedGraph

pytestmark = pytest.mark.e2e

MODEL = "tiny-llama"
WORKER_MAX_MODEL_LEN = 256


def _config(tiny_model: Path, *, prefill_workers: bool = False, processor_max_model_len: int = 2048) -> dict[str, Any]:
    mocker = {"engine": "mocker", "vocab-size": 3000, "eos-token-id": 2, "block-size": 16}
    config: dict[str, Any] = {
        "Common": {"model": str(tiny_model), "served-model-name": MODEL},
        "Frontend": {"served-model-name": MODEL},
        "Processor": {"common-configs": ["model"], "max-model-len": processor_max_model_len},
        "VllmWorker": {
            **mocker,
            "max-model-len": 2048,
            "ServiceArgs": {"workers": 2},
            "common-configs": ["model", "served-model-name"],
        },
    }
    if prefill_workers:
        config["VllmWorker"].update(
            {
                "remote-prefill": True,
                "conditional-disagg": True,
                "max-local-prefill-length": 32,
                "ServiceArgs": {"workers": 1},
            }
        )
        config["PrefillWorker"] = {**mocker, "max-model-len": 2048, "common-configs": ["model", "served-model-name"]}
    return config


async def _complete(graph: ServedGraph, prompt: str, max_tokens: int = 4) -> httpx.Response:
    async with httpx.AsyncClient(base_url=graph.base_url, timeout=30) as http:
        return await http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens})


async def test_graphs_agg_spreads_over_its_workers_with_no_router(
    tiny_model: Path, tmp_path: Path, nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    async with ServedGraph(
        "graphs.agg:Frontend", _config(tiny_model), tmp_path, nats_server.url, etcd_server.url
    ) as graph:
        await graph.wait_ready(2, processors=1, timeout=90)
        assert await graph.instances("Router") == {}
        workers = []
        for i in range(4):
            response = await _complete(graph, f"hello {i}")
            assert response.status_code == 200, response.text
            workers.append(response.headers["x-tandem-worker"])
    assert workers[0::2] == [workers[0]] * 2 and workers[1::2] == [workers[1]] * 2 and workers[0] != workers[1]


async def test_graphs_disagg_prefills_a_long_prompt_remotely(
    tiny_model: Path, tmp_path: Path, nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    config = _config(tiny_model, prefill_workers=True)
    async with ServedGraph("graphs.disagg:Frontend", config, tmp_path, nats_server.url, etcd_server.url) as graph:
        await graph.wait_ready(1, processors=1, prefill_workers=1, timeout=90)
        (prefill_worker,) = await graph.instances("PrefillWorker")
        long = await _complete(graph, " ".join(f"word{i}" for i in range(100)))
        short = await _complete(graph, "hi")
    assert long.status_code == 200, long.text
    assert long.headers["x-tandem-prefill-worker"] == prefill_worker
    assert short.status_code == 200 and "x-tandem-prefill-worker" not in short.headers


async def test_a_graph_whose_router_is_not_running_answers_503_naming_it(
    tiny_model: Path, tmp_path: Path, nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    """The agg_router graph's Frontend and workers, without its Router (`--service-name`); the
    Frontend calls Router processes (`embed-router: false`; by default it would route itself)."""
    config = _config(tiny_model)
    async with ServedGraph(
        "graphs.agg_router:Frontend",
        config,
        tmp_path,
        nats_server.url,
        etcd_server.url,
        overrides=["--service-name", "Frontend", "--Frontend.embed-router=false"],
    ) as frontend:
        workers = ServedGraph(
            "graphs.agg_router:Frontend",
            config,
            tmp_path,
            nats_server.url,
            etcd_server.url,
            overrides=["--service-name", "VllmWorker"],
            name="workers",
        )
        workers.settings, workers.env["TANDEM_NAMESPACE"] = frontend.settings, frontend.settings.namespace
        async with workers:
            await frontend.wait_ready(2, timeout=90)
            response = await _complete(frontend, "hello")
    assert response.status_code == 503, response.text
    assert "Router" in response.json()["error"]["message"]
    assert response.headers["retry-after"]


async def test_an_invalid_request_only_the_engine_sees_is_a_400_with_its_message(
    tiny_model: Path, tmp_path: Path, nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    config = _config(tiny_model, processor_max_model_len=2048)
    config["VllmWorker"]["max-model-len"] = WORKER_MAX_MODEL_LEN
    async with ServedGraph("graphs.agg:Frontend", config, tmp_path, nats_server.url, etcd_server.url) as graph:
        await graph.wait_ready(2, processors=1, timeout=90)
        response = await _complete(graph, " ".join(f"word{i}" for i in range(300)))
        fine = await _complete(graph, "hello")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert f"max_model_len {WORKER_MAX_MODEL_LEN}" in error["message"]  # the mocker's own words
    assert fine.status_code == 200
