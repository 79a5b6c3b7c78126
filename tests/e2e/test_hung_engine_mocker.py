"""A hung engine end to end: `tandem serve` on 2 mocker workers under supervisord, real NATS
and etcd; one worker's engine hangs while streams are in flight (the mocker's hang fault:
its scheduler steps no more, the worker process around it goes on, as around a vLLM
engine core that is SIGSTOPped or stuck in a CUDA call).

Before, that worker kept its lease and its place in routing: its streams waited until the
Frontend's request deadline, and later requests were sent to it too. Now its host sees
requests and no engine step for `engine-stall-timeout-s` (app/engines/stall.py), takes the
worker out of routing and ends the process; the streams move to the other worker and end
exactly as their unbroken runs did (the mocker's tokens are a function of the whole
context), and supervisord starts a fresh worker.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from app.infra import EtcdServer, NatsServer
from app.openai import WORKER_HEADER
from testbed.graphs import ServedGraph
from tests.e2e.graph_helpers import Stream, migrations, read_stream

pytestmark = pytest.mark.e2e

WORKERS = 2
STREAMS = 12
MAX_TOKENS = 300
MODEL = "tiny-llama"
STALL_TIMEOUT_S = 3.0
# Beyond the stall timeout: the host's look interval (0.5 s), the mocker's look for its
# fault file (0.1 s), withdrawing the records, and a busy 2-core machine.
LEAVE_MARGIN_S = 4.0

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
  # ~3 s a stream: the hang lands mid-stream.
  decode-base-ms: 10
  engine-stall-timeout-s: {stall}
  fault-hang-file: {hang_dir}/hang-{{worker_id}}
  ServiceArgs:
    workers: {workers}
  common-configs: [model, served-model-name, block-size, max-model-len]
"""


# The disaggregated graph: one decode worker, every prompt (~40 tokens) prefilled remotely.
PREFILL_WORKERS = 2
REMOTE_PREFILL = {
    "remote-prefill": True,
    "conditional-disagg": True,
    "max-local-prefill-length": 8,
    "max-prefill-queue-size": 4 * STREAMS,
}


def _body(index: int) -> dict:
    prompt = f"Request {index}: " + " ".join(f"w{(index * 7 + j) % 101}" for j in range(20))
    return {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True}


def _config(tiny_model: Path, hang_dir: Path, workers: int) -> dict:
    return yaml.safe_load(
        CONFIG.format(model=tiny_model, name=MODEL, workers=workers, stall=STALL_TIMEOUT_S, hang_dir=hang_dir)
    )


@pytest.fixture
async def graph(
    tiny_model: Path, tmp_path: Path, nats_server: NatsServer, etcd_server: EtcdServer
) -> AsyncIterator[ServedGraph]:
    config = _config(tiny_model, tmp_path, WORKERS)
    async with ServedGraph(
        "graphs.agg_router:Frontend", config, tmp_path, nats_server.url, etcd_server.url, lease_ttl_s=10
    ) as served:
        await served.wait_ready(WORKERS, processors=1, timeout=90)
        yield served


@pytest.fixture
async def disagg_graph(
    tiny_model: Path, tmp_path: Path, nats_server: NatsServer, etcd_server: EtcdServer
) -> AsyncIterator[ServedGraph]:
    config = _config(tiny_model, tmp_path, 1)
    prefill = dict(config["VllmWorker"])
    config["VllmWorker"].update(REMOTE_PREFILL)
    config["PrefillWorker"] = {**prefill, "ServiceArgs": {"workers": PREFILL_WORKERS}}
    async with ServedGraph(
        "graphs.disagg_router:Frontend", config, tmp_path, nats_server.url, etcd_server.url, lease_ttl_s=10
    ) as served:
        await served.wait_ready(1, processors=1, prefill_workers=PREFILL_WORKERS, timeout=90)
        yield served


