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
from tests.e2e.prefill_queue import PrefillQueueSpy

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
    assert all(status["pullers"] >= 1 for status in counts.values()), counts


async def test_a_prefill_worker_killed_mid_job_loses_nothing(graph: ServedGraph) -> None:
    before = await statuses(graph)
    assert len(before) == PREFILL_WORKERS, before
    victim_id, survivor_id = sorted(before)
    prompts = [long_prompt() for _ in range(4)]
    async with (
        PrefillQueueSpy(graph.settings) as queue,
        httpx.AsyncClient(base_url=graph.base_url, timeout=120) as http,
    ):
        requests = [asyncio.create_task(complete(http, prompt)) for prompt in prompts]
        # Each PrefillWorker takes one job at a time: with two held, the victim is inside
        # a ~2.4 s prefill of one of them.
        await queue.wait_for(held=PREFILL_WORKERS)
        at_kill = await queue.jobs()
        victim = psutil.Process(before[victim_id]["pid"])
        assert any("prefill_worker:PrefillWorker" in part for part in victim.cmdline())
        os.killpg(os.getpgid(victim.pid), signal.SIGKILL)
        results = await asyncio.gather(*requests)
        await queue.wait_drained()
        await queue.wait_acked(at_kill)
        async with await Runtime.connect(graph.settings) as runtime:
            survivor = await runtime.client("PrefillWorker", "status").call({}, target=survivor_id, timeout=10)
        # The unbroken run of each prompt, once the queue is quiet again: the mocker's text
        # is a function of the prompt alone (app/engines/mocker.py).
        references = await asyncio.gather(*(complete(http, prompt) for prompt in prompts))

    # The victim's job, and only that one, was delivered again: a survivor acks its own
    # jobs within the ack wait, and naks none (its failed and errors counts below stay).
    assert len(queue.redelivered()) == 1, f"not one job redelivered: {queue.acks}"
    ((seq, deliveries),) = queue.redelivered().items()
    assert deliveries == 2 and seq in at_kill
    request_ids = [request_id for request_id, _ in results]
    assert at_kill[seq] in request_ids, "the redelivered job is none of this test's requests"

    prefilled_by: dict[str, int] = {}
    for (request_id, response), (_, reference) in zip(results, references, strict=True):
        assert response.status_code == 200, response.text
        assert reference.status_code == 200, reference.text
        assert response.json()["choices"][0]["text"] == reference.json()["choices"][0]["text"]
        # Redelivered to a live PrefillWorker: still remote, never a local fallback.
        assert prefill_decision(graph, request_id) == "remote"
        worker = response.headers["x-tandem-prefill-worker"]
        prefilled_by[worker] = prefilled_by.get(worker, 0) + 1
    # Each job was answered by the survivor or by the PrefillWorker supervisord started in
    # the victim's place (a new instance id), never by the victim.
    assert set(prefilled_by) - {survivor_id} <= set(prefilled_by) - set(before), prefilled_by
    for outcome in ("failed", "errors"):  # a nak, or a failed ack: redeliveries of the survivor's own
        assert survivor.get(outcome, 0) == before[survivor_id].get(outcome, 0), outcome
    assert survivor.get("done", 0) - before[survivor_id].get("done", 0) == prefilled_by.get(survivor_id, 0)
    assert survivor["pullers"] == before[survivor_id]["pullers"]
