"""`assemble`: a FleetStatus from records and reports, without a fleet."""

from __future__ import annotations

from typing import Any

import pytest

from app.disagg.tunables import MAX_LOCAL_PREFILL_LENGTH, MAX_PREFILL_QUEUE_SIZE
from app.protocol import InstanceRecord, LoadReport, ModelRecord, ProcessRecord, RouterReport
from app.router.tunables import ROUTER_POLICY
from app.status.model import FleetStatus, PrefillQueue, QueueConsumer, assemble

NOW = 10_000.0


def process(
    instance_id: str, service: str, host: str, replica: int = 0, endpoints: tuple[str, ...] = ()
) -> ProcessRecord:
    return ProcessRecord(
        instance_id=instance_id,
        service=service,
        replica=replica,
        host=host,
        pid=100 + len(instance_id),
        started_at=NOW - 90,
        endpoints=list(endpoints),
    )


def record(instance_id: str, service: str, endpoint: str, host: str, **extra: Any) -> InstanceRecord:
    return InstanceRecord(
        namespace="ns",
        service=service,
        endpoint=endpoint,
        instance_id=instance_id,
        subject=f"tandem.ns.{service}.{endpoint}.{instance_id}",
        host=host,
        pid=7,
        **extra,
    )


def load(worker: str, running: int, used: int, hits: int = 0, queries: int = 0) -> LoadReport:
    return LoadReport(
        worker_id=worker,
        running=running,
        waiting=1,
        kv_used_blocks=used,
        kv_total_blocks=200,
        timestamp=NOW - 0.5,
        prefix_cache_hits=hits,
        prefix_cache_queries=queries,
    )


def status(**overrides: Any) -> FleetStatus:
    arguments: dict[str, Any] = {
        "processes": [
            process("f1", "Frontend", "10.0.0.1"),
            process("r1", "Router", "10.0.0.1", endpoints=("route",)),
            process("w1", "VllmWorker", "10.0.0.2", replica=0, endpoints=("generate",)),
            process("w2", "VllmWorker", "10.0.0.2", replica=1, endpoints=("generate",)),
        ],
        "instance_records": [
            record("r1", "Router", "route", "10.0.0.1"),
            record("w1", "VllmWorker", "generate", "10.0.0.2"),
            record("w2", "VllmWorker", "generate", "10.0.0.2", draining=True),
        ],
        "models": [ModelRecord(name="m", instance_id="w1", service="VllmWorker", endpoint="generate")],
        "loads": {"w1": load("w1", 3, 50, hits=30, queries=120), "gone": load("gone", 9, 9)},
        "routers": {
            "r1": RouterReport(
                router_id="r1", policy="kv", decisions=10, prompt_blocks=40, hit_blocks=30, timestamp=NOW
            ),
            "f1": RouterReport(router_id="f1", policy="kv", kv_silent_workers=["w2"], timestamp=NOW - 1),
        },
        "prefill_answers": {},
        "queue": None,
        "tunables": [(MAX_LOCAL_PREFILL_LENGTH, 512), (MAX_PREFILL_QUEUE_SIZE, None), (ROUTER_POLICY, None)],
    }
    return assemble("ns", NOW, **{**arguments, **overrides})


def by_id(fleet: FleetStatus) -> dict[str, Any]:
    return {instance.instance_id: instance for instance in fleet.instances}


def test_each_process_is_listed_once_with_its_role_host_and_uptime() -> None:
    instances = by_id(status())
    assert set(instances) == {"f1", "r1", "w1", "w2"}  # the load report of a gone worker is left out
    assert {i: (x.role, x.host) for i, x in instances.items()} == {
        "f1": ("frontend", "10.0.0.1"),
        "r1": ("router", "10.0.0.1"),
        "w1": ("decode", "10.0.0.2"),
        "w2": ("decode", "10.0.0.2"),
    }
    assert instances["w2"].replica == 1 and instances["w2"].draining and not instances["w1"].draining
    assert instances["w1"].uptime_s == pytest.approx(90)
    assert (instances["w1"].model, instances["w2"].model, instances["r1"].model) == ("m", None, None)