async def _until(what: str, timeout: float, holds: Callable[[], Awaitable[bool]]) -> float:
    """Seconds until `holds()` is true; fails after `timeout`."""
    started = time.monotonic()
    while not await holds():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout:g} s"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def test_a_hung_engine_leaves_routing_its_streams_move_and_it_is_restarted(
    graph: ServedGraph, tmp_path: Path
) -> None:
    async with httpx.AsyncClient(base_url=graph.base_url, timeout=120) as http:
        unbroken = await asyncio.gather(*(http.post("/v1/completions", json=_body(i)) for i in range(STREAMS)))
        references = [response.json()["choices"][0]["text"] for response in unbroken]
        assert len(set(references)) == STREAMS

        streams = [Stream() for _ in range(STREAMS)]
        tasks = [asyncio.create_task(read_stream(http, _body(i), s)) for i, s in enumerate(streams)]
        await asyncio.wait_for(asyncio.gather(*(s.started.wait() for s in streams)), 60)
        by_worker: dict[str, int] = {}
        for s in streams:
            by_worker[s.worker] = by_worker.get(s.worker, 0) + 1
        victim = max(by_worker, key=lambda worker: by_worker[worker])
        records = await graph.instances("VllmWorker")
        victim_pid = records[victim].pid
        sent_before_the_hang = [len(s.text) for s in streams]
        (tmp_path / f"hang-{victim}").touch()

        async def victim_gone() -> bool:
            return victim not in await graph.instances("VllmWorker")

        left_after_s = await _until("the hung worker leaves discovery", STALL_TIMEOUT_S + LEAVE_MARGIN_S, victim_gone)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        migrated = await migrations(http)

        # Later requests: served, and never by the hung worker.
        later = await asyncio.gather(*(http.post("/v1/completions", json=_body(i)) for i in range(STREAMS)))

    # Its own look, not the lease: the process kept its lease alive all along.
    assert left_after_s >= STALL_TIMEOUT_S - 0.5, left_after_s
    on_victim = [i for i, s in enumerate(streams) if s.worker == victim]
    assert 0 < len(on_victim) < STREAMS
    assert all(0 < sent_before_the_hang[i] < len(references[i]) for i in on_victim)
    assert [s.errors for s in streams] == [[] for _ in streams]
    assert [s.text for s in streams] == references  # the hung worker's streams moved and ended as unbroken
    assert migrated == len(on_victim)
    assert [r.status_code for r in later] == [200] * STREAMS
    assert victim not in {r.headers[WORKER_HEADER] for r in later}
    assert [r.json()["choices"][0]["text"] for r in later] == references

    # The process ended non-zero (supervisord says so), and a fresh worker took its place.
    async def restarted() -> bool:
        workers = await graph.instances("VllmWorker")
        return len(workers) == WORKERS and victim not in workers

    await _until("a fresh worker registers", 60, restarted)
    assert not psutil.pid_exists(victim_pid) or psutil.Process(victim_pid).status() == psutil.STATUS_ZOMBIE
    log = graph.log_path.read_text(errors="replace")
    assert re.search(r"exited: VllmWorker_\d \(exit status 1; not expected\)", log), graph.log_tail()
    hung_lines = [line for line in log.splitlines() if "ERROR" in line and "engine mocker hung (" in line]
    assert len(hung_lines) == 1, hung_lines
    assert "no engine step for" in hung_lines[0]


async def test_a_prefill_worker_whose_engine_hangs_leaves_and_is_restarted(
    disagg_graph: ServedGraph, tmp_path: Path
) -> None:
    """Before, a hung PrefillWorker went on pulling jobs it never prefilled: each of them
    waited out its decode worker's `remote-prefill-timeout-s` (30 s) before being prefilled
    locally, for as long as the process lived."""
    graph = disagg_graph
    async with httpx.AsyncClient(base_url=graph.base_url, timeout=120) as http:
        warm_up = await asyncio.gather(*(http.post("/v1/completions", json=_body(i)) for i in range(STREAMS)))
        assert [r.status_code for r in warm_up] == [200] * STREAMS
        assert await graph.prefill_jobs_done() == STREAMS  # every prompt went to a PrefillWorker
        records = await graph.instances("PrefillWorker")
        victim = next(iter(records))
        (tmp_path / f"hang-{victim}").touch()

        async def victim_gone() -> bool:
            return victim not in await graph.instances("PrefillWorker")

        # Its pullers take jobs at once; each waits on the hung engine. New prompts: the decode
        # worker prefills what its prefix cache holds itself.
        answers = asyncio.gather(*(http.post("/v1/completions", json=_body(STREAMS + i)) for i in range(STREAMS)))
        left_after_s = await _until("the hung PrefillWorker leaves", STALL_TIMEOUT_S + LEAVE_MARGIN_S, victim_gone)
        answered = await asyncio.wait_for(answers, 90)

        async def restarted() -> bool:
            workers = await graph.instances("PrefillWorker")
            return len(workers) == PREFILL_WORKERS and victim not in workers

        await _until("a fresh PrefillWorker registers", 60, restarted)

    assert left_after_s >= STALL_TIMEOUT_S - 0.5, left_after_s
    assert [r.status_code for r in answered] == [200] * STREAMS
    assert [r.json()["usage"]["completion_tokens"] for r in answered] == [MAX_TOKENS] * STREAMS
    log = graph.log_path.read_text(errors="replace")
    assert re.search(r"exited: PrefillWorker_\d \(exit status 1; not expected\)", log), graph.log_tail()
    hung_lines = [line for line in log.splitlines() if "ERROR" in line and "engine mocker hung (" in line]
    assert len(hung_lines) == 1 and "PrefillWorker" in hung_lines[0], hung_lines
