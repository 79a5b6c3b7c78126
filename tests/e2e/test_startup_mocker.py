"""Start-up that tells where it is, end to end: `tandem serve` on a mocker graph
(`graphs.agg_router:Frontend`, two mocker VllmWorkers, one Router) says "graph up" once,
naming what it started, and each process logs its start-up phases in order.

Real NATS and etcd, served under supervisord and stopped by PID.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app.infra import EtcdServer, NatsServer
from testbed.graphs import ServedGraph
from tests.e2e.graph_helpers import mocker_agg_config

pytestmark = pytest.mark.e2e

MODEL = "tiny-llama"
WORKERS = 2
# One line of a service process: `... INFO VllmWorker[1] app.sdk.startup: start-up: engine ready after 3.1 s (...)`.
PHASE = re.compile(r" INFO (\w+)\[(\d+)\] app\.sdk\.startup: start-up: (.+?) after ([0-9.]+) s")
WORKER_PHASES = ["connected to NATS and etcd", "engine starting", "engine ready", "registered and routable"]


@pytest.fixture(scope="module")
async def graph(
    tiny_model: Path, nats_server: NatsServer, etcd_server: EtcdServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServedGraph]:
    config = mocker_agg_config(tiny_model, MODEL, worker={"ServiceArgs": {"workers": WORKERS}})
    # A Router process (embed-router: false): the report names every kind of service.
    config["Router"] = {"policy": "kv", "block-size": 16}
    config["Frontend"]["embed-router"] = False
    served = ServedGraph(
        "graphs.agg_router:Frontend", config, tmp_path_factory.mktemp("startup"), nats_server.url, etcd_server.url
    )
    async with served:
        yield served


def graph_up_line(graph: ServedGraph, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in graph.log_path.read_text(errors="replace").splitlines() if "graph up: " in line]
        if lines:
            (line,) = lines  # said once
            return line
        graph.assert_running()
        assert time.monotonic() < deadline, f"no 'graph up' line after {timeout:.0f} s:\n{graph.log_tail()}"
        time.sleep(0.5)


async def test_serve_says_graph_up_once_naming_what_it_started(graph: ServedGraph) -> None:
    line = graph_up_line(graph)
    said = line.split("graph up: ", 1)[1]
    assert said.startswith(
        f"Frontend on :{graph.port}, 1 Processor, 1 Router, {WORKERS} VllmWorkers routable (after "
    ), line
    # Up means routable: the Frontend serves the model already.
    async with httpx.AsyncClient(base_url=graph.base_url, timeout=30) as http:
        assert (await http.get("/health")).status_code == 200
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 3}
        assert (await http.post("/v1/completions", json=body)).status_code == 200


async def test_each_process_logs_its_phases_in_order_with_growing_times(graph: ServedGraph) -> None:
    graph_up_line(graph)
    phases: dict[tuple[str, int], list[tuple[str, float]]] = {}
    for match in PHASE.finditer(graph.log_path.read_text(errors="replace")):
        service, replica, phase, elapsed = match.groups()
        phases.setdefault((service, int(replica)), []).append((phase, float(elapsed)))
    log = graph.log_tail(200)
    for replica in range(WORKERS):
        worker = phases.get(("VllmWorker", replica), [])
        assert [phase for phase, _ in worker] == WORKER_PHASES, log
        times = [elapsed for _, elapsed in worker]
        assert times == sorted(times) and times[0] > 0, worker
    # The other services: connected, then registered (the Frontend serves HTTP only, no endpoints).
    assert [p for p, _ in phases[("Frontend", 0)]] == ["connected to NATS and etcd", "registered"], log
    assert [p for p, _ in phases[("Router", 0)]] == ["connected to NATS and etcd", "registered and routable"], log


async def test_the_watch_leaves_the_stop_and_the_exit_status_as_they_were(graph: ServedGraph) -> None:
    graph_up_line(graph)
    served = graph.process
    assert served is not None
    graph.stop()  # SIGTERM, as an operator's Ctrl-C or the container's stop
    assert served.returncode == 0, graph.log_tail()
    assert "Traceback" not in graph.log_path.read_text(errors="replace"), graph.log_tail()
