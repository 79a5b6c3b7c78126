"""NATS and etcd outages under a steady request loop: `tandem serve` on the agg_router
graph (2 mocker workers; the router inside the Frontend, or Router processes where the
Frontend calls the Processor service) with NATS and etcd of its own, restarted or frozen
while clients keep sending streamed requests. No request may fail.

- NATS down 5 s: requests that arrive wait for the connection; streams in flight resume
  (the request plane's calls resume from the reply frame they are due) or move to another
  worker. In both layouts: the Frontend runs the request pipeline and the router replica
  itself (the default), or calls the Processor service over NATS (`embed-processor: false`),
  which calls a Router process.
- etcd down 60 s (stopped, then started on its data): the fleet keeps serving from what
  it knew; every instance record is back within 10 s of etcd's return.
- etcd frozen 60 s (SIGSTOP: unreachable but not restarted, as behind a partition): the
  leases expire when it resumes; every process grants its lease again and rewrites its
  records, and requests that find no instance meanwhile wait for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import etcd3aio
import httpx
import pytest

from app.infra import EtcdServer, NatsServer
from app.launch.ports import free_port
from testbed.graphs import ServedGraph, control_plane
from tests.e2e.graph_helpers import migrations

pytestmark = pytest.mark.e2e

MODEL = "tiny-llama"
CLIENTS = 4
WORKERS = 2
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
  common-configs: [model, block-size]
VllmWorker:
  engine: mocker
  vocab-size: 3000
  eos-token-id: 2
  decode-base-ms: 10
  ServiceArgs:
    workers: {workers}
  common-configs: [model, served-model-name, block-size, max-model-len]
"""


@dataclass
class RequestLoop:
    """CLIENTS clients, each sending one streamed chat request after another until stopped;
    every request that did not end with finish_reason 'length' and no error is a failure."""

    http: httpx.AsyncClient
    done: int = 0
    failures: list[str] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def _one(self, client: int, n: int) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"client {client} request {n}"}],
            "max_tokens": 24,
            "ignore_eos": True,
            "stream": True,
        }
        try:
            async with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    self.failures.append(f"{response.status_code}: {(await response.aread()).decode()[:300]}")
                    return
                finish = None
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[len("data: ") :])
                    if "error" in event:
                        self.failures.append(f"in-stream error: {event['error']}")
                        return
                    for choice in event["choices"]:
                        finish = choice.get("finish_reason") or finish
            if finish != "length":
                self.failures.append(f"stream ended with finish_reason {finish!r}")
                return
            self.done += 1
        except httpx.HTTPError as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self._stopping.set()

    async def client(self, client: int) -> None:
        n = 0
        while not self._stopping.is_set():
            await self._one(client, n)
            n += 1

    async def wait_served(self, more: int, timeout: float = 30) -> None:
        """Until `more` requests beyond those done so far have completed."""
        target = self.done + more
        async with asyncio.timeout(timeout):
            while self.done < target:
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def request_loop(base_url: str) -> AsyncIterator[RequestLoop]:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        loop = RequestLoop(http)
        tasks = [asyncio.create_task(loop.client(i)) for i in range(CLIENTS)]
        try:
            yield loop
        finally:
            loop.stop()
            await asyncio.wait_for(asyncio.gather(*tasks), 90)


@dataclass
class Fleet:
    served: ServedGraph
    nats: NatsServer
    etcd: EtcdServer
    # Where the request pipeline serves /metrics: the Frontend's, or the Processor's port.
    pipeline_metrics_url: str

    def resumes_logged(self, endpoint: str = "") -> int:
        """Lines of callers that say calls (to `endpoint`, e.g. "Processor/": any by default)
        were resumed after the NATS connection dropped: one at least where any was (each
        process throttles them to one in 10 s)."""
        lines = self.served.log_path.read_text(errors="replace").splitlines()
        return sum(1 for line in lines if "resuming from frame" in line and f" of {endpoint}" in line)


