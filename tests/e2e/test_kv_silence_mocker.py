"""KV routing that fails loudly, end to end: a worker that serves requests but publishes no
KV events (a mocker with prefix caching off caches, and so publishes, nothing) is warned of
once by the router replica, counted in its metrics, and shown by `tandem status`.

Real NATS and etcd, `graphs.agg_router:Frontend` (one mocker VllmWorker; the router inside
the Frontend, the default layout) served under supervisord and stopped by PID.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.infra import EtcdServer, NatsServer
from app.launch.ports import free_port
from testbed.graphs import ServedGraph
from tests.e2e.graph_helpers import Stream, read_stream, tandem_status

pytestmark = pytest.mark.e2e

MODEL = "tiny-llama"
SILENCE_S = 2


@pytest.fixture(scope="module")
async def graph(
    tiny_model: Path, nats_server: NatsServer, etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[ServedGraph, int]]:
    metrics_port = free_port()
    config = {
        "Common": {"model": str(tiny_model), "served-model-name": MODEL, "block-size": 16, "max-model-len": 2048},
        "Frontend": {"served-model-name": MODEL},
        "Processor": {"common-configs": ["model", "max-model-len"]},
        "Router": {
            "policy": "kv",
            "kv-silence-s": SILENCE_S,
            "report-interval-s": 0.5,
            "metrics-port": metrics_port,
            "common-configs": ["model", "block-size"],
        },
        "VllmWorker": {
            "engine": "mocker",
            "vocab-size": 3000,
            "eos-token-id": 2,
            "enable-prefix-caching": False,
            "load-report-interval-s": 0.5,
            "common-configs": ["model", "served-model-name", "block-size", "max-model-len"],
        },
    }
    served = ServedGraph(
        "graphs.agg_router:Frontend", config, tmp_path_factory.mktemp("kv-silence"), nats_server.url, etcd_server.url
    )
    async with served:
        await served.wait_ready(1, routers=0, processors=1, timeout=120)
        yield served, metrics_port


async def test_a_busy_worker_without_kv_events_is_warned_of_once_counted_and_shown(
    graph: tuple[ServedGraph, int],
) -> None:
    served, metrics_port = graph
    (worker,) = await served.instances("VllmWorker", "generate")
    warning = f"worker {worker} has served requests for"
    body = {"model": MODEL, "prompt": "a long one", "max_tokens": 1500, "ignore_eos": True}
    stream = Stream()
    async with httpx.AsyncClient(base_url=served.base_url, timeout=120) as http:
        task = asyncio.create_task(read_stream(http, body, stream))
        try:
            deadline = time.monotonic() + 30
            while True:
                shown = await tandem_status(served, listen_s=1)
                # The router replica is the Frontend (its embedded one serves metrics-port too).
                (router,) = [i for i in shown["instances"] if i["service"] == "Frontend"]
                if router["router"] and router["router"]["kv_silent_workers"] == [worker]:
                    break
                assert time.monotonic() < deadline, json.dumps(shown, indent=1)
                await asyncio.sleep(0.2)
            # Still busy and still silent: no second warning.
            await asyncio.sleep(1)
            metrics = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert (
        f"router {router['instance_id']}: worker {worker} serves requests but publishes no KV events"
        in (shown["warnings"])
    )
    values = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
    assert values["tandem_router_kv_silent_workers"] == 1
    assert values["tandem_router_kv_silences_total"] == 1
    # supervisord relays the Frontend's lines a moment after it writes them.
    deadline = time.monotonic() + 10
    while (logged := served.log_path.read_text(errors="replace").count(warning)) == 0:
        assert time.monotonic() < deadline, served.log_tail()
        await asyncio.sleep(0.2)
    assert logged == 1
