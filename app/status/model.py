"""What `tandem status` reports: one `FleetStatus` per namespace, the shape of `--json`.

The JSON is `dataclasses.asdict` of these classes, documented field by field in
docs/operations.md; `SCHEMA_VERSION` changes only when a field changes meaning or goes
(fields are only ever added otherwise). A value nobody published is null, never a guess.
`assemble` builds the status from the raw records and reports, with no I/O, so that the
rules (roles, hit rates, which nodes run what) are tested without a fleet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from app.protocol import InstanceRecord, LoadReport, ModelRecord, ProcessRecord, RouterReport, names
from app.tunables import Tunable

SCHEMA_VERSION = 1

# The role each service plays in the fleet; an unknown service is shown by its own name.
ROLES = {
    names.FRONTEND: "frontend",
    names.PROCESSOR: "processor",
    names.ROUTER: "router",
    names.VLLM_WORKER: "decode",
    names.PREFILL_WORKER: "prefill",
}


@dataclass
class EngineLoad:
    """A worker's latest LoadReport."""

    running: int
    waiting: int
    kv_used_blocks: int
    kv_total_blocks: int
    kv_usage: float | None  # kv_used_blocks / kv_total_blocks
    prefix_cache_hit_rate: float | None  # prompt tokens served from the prefix cache / looked up, since start
    age_s: float  # how long ago the worker sent it


@dataclass
class RouterState:
    """A router replica's latest RouterReport."""

    policy: str
    knobs: dict[str, Any]
    decisions: int
    hit_rate: float | None  # prompt blocks the chosen worker held / prompt blocks routed, since start
    rejected_kv_batches: int
    indexed_blocks: int
    kv_silent_workers: list[str]
    kv_rejected_workers: list[str]
    age_s: float
    # Its KV re-syncs from workers' dumps, and the workers that sent none, by why (start, seq_gap, registered).
    kv_resyncs: dict[str, int] = field(default_factory=dict)
    kv_resync_failures: dict[str, int] = field(default_factory=dict)


@dataclass
class PrefillJobs:
    """A PrefillWorker's answer to its `status` endpoint."""

    pullers: int
    jobs: dict[str, int]  # done, failed, expired, undelivered, errors (what it counted so far)


@dataclass
class Instance:
    """One service process."""

    instance_id: str
    service: str
    role: str
    roles: list[str]  # role first, then what it runs embedded (a Frontend's router replica)
    host: str
    replica: int | None
    pid: int | None
    started_at: float | None
    uptime_s: float | None
    model: str | None
    endpoints: list[str]
    draining: bool
    load: EngineLoad | None = None
    router: RouterState | None = None
    prefill: PrefillJobs | None = None


@dataclass
class QueueConsumer:
    name: str
    num_pending: int
    num_ack_pending: int
    num_waiting: int
    num_redelivered: int


@dataclass
class PrefillQueue:
    stream: str
    depth: int  # jobs not acked yet: waiting for a PrefillWorker or held by one
    messages: int
    consumers: list[QueueConsumer]


@dataclass
class TunableValue:
    key: str
    live: Any  # the value set with `tandem <group> set`; null: each reader's configured one
    default: Any  # what a reader configures when its config says nothing
    doc: str


@dataclass
class Node:
    host: str
    instances: list[str]
    services: dict[str, int]  # service -> processes of it on this host


