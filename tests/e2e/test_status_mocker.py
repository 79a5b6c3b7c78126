"""`tandem status` end to end, run as an operator runs it: the binary, `--json`, against a
served mocker graph (`graphs.agg_router:Frontend`: 4 mocker VllmWorkers, 2 Routers).

Real NATS and etcd, one graph start-up for the module, stopped by PID at the end. The
workers may prefill remotely: the prefill queue exists, and no PrefillWorker takes its
jobs until the test registers one that pulls nothing, so that jobs wait there for sure.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from app.disagg.tunables import MAX_LOCAL_PREFILL_LENGTH, MAX_PREFILL_QUEUE_SIZE
from app.infra import EtcdServer, NatsServer
from app.launch.ports import free_port
from app.node import node_address
from app.protocol import names
from app.runtime import Runtime
from app.status.model import SCHEMA_VERSION
from testbed.graphs import TANDEM, ServedGraph
from tests.e2e.graph_helpers import Stream, of_service, read_stream, running, status_until, tandem_status

pytestmark = pytest.mark.e2e

WORKERS = 4
ROUTERS = 2
MODEL = "tiny-llama"
LEASE_TTL_S = 3  # a killed worker's records leave within seconds
LONG_TOKENS = 1500  # ~12 s of decode at the mocker's 8 ms a step: the streams outlast the polls
LOCAL_PREFILL_LIMIT = 100  # prompt tokens prefilled locally; longer ones go to the queue


def config(model: Path) -> dict[str, Any]:
    mocker = {"engine": "mocker", "vocab-size": 3000, "eos-token-id": 2}
    return {
        "Common": {"model": str(model), "served-model-name": MODEL, "block-size": 16, "max-model-len": 2048},
        "Frontend": {"served-model-name": MODEL},
        "Processor": {"common-configs": ["model", "max-model-len"]},
        "Router": {
            "policy": "kv",
            "report-interval-s": 0.5,
            "ServiceArgs": {"workers": ROUTERS},
            "common-configs": ["model", "block-size"],
        },
        "VllmWorker": {
            **mocker,
            "remote-prefill": True,
            "conditional-disagg": True,
            "max-local-prefill-length": LOCAL_PREFILL_LIMIT,
            "max-prefill-queue-size": 16,
            # No PrefillWorker answers here: a queued prompt is prefilled locally after this.
            "remote-prefill-timeout-s": 8,
            "load-report-interval-s": 0.5,
            "ServiceArgs": {"workers": WORKERS},
            "common-configs": ["model", "served-model-name", "block-size", "max-model-len"],
        },
    }


@pytest.fixture(scope="module")
async def graph(
    tiny_model: Path, nats_server: NatsServer, etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServedGraph]:
    served = ServedGraph(
        "graphs.agg_router:Frontend",
        config(tiny_model),
        tmp_path_factory.mktemp("status"),
        nats_server.url,
        etcd_server.url,
        lease_ttl_s=LEASE_TTL_S,
    )
    async with served:
        await served.wait_ready(WORKERS, routers=ROUTERS, processors=1, timeout=120)
        yield served


async def test_status_lists_exactly_the_running_processes_with_hosts_and_roles(graph: ServedGraph) -> None:
    status = await tandem_status(graph)
    assert status["version"] == SCHEMA_VERSION and status["namespace"] == graph.settings.namespace

    # The processes as the OS sees them under `tandem serve`, not as etcd says.
    pids = graph.service_pids()
    assert {(i["service"], i["pid"]) for i in status["instances"]} == {
        (service, pid) for service, service_pids in pids.items() for pid in service_pids
    }
    roles = {i["service"]: i["role"] for i in status["instances"]}
    assert roles == {"Frontend": "frontend", "Processor": "processor", "Router": "router", "VllmWorker": "decode"}
    workers = of_service(status, names.VLLM_WORKER)
    assert {w["instance_id"] for w in workers} == set(await graph.instances(names.VLLM_WORKER, names.GENERATE))
    assert sorted(w["replica"] for w in workers) == list(range(WORKERS))
    assert {w["model"] for w in workers} == {MODEL}
    assert all(w["load"] is not None and w["load"]["kv_total_blocks"] > 0 for w in workers), workers

    host = node_address(graph.env["NATS_SERVER"])
    assert {i["host"] for i in status["instances"]} == {host}
    assert status["nodes"] == [
        {
            "host": host,
            "instances": [i["instance_id"] for i in status["instances"]],
            "services": {"Frontend": 1, "Processor": 1, "Router": ROUTERS, "VllmWorker": WORKERS},
        }
    ]
    for instance in status["instances"]:
        # Taken as the service starts, after its interpreter did (imports take seconds).
        created = psutil.Process(instance["pid"]).create_time()
        assert created <= instance["started_at"] < created + 60, instance
        assert 0 < instance["uptime_s"] <= status["time"] - created, instance
        assert not instance["draining"]

    routers = of_service(status, names.ROUTER)
    assert [r["router"]["policy"] for r in routers] == ["kv"] * ROUTERS, routers
    tunables = {t["key"]: t for t in status["tunables"]}
    assert tunables[MAX_LOCAL_PREFILL_LENGTH.key]["live"] is None
    assert tunables[MAX_PREFILL_QUEUE_SIZE.key]["default"] == MAX_PREFILL_QUEUE_SIZE.default
    # The decode workers opened the queue; nothing was queued yet.
    assert status["prefill_queue"]["depth"] == 0 and status["prefill_queue"]["consumers"], status["prefill_queue"]
    assert status["warnings"] == []

    text = await asyncio.to_thread(
        subprocess.run, [TANDEM, "status", "--listen", "1"], env=graph.env, capture_output=True, text=True, timeout=60
    )
    assert text.returncode == 0, text.stderr
    for worker in workers:
        assert worker["instance_id"] in text.stdout


async def test_engine_load_and_router_counters_follow_the_requests(graph: ServedGraph) -> None:
    idle = await status_until(graph, lambda s: running(s) == 0, 30, "idle workers")
    decisions_before = sum(r["router"]["decisions"] for r in of_service(idle, names.ROUTER))
    streams = [Stream() for _ in range(WORKERS * 2)]
    async with httpx.AsyncClient(base_url=graph.base_url, timeout=120) as http:
        # The same short prompt twice first: the second finds the first's blocks cached.
        prompt = " ".join(f"w{i}" for i in range(30))
        for _ in range(2):
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
            assert (await http.post("/v1/completions", json=body)).status_code == 200
        bodies = [
            {"model": MODEL, "prompt": f"stream {n} {uuid.uuid4().hex}", "max_tokens": LONG_TOKENS, "ignore_eos": True}
            for n in range(len(streams))
        ]
        tasks = [asyncio.create_task(read_stream(http, b, s)) for b, s in zip(bodies, streams, strict=True)]
        try:
            await asyncio.wait_for(asyncio.gather(*(s.started.wait() for s in streams)), 60)
            busy = await status_until(graph, lambda s: running(s) >= len(streams), 30, f"{len(streams)} running")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    loads = [w["load"] for w in of_service(busy, names.VLLM_WORKER)]
    assert sum(load["kv_used_blocks"] for load in loads) > sum(
        w["load"]["kv_used_blocks"] for w in of_service(idle, names.VLLM_WORKER)
    )
    assert all(load["kv_usage"] is not None and 0 <= load["kv_usage"] <= 1 for load in loads)
    assert max(load["prefix_cache_hit_rate"] or 0 for load in loads) > 0, loads
    decisions = sum(r["router"]["decisions"] for r in of_service(busy, names.ROUTER))
    assert decisions - decisions_before >= 2 + len(streams)
    # The streams were cancelled: their engine requests are aborted, the load falls back.
    await status_until(graph, lambda s: running(s) == 0, 30, "the load gone")


async def test_the_prefill_queue_depth_rises_while_no_prefill_worker_takes_jobs(graph: ServedGraph) -> None:
    async def answer(_payload: Any, _ctx: Any) -> AsyncGenerator[dict[str, Any], None]:
        yield {"pullers": 0, "done": 0}

    jobs = 3
    long_prompts = [" ".join(f"x{i}-{uuid.uuid4().hex[:6]}" for i in range(150)) for _ in range(jobs)]
    async with (
        await Runtime.connect(graph.settings) as stand_in,
        httpx.AsyncClient(base_url=graph.base_url, timeout=120) as http,
    ):
        # A PrefillWorker that pulls nothing: the decode workers queue their long prompts.
        await stand_in.serve_endpoint(names.PREFILL_WORKER, names.PREFILL_STATUS, answer)
        await status_until(graph, lambda s: len(of_service(s, names.PREFILL_WORKER)) == 1, 30, "the stand-in")
        requests = [
            asyncio.create_task(http.post("/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 2}))
            for p in long_prompts
        ]
        try:
            queued = await status_until(graph, lambda s: s["prefill_queue"]["depth"] >= jobs, 30, f"{jobs} jobs")
        finally:
            await stand_in.close()  # gone: the decode workers prefill what is still waiting locally
            responses = await asyncio.gather(*requests)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    queue = queued["prefill_queue"]
    assert sum(c["num_pending"] for c in queue["consumers"]) >= jobs, queue
    assert queue["messages"] >= jobs
    (prefill,) = of_service(queued, names.PREFILL_WORKER)
    assert prefill["role"] == "prefill" and prefill["prefill"] == {"pullers": 0, "jobs": {"done": 0}}
    assert prefill["pid"] == os.getpid()


async def test_watch_refreshes_with_one_json_document_a_line(graph: ServedGraph) -> None:
    watch = await asyncio.create_subprocess_exec(
        *[TANDEM, "status", "--json", "--watch", "0.5", "--listen", "1"],
        env=graph.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert watch.stdout is not None
        lines = [await asyncio.wait_for(watch.stdout.readline(), 30) for _ in range(2)]
    finally:
        watch.send_signal(signal.SIGINT)  # Ctrl-C: the watch ends, exit status 0
        assert await asyncio.wait_for(watch.wait(), 30) == 0
    first, second = (json.loads(line) for line in lines)
    assert second["time"] > first["time"]
    assert {i["instance_id"] for i in first["instances"]} == {i["instance_id"] for i in second["instances"]}


async def test_a_watch_says_etcd_did_not_answer_and_goes_on_when_it_answers_again(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """An etcd too busy to answer (frozen here, past the 5 s a look waits) costs a watch a
    warning, not its life: it shows the fleet again once etcd answers."""
    etcd = EtcdServer("127.0.0.1", free_port(), free_port(), tmp_path / "etcd")
    etcd.start()
    assert etcd.pid is not None
    stderr_path = tmp_path / "stderr"
    stderr = stderr_path.open("wb")
    namespace = f"t{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "NATS_SERVER": nats_server.url, "ETCD_ENDPOINTS": etcd.url, "TANDEM_NAMESPACE": namespace}
    watch = await asyncio.create_subprocess_exec(
        *[TANDEM, "status", "--json", "--watch", "0.5", "--listen", "0"],
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
    )
    try:
        assert watch.stdout is not None
        before = json.loads(await asyncio.wait_for(watch.stdout.readline(), 30))
        os.kill(etcd.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 30
            while "etcd or NATS did not answer" not in (said := stderr_path.read_text()):
                assert watch.returncode is None and time.monotonic() < deadline, said
                await asyncio.sleep(0.5)
        finally:
            os.kill(etcd.pid, signal.SIGCONT)
        # Documents the watch printed before its look timed out come first; then new ones.
        deadline = time.monotonic() + 30
        while (after := json.loads(await asyncio.wait_for(watch.stdout.readline(), 30)))["time"] < time.time() - 2:
            assert time.monotonic() < deadline
    finally:
        watch.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(watch.wait(), 30)
        etcd.stop()
        stderr.close()
    assert code == 0
    assert after["time"] > before["time"] and after["instances"] == before["instances"] == []


async def test_a_killed_worker_leaves_the_status_within_the_lease_ttl(graph: ServedGraph) -> None:
    status = await tandem_status(graph)
    victim = of_service(status, names.VLLM_WORKER)[0]
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()

    def gone(s: dict[str, Any]) -> bool:
        return victim["instance_id"] not in {i["instance_id"] for i in s["instances"]}

    # A status takes ~2 s (the command starts, then listens); the records go within the TTL.
    after = await status_until(graph, gone, 4 * LEASE_TTL_S + 10, "the killed worker gone")
    assert time.monotonic() - killed_at < 4 * LEASE_TTL_S + 10
    assert victim["pid"] not in {i["pid"] for i in after["instances"]}