def test_a_frontend_that_reports_as_a_router_replica_has_both_roles() -> None:
    instances = by_id(status())
    assert instances["f1"].roles == ["frontend", "router"]
    assert instances["r1"].roles == ["router"]


def test_loads_and_hit_rates_are_ratios_of_what_was_reported() -> None:
    instances = by_id(status())
    worker = instances["w1"].load
    assert worker is not None
    assert (worker.running, worker.waiting, worker.kv_used_blocks) == (3, 1, 50)
    assert worker.kv_usage == pytest.approx(0.25)
    assert worker.prefix_cache_hit_rate == pytest.approx(0.25)
    assert worker.age_s == pytest.approx(0.5)
    assert instances["w2"].load is None
    router = instances["r1"].router
    assert router is not None and router.hit_rate == pytest.approx(0.75) and router.decisions == 10
    # Nothing routed yet: no rate, rather than a rate of 0.
    assert instances["f1"].router is not None and instances["f1"].router.hit_rate is None


def test_nodes_group_the_processes_by_host() -> None:
    nodes = status().nodes
    assert [(n.host, n.services) for n in nodes] == [
        ("10.0.0.1", {"Frontend": 1, "Router": 1}),
        ("10.0.0.2", {"VllmWorker": 2}),
    ]
    assert sorted(nodes[1].instances) == ["w1", "w2"]


def test_a_process_without_a_process_record_is_listed_from_its_instance_records() -> None:
    old = record("p1", "PrefillWorker", "status", "10.0.0.3", metadata={"replica": 2})
    fleet = status(
        processes=[],
        instance_records=[old],
        models=[],
        loads={},
        routers={},
        prefill_answers={
            # `time`: its clock, for `tandem doctor`; not a job count.
            "p1": {"worker_id": "p1", "pid": 7, "model": "m", "pullers": 2, "time": 9.5, "done": 5, "failed": 1}
        },
    )
    (instance,) = fleet.instances
    assert (instance.service, instance.role, instance.replica, instance.pid) == ("PrefillWorker", "prefill", 2, 7)
    assert instance.started_at is None and instance.uptime_s is None and instance.endpoints == ["status"]
    assert instance.model == "m"
    assert instance.prefill is not None
    assert (instance.prefill.pullers, instance.prefill.jobs) == (2, {"done": 5, "failed": 1})


def test_warnings_name_the_workers_routing_cannot_see_and_the_silent_ones() -> None:
    fleet = status(problems=["prefill worker p9: status unanswered (CallTimeoutError: late)"])
    assert fleet.warnings == [
        "prefill worker p9: status unanswered (CallTimeoutError: late)",
        "router f1: worker w2 serves requests but publishes no KV events",
    ]
    # w2 drains: no load report from it is no news. A serving worker without one is.
    quiet = status(loads={})
    assert "worker w1: no load report heard" in quiet.warnings


def test_tunables_show_the_live_value_or_none_and_the_declared_default() -> None:
    tunables = {t.key: t for t in status().tunables}
    assert (tunables[MAX_LOCAL_PREFILL_LENGTH.key].live, tunables[MAX_LOCAL_PREFILL_LENGTH.key].default) == (512, 1000)
    assert tunables[MAX_PREFILL_QUEUE_SIZE.key].live is None
    assert tunables[ROUTER_POLICY.key].default == {"policy": "kv", "knobs": {}}


def test_the_queue_is_passed_through_and_everything_becomes_builtins() -> None:
    queue = PrefillQueue(
        stream="ns_prefill_queue",
        depth=3,
        messages=3,
        consumers=[QueueConsumer("workers", num_pending=2, num_ack_pending=1, num_waiting=0, num_redelivered=0)],
    )
    data = status(queue=queue).to_builtins()
    assert data["prefill_queue"]["consumers"][0]["num_pending"] == 2
    assert data["version"] == 1 and data["namespace"] == "ns"
    assert isinstance(data["instances"][0], dict)
