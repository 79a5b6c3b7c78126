"""Check `kv-events`: each decode worker's KV events reach the router replicas.

The replicas themselves tell (app/router/kv_health.py, in their RouterReports): a worker
whose batches they reject, and one that has run requests for longer than their
`kv-silence-s` without a batch. An idle worker publishes nothing, and that is no fault:
the doctor says how many workers it heard from while it listened, and which of the ones
running requests it did not. A worker rejected for the block size its model record names is
the kv-layout check's finding, not failed twice: this check fails a rejection that check
cannot see (a worker whose events disagree with its own record).
"""

from __future__ import annotations

from app.doctor.check import Check, Fleet, failed, not_applicable, passed

NAME = "kv-events"


def check_kv_feed(fleet: Fleet) -> Check:
    routers = {rid: report for rid, report in fleet.routers.items() if fleet.process(rid) is not None}
    records = {record.instance_id: record for record in fleet.worker_models()}
    workers = sorted(records)
    if not routers:
        return not_applicable(NAME, "no router replica reported: nothing routes by KV events")
    if not workers:
        return not_applicable(NAME, "no VllmWorker registered a model")
    problems = []
    for worker in workers:
        registered = records[worker].metadata.get("block_size")
        rejecting = sorted(
            rid
            for rid, r in routers.items()
            if worker in r.kv_rejected_workers and registered in (None, "", r.block_size)
        )
        silent_to = sorted(rid for rid, r in routers.items() if worker in r.kv_silent_workers)
        if rejecting:
            problems.append(
                f"router(s) {', '.join(rejecting)} reject the KV events of worker {fleet.where(worker)} "
                "(block size mismatch: see the kv-layout check)"
            )
        if silent_to:
            problems.append(
                f"worker {fleet.where(worker)} runs requests, but router(s) {', '.join(silent_to)} got no KV events "
                "from it for longer than their kv-silence-s: is its KV event publisher up? "
                "(prefix caching on: vLLM's enable-prefix-caching, the mocker's too; its log)"
            )
    if problems:
        return failed(NAME, problems)
    heard = [w for w in workers if w in fleet.kv_heard]
    busy_unheard = [w for w in workers if w not in fleet.kv_heard and w in fleet.loads and fleet.loads[w].running > 0]
    note = (
        f"; {', '.join(busy_unheard)} ran requests without a KV event in that time "
        "(the routers warn past their kv-silence-s)"
        if busy_unheard
        else ""
    )
    return passed(
        NAME,
        f"no router replica misses a worker's KV events; {len(heard)} of {len(workers)} worker(s) published some "
        f"in the {fleet.listened_s:g}s listened (an idle worker publishes none){note}",
    )
