"""Check `kv-layout`: every decode worker keys its KV blocks as the router replicas do
(block size, hash scheme), and every router replica is configured for a model some worker
serves (the model whose workers' block size it takes).

A router replica indexes the KV events of every VllmWorker of the namespace; a worker whose
block size differs has its events rejected (its cache is invisible to KV-aware routing,
which then routes as if it cached nothing), one with another hash scheme has them indexed
under keys no prompt looks up. Neither fails a request: only this check says so.
"""

from __future__ import annotations

from collections.abc import Callable

from app.doctor.check import Check, Fleet, failed, not_applicable, passed
from app.protocol import ModelRecord, RouterReport, names

NAME = "kv-layout"


def _worker_value(field: str) -> Callable[[ModelRecord], object]:
    return lambda record: record.metadata.get(field, "")


# What a worker's model record and a router's report must agree on: (what, worker's, router's, how to fix).
_ATTRIBUTES: list[tuple[str, Callable[[ModelRecord], object], Callable[[RouterReport], object], str]] = [
    (
        "block size",
        _worker_value("block_size"),
        lambda report: report.block_size,
        "start it with the routers' block-size (its VllmWorker section, or Common's), "
        "or every VllmWorker and Router with one block-size",
    ),
    (
        "KV hash scheme",
        _worker_value("kv_hash_scheme"),
        lambda report: report.hash_scheme,
        "run one Tandem version on every node (see the versions check)",
    ),
]


def check_kv_layout(fleet: Fleet) -> Check:
    workers = fleet.worker_models()
    routers = {rid: report for rid, report in fleet.routers.items() if fleet.process(rid) is not None}
    unheard = [p.instance_id for p in fleet.of_service(names.ROUTER) if p.instance_id not in routers]
    problems = [
        f"router {fleet.where(rid)} sent no RouterReport within {fleet.listened_s:g}s: is it running? "
        "(`tandem status`, its log)"
        for rid in unheard
    ]
    if not routers and not problems:
        return not_applicable(NAME, "no router replica reported: nothing routes by KV events")
    if not workers:
        return failed(NAME, problems) if problems else not_applicable(NAME, "no VllmWorker registered a model")
    for rid, report in sorted(routers.items()):
        if not report.block_size or not report.hash_scheme:
            problems.append(
                f"router {fleet.where(rid)} does not say its block size and hash scheme (an older Tandem): "
                "run one Tandem version on every node"
            )
    for worker in sorted(workers, key=lambda w: w.instance_id):
        for what, of_worker, of_router, fix in _ATTRIBUTES:
            theirs = _disagreeing(routers, of_router, of_worker(worker))
            for value, router_ids in sorted(theirs.items(), key=lambda item: str(item[0])):
                problems.append(
                    f"worker {fleet.where(worker.instance_id)} has {what} {_shown(of_worker(worker))}, "
                    f"router{'s' * (len(router_ids) > 1)} {', '.join(router_ids)} "
                    f"{'use' if len(router_ids) > 1 else 'uses'} {_shown(value)}: {fix}"
                )
    served = sorted({w.name for w in workers})
    for rid, report in sorted(routers.items()):
        if not any(_routes_model(report, worker) for worker in workers):
            problems.append(
                f"router {fleet.where(rid)} is configured for model {report.model!r}, which no VllmWorker serves "
                f"(they serve {', '.join(map(repr, served))}): give the Router section the model the workers serve"
            )
    if problems:
        return failed(NAME, problems)
    block_sizes = sorted({r.block_size for r in routers.values()})
    return passed(
        NAME,
        f"{len(workers)} worker(s) and {len(routers)} router replica(s) agree: block size "
        f"{', '.join(map(str, block_sizes))}, hash scheme {next(iter(routers.values())).hash_scheme}",
    )


def _routes_model(report: RouterReport, worker: ModelRecord) -> bool:
    """Whether the router is configured for the worker's model: by name, by the path the
    worker loads it from (configs pass Common's `model` to the Router section), or for any."""
    return report.model in ("", worker.name, worker.metadata.get("model_path", ""))


def _disagreeing(
    routers: dict[str, RouterReport], of_router: Callable[[RouterReport], object], worker_value: object
) -> dict[object, list[str]]:
    """The routers whose value differs from the worker's, by their value (routers that say
    none are reported on their own)."""
    by_value: dict[object, list[str]] = {}
    for rid, report in sorted(routers.items()):
        value = of_router(report)
        if value and value != worker_value:
            by_value.setdefault(value, []).append(rid)
    return by_value


def _shown(value: object) -> str:
    return "unknown (an older Tandem)" if value in ("", None, 0) else str(value)