@pytest.fixture
async def fleet(request: pytest.FixtureRequest, tiny_model: Path, tmp_path: Path) -> AsyncIterator[Fleet]:
    """The graph on a control plane of its own (the session's NATS and etcd stay up). The
    layout, where a test parametrizes it: "embedded" (the Frontend runs the request
    pipeline) or "processor" (the Frontend calls the Processor service over NATS)."""
    config = tmp_path / "graph.yaml"
    config.write_text(CONFIG.format(model=tiny_model, name=MODEL, workers=WORKERS))
    overrides: list[str] = []
    # The Processor service runs in both layouts (idle where the Frontend runs the pipeline),
    # and the etcd cases count its record: ready means it registered too.
    processors, routers, metrics_port = 1, 0, None
    if getattr(request, "param", "embedded") == "processor":
        metrics_port = free_port()
        overrides = ["--Frontend.embed-processor=false", f"--Processor.metrics-port={metrics_port}"]
        # The routing then happens in the Processor's pipeline: the graph's Router process runs.
        routers = 1
    with control_plane(tmp_path) as (nats, etcd):
        async with ServedGraph(
            "graphs.agg_router:Frontend", config, tmp_path, nats.url, etcd.url, overrides=overrides
        ) as served:
            await served.wait_ready(WORKERS, routers=routers, processors=processors, timeout=120)
            metrics_url = served.base_url if metrics_port is None else f"http://127.0.0.1:{metrics_port}"
            yield Fleet(served, nats, etcd, metrics_url)


async def _records(served: ServedGraph) -> set[tuple[str, str]]:
    """(service, instance id) of every serving instance of the graph's services (the
    default layout has no Router process)."""
    found: set[tuple[str, str]] = set()
    for service in ("VllmWorker", "Processor"):
        found |= {(service, instance) for instance in await served.instances(service)}
    return found


# Only this case runs in both layouts: the etcd ones take a minute each and cross no NATS
# call that the layout changes.
@pytest.mark.parametrize("fleet", ["embedded", "processor"], indirect=True)
async def test_nats_down_5s_fails_no_request(fleet: Fleet) -> None:
    served, nats = fleet.served, fleet.nats
    async with request_loop(served.base_url) as loop:
        await loop.wait_served(20)
        await asyncio.to_thread(nats.stop)
        await asyncio.sleep(5)
        await asyncio.to_thread(nats.start)
        await loop.wait_served(40, timeout=60)
        async with httpx.AsyncClient(base_url=fleet.pipeline_metrics_url, timeout=10) as pipeline:
            moved = await migrations(pipeline)
    assert loop.failures == [], loop.failures[:5]
    # Streams were in flight when the connection dropped: they went on, resumed from the
    # frame they were due or from a new call to a worker.
    assert moved + fleet.resumes_logged() >= 1, served.log_tail()
    if served.base_url != fleet.pipeline_metrics_url:
        # The Frontend's calls to the Processor are what nothing carried across before.
        assert fleet.resumes_logged("Processor/") >= 1, served.log_tail()


@pytest.mark.parametrize("outage", ["stopped", "frozen"])
async def test_etcd_down_60s_fails_no_request_and_every_instance_is_back_within_10s(fleet: Fleet, outage: str) -> None:
    served, etcd = fleet.served, fleet.etcd
    before = await _records(served)
    assert len(before) == WORKERS + 1
    async with request_loop(served.base_url) as loop:
        await loop.wait_served(20)
        if outage == "stopped":
            await asyncio.to_thread(etcd.stop)
            await asyncio.sleep(60)
            await asyncio.to_thread(etcd.start)
        else:
            assert etcd.pid is not None
            os.kill(etcd.pid, signal.SIGSTOP)
            await asyncio.sleep(60)
            os.kill(etcd.pid, signal.SIGCONT)
        back = time.monotonic()
        now: set[tuple[str, str]] | str = "not read"
        while now != before:
            assert time.monotonic() - back < 10, f"after 10 s: {now}, before the outage: {before}"
            try:
                now = await _records(served)
            except etcd3aio.EtcdError as exc:  # this test's own client reconnects too
                now = repr(exc)
            await asyncio.sleep(0.2)
        await loop.wait_served(40, timeout=60)
    assert loop.failures == [], loop.failures[:5]