@dataclass
class FleetStatus:
    namespace: str
    time: float
    instances: list[Instance]
    nodes: list[Node]
    prefill_queue: PrefillQueue | None
    tunables: list[TunableValue]
    warnings: list[str] = field(default_factory=list)
    version: int = SCHEMA_VERSION

    def to_builtins(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def engine_load(report: LoadReport, now: float) -> EngineLoad:
    return EngineLoad(
        running=report.running,
        waiting=report.waiting,
        kv_used_blocks=report.kv_used_blocks,
        kv_total_blocks=report.kv_total_blocks,
        kv_usage=_ratio(report.kv_used_blocks, report.kv_total_blocks),
        prefix_cache_hit_rate=_ratio(report.prefix_cache_hits, report.prefix_cache_queries),
        age_s=max(now - report.timestamp, 0.0),
    )


def router_state(report: RouterReport, now: float) -> RouterState:
    return RouterState(
        policy=report.policy,
        knobs=dict(report.knobs),
        decisions=report.decisions,
        hit_rate=_ratio(report.hit_blocks, report.prompt_blocks),
        rejected_kv_batches=report.rejected_kv_batches,
        indexed_blocks=report.indexed_blocks,
        kv_silent_workers=list(report.kv_silent_workers),
        kv_rejected_workers=list(report.kv_rejected_workers),
        age_s=max(now - report.timestamp, 0.0),
        kv_resyncs=dict(report.kv_resyncs),
        kv_resync_failures=dict(report.kv_resync_failures),
    )


# What a PrefillWorker's `status` answers besides its job counts.
_NOT_JOB_COUNTS = ("worker_id", "pid", "model", "pullers", "time")


def prefill_jobs(answer: Mapping[str, Any]) -> PrefillJobs:
    counts = {key: int(value) for key, value in answer.items() if key not in _NOT_JOB_COUNTS}
    return PrefillJobs(pullers=int(answer.get("pullers", 0)), jobs=counts)


def _instance(
    instance_id: str,
    process: ProcessRecord | None,
    records: list[InstanceRecord],
    now: float,
) -> Instance:
    """From its process record; from its instance records where the process wrote none
    (a process of a Tandem that did not yet write process records)."""
    replica: Any
    if process is not None:
        service, host, pid, replica = process.service, process.host, process.pid, process.replica
        endpoints, started_at = list(process.endpoints), process.started_at
    else:
        first = records[0]
        service, host, pid, started_at = first.service, first.host, first.pid, None
        replica = first.metadata.get("replica")  # the runner puts it there
        endpoints = sorted(record.endpoint for record in records)
    role = ROLES.get(service, service)
    return Instance(
        instance_id=instance_id,
        service=service,
        role=role,
        roles=[role],
        host=host,
        replica=replica if isinstance(replica, int) else None,
        pid=pid,
        started_at=started_at,
        uptime_s=max(now - started_at, 0.0) if started_at else None,
        model=None,
        endpoints=endpoints,
        draining=any(record.draining for record in records),
    )


def assemble(
    namespace: str,
    now: float,
    *,
    processes: Iterable[ProcessRecord],
    instance_records: Iterable[InstanceRecord],
    models: Iterable[ModelRecord],
    loads: Mapping[str, LoadReport],
    routers: Mapping[str, RouterReport],
    prefill_answers: Mapping[str, Mapping[str, Any]],
    queue: PrefillQueue | None,
    tunables: Iterable[tuple[Tunable[Any], Any]],
    problems: Iterable[str] = (),
) -> FleetStatus:
    """The status of the processes etcd holds records of; reports of processes it holds
    none of (gone since they were sent) are left out."""
    by_process = {record.instance_id: record for record in processes}
    by_instance: dict[str, list[InstanceRecord]] = {}
    for record in instance_records:
        by_instance.setdefault(record.instance_id, []).append(record)
    model_of = {record.instance_id: record.name for record in models}
    instances = []
    for instance_id in sorted(by_process.keys() | by_instance.keys()):
        instance = _instance(instance_id, by_process.get(instance_id), by_instance.get(instance_id, []), now)
        instance.model = model_of.get(instance_id)
        if instance_id in loads:
            instance.load = engine_load(loads[instance_id], now)
        if instance_id in routers:
            instance.router = router_state(routers[instance_id], now)
            if "router" not in instance.roles:
                instance.roles.append("router")
        answer = prefill_answers.get(instance_id)
        if answer is not None:
            instance.prefill = prefill_jobs(answer)
            instance.model = instance.model or answer.get("model") or None
        instances.append(instance)
    instances.sort(key=lambda i: (i.host, i.service, i.replica if i.replica is not None else -1, i.instance_id))
    return FleetStatus(
        namespace=namespace,
        time=now,
        instances=instances,
        nodes=_nodes(instances),
        prefill_queue=queue,
        tunables=[TunableValue(key=t.key, live=live, default=_builtins(t.default), doc=t.doc) for t, live in tunables],
        warnings=[*problems, *_warnings(instances)],
    )


def _builtins(value: Any) -> Any:
    # A tunable's default may be a msgspec struct (the router's LivePolicy).
    return msgspec.to_builtins(value)


def _nodes(instances: list[Instance]) -> list[Node]:
    nodes: dict[str, Node] = {}
    for instance in instances:
        node = nodes.setdefault(instance.host, Node(host=instance.host, instances=[], services={}))
        node.instances.append(instance.instance_id)
        node.services[instance.service] = node.services.get(instance.service, 0) + 1
    return [nodes[host] for host in sorted(nodes)]


def _warnings(instances: list[Instance]) -> list[str]:
    """What an operator must look at: KV routing blind to a worker, a worker's load unknown."""
    warnings = []
    for instance in instances:
        router = instance.router
        if router is not None:
            for worker in router.kv_silent_workers:
                warnings.append(
                    f"router {instance.instance_id}: worker {worker} serves requests but publishes no KV events"
                )
            for worker in router.kv_rejected_workers:
                warnings.append(
                    f"router {instance.instance_id}: KV events of worker {worker} rejected (block size mismatch)"
                )
        if instance.service == names.VLLM_WORKER and instance.load is None and not instance.draining:
            warnings.append(f"worker {instance.instance_id}: no load report heard")
    return warnings
