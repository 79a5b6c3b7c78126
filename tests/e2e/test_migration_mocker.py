"""Request migration end to end: `tandem serve` on 4 mocker workers under supervisord, real
NATS and etcd; one worker SIGKILLed while 64 streams are in flight.

The mocker's tokens are a function of the whole context (app/engines/mocker.py), so a
stream continued on another worker must end exactly as the same request's unbroken run
did: any lost, repeated or re-generated token shows in the text. With `migration-limit: 0`
the streams on the killed worker fail instead, which shows the test can fail.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from app.infra import EtcdServer, NatsServer
from app.launch.ports import free_port
from app.runtime import Runtime
from testbed.graphs import ServedGraph
from tests.e2e.graph_helpers import Stream, migrations, read_stream

pytestmark = pytest.mark.e2e

WORKERS = 4
STREAMS = 64
MAX_TOKENS = 300
MODEL = "tiny-llama"
# A killed worker's instance leaves discovery within this; its streams wait that long.
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
  common-configs: [model, block-size]
VllmWorker:
  engine: mocker
  vocab-size: 3000
  eos-token-id: 2
  # ~3 s a stream: the kill lands mid-stream.
  decode-base-ms: 10
  ServiceArgs:
    workers: {workers}
  common-configs: [model, served-model-name, block-size, max-model-len]
"""


def _body(index: int) -> dict:
    # Prompts unlike each other, so that every stream's text is its own.
    prompt = f"Request {index}: " + " ".join(f"w{(index * 7 + j) % 101}" for j in range(20))
    return {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True}


@dataclass(frozen=True)
class Layout:
    migration_limit: int
    # The pipeline in the Processor service (the Frontend calls it over NATS; the Router
    # service routes), whose /metrics count the migrations; else in the Frontend.
    processor_service: bool = False
    # Every prompt prefilled on a PrefillWorker (graphs.disagg_router): the killed worker is
    # a decode worker whose streams' KV came from another process.
    disaggregated: bool = False


LAYOUTS = {
    "migration-on": Layout(3),
    "migration-off": Layout(0),
    "migration-in-the-processor-service": Layout(3, processor_service=True),
    "migration-disaggregated": Layout(3, disaggregated=True),
}
PREFILL_WORKERS = 2
# The disaggregated layout: each prompt (~40 tokens) is longer than the local limit.
REMOTE_PREFILL = {
    "remote-prefill": True,
    "conditional-disagg": True,
    "max-local-prefill-length": 8,
    "max-prefill-queue-size": 2 * STREAMS,
}


@pytest.fixture(params=list(LAYOUTS))
async def graph(
    request: pytest.FixtureRequest, tiny_model: Path, tmp_path: Path, nats_server: NatsServer, etcd_server: EtcdServer
) -> AsyncIterator[tuple[ServedGraph, Layout, str]]:
    """The graph, its layout, and the base URL of the /metrics that count its migrations."""
    layout = LAYOUTS[request.param]
    config = yaml.safe_load(CONFIG.format(model=tiny_model, name=MODEL, workers=WORKERS))
    graph_name = "graphs.agg_router:Frontend"
    if layout.disaggregated:
        graph_name = "graphs.disagg_router:Frontend"
        config["VllmWorker"].update(REMOTE_PREFILL)
        prefill = {k: v for k, v in config["VllmWorker"].items() if k not in REMOTE_PREFILL}
        config["PrefillWorker"] = {**prefill, "ServiceArgs": {"workers": PREFILL_WORKERS}}
    overrides = [f"--Processor.migration-limit={layout.migration_limit}"]
    metrics_port = free_port()
    if layout.processor_service:
        # No embed-router: the default then names Router processes (the routing is in the pipeline).
        overrides += ["--Frontend.embed-processor=false"]
        overrides += [f"--Processor.metrics-port={metrics_port}"]
    async with ServedGraph(
        graph_name,
        config,
        tmp_path,
        nats_server.url,
        etcd_server.url,
        overrides=overrides,
        lease_ttl_s=LEASE_TTL_S,
    ) as served:
        await served.wait_ready(
            WORKERS,
            routers=1 if layout.processor_service else 0,
            processors=1,
            prefill_workers=PREFILL_WORKERS if layout.disaggregated else None,
            timeout=90,
        )
        metrics = f"http://127.0.0.1:{metrics_port}" if layout.processor_service else served.base_url
        yield served, layout, metrics


async def test_streams_of_a_killed_worker_end_as_an_unbroken_run_would(
    graph: tuple[ServedGraph, Layout, str],
) -> None:
    served, layout, metrics_url = graph
    limit = layout.migration_limit
    async with httpx.AsyncClient(base_url=served.base_url, timeout=120) as http:
        unbroken = await asyncio.gather(*(http.post("/v1/completions", json=_body(i)) for i in range(STREAMS)))
        references = [response.json()["choices"][0]["text"] for response in unbroken]
        assert len(set(references)) == STREAMS  # a swapped or repeated continuation would show

        streams = [Stream() for _ in range(STREAMS)]
        tasks = [asyncio.create_task(read_stream(http, _body(i), s)) for i, s in enumerate(streams)]
        await asyncio.wait_for(asyncio.gather(*(s.started.wait() for s in streams)), 60)
        by_worker: dict[str, int] = {}
        for s in streams:
            by_worker[s.worker] = by_worker.get(s.worker, 0) + 1
        victim = max(by_worker, key=lambda worker: by_worker[worker])
        records = await served.instances("VllmWorker", "generate")
        sent_before_the_kill = [len(s.text) for s in streams]
        os.kill(records[victim].pid, signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        async with httpx.AsyncClient(base_url=metrics_url, timeout=10) as metrics:
            migrated = await migrations(metrics)

    on_victim = [i for i, s in enumerate(streams) if s.worker == victim]
    assert 0 < len(on_victim) < STREAMS
    # The kill came mid-stream: none of the victim's streams had finished.
    assert all(0 < sent_before_the_kill[i] < len(references[i]) for i in on_victim)
    others = [i for i in range(STREAMS) if i not in on_victim]
    assert all(streams[i].text == references[i] and not streams[i].errors for i in others)
    if limit:
        assert [streams[i].errors for i in on_victim] == [[] for _ in on_victim]
        assert [streams[i].text for i in on_victim] == [references[i] for i in on_victim]
        assert migrated == len(on_victim)
    else:
        # Without migration each of them ends with the worker's failure, in the stream.
        assert all(streams[i].errors for i in on_victim)
        assert migrated == 0
    if layout.disaggregated:
        # Every prompt of both runs was prefilled on a PrefillWorker (a migrated one again).
        assert await _prefilled_remotely(served) >= 2 * STREAMS


async def _prefilled_remotely(served: ServedGraph) -> int:
    """Jobs done by the PrefillWorkers (their `status` counters)."""
    async with await Runtime.connect(served.settings) as runtime:
        client = runtime.client("PrefillWorker", "status")
        return sum([(await client.call({}, target=i, timeout=10)).get("done", 0) for i in await client.watch()])
