"""What `tandem serve` says while its graph starts, from the process records it reads."""

from __future__ import annotations

import os
from pathlib import Path

from app.protocol import ProcessRecord
from app.sdk.config import load_config
from app.sdk.graph import graph_services, resolve
from app.sdk.graph_watch import (
    ExpectedService,
    children_of,
    expected_services,
    is_up,
    registered,
    up_text,
    waiting_text,
)

GRAPH = [
    ExpectedService("Frontend", 1, port=8000),
    ExpectedService("Processor", 1),
    ExpectedService("Router", 1),
    ExpectedService("VllmWorker", 2, routable=True),
]


def record(service: str, replica: int, pid: int = 100, host: str = "10.0.0.1") -> ProcessRecord:
    return ProcessRecord(
        instance_id=f"{service}-{replica}-{pid}", service=service, replica=replica, host=host, pid=pid, started_at=0.0
    )


def test_while_waiting_it_names_what_is_missing_with_counts() -> None:
    counts = registered(GRAPH, [record("Frontend", 0), record("Router", 0), record("VllmWorker", 1)])
    assert not is_up(GRAPH, counts)
    assert waiting_text(GRAPH, counts, 20.4) == "waiting for: Processor 0/1, VllmWorker 1/2 routable (after 20 s)"


def test_nothing_registered_yet() -> None:
    assert waiting_text(GRAPH, registered(GRAPH, []), 10.0) == (
        "waiting for: Frontend 0/1, Processor 0/1, Router 0/1, VllmWorker 0/2 routable (after 10 s)"
    )


def test_a_replica_counts_once_and_other_services_not_at_all() -> None:
    # A restarted worker's successor may register before the lease of the one it replaced
    # expires: the same replica twice is still one of two.
    records = [record("VllmWorker", 0, pid=1), record("VllmWorker", 0, pid=2), record("PrefillWorker", 0)]
    assert registered(GRAPH, records)["VllmWorker"] == 1
    assert "PrefillWorker" not in registered(GRAPH, records)


def test_up_names_every_service_with_its_count() -> None:
    records = [record("Frontend", 0), record("Processor", 0), record("Router", 0)]
    records += [record("VllmWorker", 0), record("VllmWorker", 1)]
    assert is_up(GRAPH, registered(GRAPH, records))
    assert up_text(GRAPH, 14.23) == (
        "graph up: Frontend on :8000, 1 Processor, 1 Router, 2 VllmWorkers routable (after 14.2 s)"
    )
    assert up_text([ExpectedService("Frontend", 2, port=9000)], 1.0) == "graph up: 2 Frontends on :9000 (after 1.0 s)"


def test_only_the_children_of_this_serves_supervisord_on_this_host_count() -> None:
    # This test's process plays the service, its parent the supervisord.
    ours = children_of(os.getppid(), "10.0.0.1")
    assert ours(record("VllmWorker", 0, pid=os.getpid()))
    assert not ours(record("VllmWorker", 0, pid=os.getpid(), host="10.0.0.2"))  # another node's
    assert not ours(record("VllmWorker", 0, pid=os.getppid()))  # another parent's
    assert not ours(record("VllmWorker", 0, pid=2**22 + 1))  # gone (above Linux's pid_max)


def test_expected_services_of_a_served_graph(tmp_path: Path) -> None:
    config_file = tmp_path / "graph.yaml"
    config_file.write_text(
        "Frontend: {port: 8123}\nProcessor: {model: m}\nVllmWorker: {engine: mocker, ServiceArgs: {workers: 2}}\n"
    )
    module, entry = resolve("graphs.agg_router:Frontend")
    services = graph_services(module, entry)
    config = load_config(config_file, ["--Frontend.port=8124"])
    # The Router is embedded in the Frontend, say: `tandem serve` plans no process for it.
    planned = {"Frontend": 1, "Processor": 1, "VllmWorker": 2}
    assert expected_services(services, planned, config) == [
        ExpectedService("Frontend", 1, port=8124),
        ExpectedService("Processor", 1),
        ExpectedService("VllmWorker", 2, routable=True),
    ]
