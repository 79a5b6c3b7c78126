"""Disaggregated serving's failure handling at the queue, on mocker engines: one decode
worker, two PrefillWorkers competing on the JetStream prefill queue.

Mockers make the prefills slow on purpose, so that a PrefillWorker can be killed while it
holds a job: that job must go to the other PrefillWorker (redelivery after the queue's ack
wait), not be lost and not fall back to a local prefill.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from app.protocol import PREFILL_ACK_WAIT_S
from app.runtime import Runtime
from testbed.graphs import ServedGraph
from tests.e2e.graph_helpers import prefill_decision

pytestmark = pytest.mark.e2e

MODEL = "tiny-llama"
PREFILL_WORKERS = 2
MOCKER = {
    "engine": "mocker",
    "vocab-size": 3000,
    "eos-token-id": 2,
    "block-size": 16,
    "max-model-len": 4096,
    # ~2.4 s per ~1600-token prefill: long enough to kill a PrefillWorker mid-job.
    "prefill-ms-per-token": 1.5,
}


def disagg_config(tiny_model: Path) -> dict[str, Any]:
    return {
        "Common": {"model": str(tiny_model), "served-model-name": MODEL},
        "Frontend": {"served-model-name": MODEL},
        "Processor": {"common-configs": ["model"]},
        "Router": {"policy": "kv", "block-size": 16, "common-configs": ["model"]},
        "VllmWorker": {
            **MOCKER,
            "remote-prefill": True,
            "conditional-disagg": True,
            "max-local-prefill-length": 100,
            "max-prefill-queue-size": 16,
            # Longer than the queue's ack wait: a killed PrefillWorker's job is redelivered
            # before the decode worker would give up and prefill locally.
            "remote-prefill-timeout-s": PREFILL_ACK_WAIT_S * 4,
            "common-configs": ["model", "served-model-name"],
        },
        "PrefillWorker": {
            **MOCKER,
            # One job at a time each: four concurrent prompts then need both workers.
            "max-concurrent-jobs": 1,
            "ServiceArgs": {"workers": PREFILL_WORKERS},
            "common-configs": ["model", "served-model-name"],
        },
    }


@pytest.fixture(scope="module")
async def graph(tiny_model: Path, nats_server, etcd_server, tmp_path_factory) -> AsyncIterator[ServedGraph]:
    config = disagg_config(tiny_model)
    served = ServedGraph(
        "graphs.disagg_router:Frontend",
        config,
        tmp_path_factory.mktemp("disagg-mocker"),
        nats_server.url,
        etcd_server.url,
    )
    served.start()
    try:
        await served.wait_ready(workers=1, timeout=120)
        async with await Runtime.connect(served.settings) as runtime:
            await runtime.client("PrefillWorker", "status").wait_for_instances(timeout=60)
            watch = await runtime.discovery.watch_instances("PrefillWorker", "status")
            try:
                await watch.wait_until(lambda items: len(items) >= PREFILL_WORKERS, 60)
            finally:
                await watch.close()
        yield served
    finally:
        served.stop()


def long_prompt() -> str:
    return " ".join(f"word{i}-{uuid.uuid4().hex[:6]}" for i in range(150))  # ~1600 tokens


async def complete(http: httpx.AsyncClient, prompt: str) -> tuple[str, httpx.Response]:
    request_id = uuid.uuid4().hex
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "ignore_eos": True}
    response = await http.post("/v1/completions", json=body, headers={"X-Request-Id": request_id})
    return request_id, response


async def statuses(graph: ServedGraph) -> dict[str, dict[str, Any]]:
    """Each live PrefillWorker's job counters, by instance id."""
    async with await Runtime.connect(graph.settings) as runtime:
        client = runtime.client("PrefillWorker", "status")
        ids = await client.watch()
        return {i: await client.call({}, target=i, timeout=10) for i in ids}


async def test_with_no_prefill_worker_long_prompts_prefill_locally_at_once(
    tiny_model: Path, nats_server, etcd_server, tmp_path_factory
) -> None:
    """A decode node up before its prefill nodes queues nothing nobody would take."""
    config = disagg_config(tiny_model)
    del config["PrefillWorker"]
    served = ServedGraph(
        "graphs.agg_router:Frontend", config, tmp_path_factory.mktemp("decode-only"), nats_server.url, etcd_server.url
    )
    served.start()
    try:
        await served.wait_ready(workers=1, timeout=120)
        async with httpx.AsyncClient(base_url=served.base_url, timeout=120) as http:
            request_id, response = await complete(http, long_prompt())
        assert response.status_code == 200, response.text
        assert "x-tandem-prefill-worker" not in response.headers
        assert prefill_decision(served, request_id) == "local"
        assert f"request {request_id}: prefill local (no PrefillWorker registered)" in served.log_path.read_text()
    finally:
        served.stop()


async def test_both_prefill_workers_take_jobs_and_name_themselves(graph: ServedGraph) -> None:
    async with httpx.AsyncClient(base_url=graph.base_url, timeout=120) as http:
        results = await asyncio.gather(*(complete(http, long_prompt()) for _ in range(4)))
    served_by = set()
    for request_id, response in results:
        assert response.status_code == 200, response.text
        assert prefill_decision(graph, request_id) == "remote"
        served_by.add(response.headers["x-tandem-prefill-worker"])
    counts = await statuses(graph)
    assert served_by <= set(counts)
    assert len(served_by) == PREFILL_WORKERS, "the queue's consumers did not share the jobs"


async def test_a_prefill_worker_killed_mid_job_loses_nothing(graph: ServedGraph) -> None:
    before = await statuses(graph)
    async with httpx.AsyncClient(base_url=graph.base_url, timeout=120) as http:
        requests = [asyncio.create_task(complete(http, long_prompt())) for _ in range(4)]
        await asyncio.sleep(1.0)  # both PrefillWorkers are inside a ~2.4 s prefill now
        assert graph.process is not None  # the graph is up
        victim = next(
            child
            for child in psutil.Process(graph.process.pid).children(recursive=True)
            if any("prefill_worker:PrefillWorker" in part for part in child.cmdline())
        )
        os.killpg(os.getpgid(victim.pid), signal.SIGKILL)
        results = await asyncio.gather(*requests)
    for request_id, response in results:
        assert response.status_code == 200, response.text
        # Redelivered to the surviving PrefillWorker: still remote, never a local fallback.
        assert prefill_decision(graph, request_id) == "remote"
    after = await statuses(graph)
    survivors = set(after) & set(before)
    done = sum(after[w].get("done", 0) - before[w].get("done", 0) for w in survivors)
    # The survivor's own jobs plus the redelivered one(s); supervisord's restarted
    # PrefillWorker may have taken some after it came back.
    restarted = set(after) - set(before)
    done += sum(after[w].get("done", 0) for w in restarted)
    assert done == len(results)
