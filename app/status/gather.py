"""Gathering a namespace's `FleetStatus` from what the fleet publishes anyway.

Nothing here adds work to serving: the process, instance and model records and the live
tunables are read from etcd; engine load and router state are the `load` and `router`
reports the workers and router replicas publish on their own schedule (heard from the
moment `FleetObserver.start` subscribes); the prefill queue is JetStream's stream and
consumer info; each PrefillWorker answers its `status` endpoint (a dict of counters).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from app.protocol import LoadReport, RouterReport, names
from app.runtime import EventSubscription, QueueState, Runtime
from app.status.model import FleetStatus, PrefillQueue, QueueConsumer, assemble
from app.tunables import Tunable

log = logging.getLogger(__name__)

# Services whose processes publish reports of their own: VllmWorkers their load each
# `load-report-interval-s`, router replicas (Router processes; Frontends that route in process, the default) theirs
# each `report-interval-s`.
_REPORTING = {names.VLLM_WORKER: "load", names.ROUTER: "router", names.FRONTEND: "router"}


class FleetObserver:
    """`start()`, then `snapshot()` as often as wanted (each one reads etcd and JetStream
    again; reports are the latest heard of each process), then `close()`."""

    def __init__(self, runtime: Runtime, tunables: Sequence[Tunable[Any]], call_timeout_s: float = 2.0) -> None:
        self._runtime = runtime
        self._tunables = tunables
        self._call_timeout_s = call_timeout_s
        self.loads: dict[str, LoadReport] = {}
        self.routers: dict[str, RouterReport] = {}
        self._subscriptions: list[EventSubscription[Any]] = []

    async def start(self) -> None:
        self._subscriptions = [
            await self._runtime.subscribe(names.LOAD_TOPIC, LoadReport, on_event=self._on_load),
            await self._runtime.subscribe(names.ROUTER_REPORT_TOPIC, RouterReport, on_event=self._on_router),
        ]

    async def close(self) -> None:
        for subscription in self._subscriptions:
            await subscription.close()

    def _on_load(self, report: LoadReport) -> None:
        self.loads[report.worker_id] = report

    def _on_router(self, report: RouterReport) -> None:
        self.routers[report.router_id] = report

    async def wait_for_reports(self, timeout: float) -> None:
        """Until every worker and router process etcd lists has reported, or `timeout`:
        a Frontend that embeds no router never reports, so a graph with one waits it out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            processes = await self._runtime.discovery.list_processes()
            heard: dict[str, dict[str, Any]] = {"load": self.loads, "router": self.routers}
            if all(p.instance_id in heard[_REPORTING[p.service]] for p in processes if p.service in _REPORTING):
                return
            await asyncio.sleep(min(0.1, max(deadline - time.monotonic(), 0)))

    async def snapshot(self) -> FleetStatus:
        discovery = self._runtime.discovery
        processes, instance_records, models, queue = await asyncio.gather(
            discovery.list_processes(),
            discovery.list_instances(),
            discovery.list_models(),
            self._runtime.queue_state(names.PREFILL_QUEUE),
        )
        live_values = [await discovery.get_tunable(tunable.key) for tunable in self._tunables]
        prefill_ids = sorted(
            {r.instance_id for r in instance_records if r.service == names.PREFILL_WORKER}
            | {p.instance_id for p in processes if p.service == names.PREFILL_WORKER}
        )
        answers, problems = await self._prefill_answers(prefill_ids)
        return assemble(
            self._runtime.namespace,
            time.time(),
            processes=processes,
            instance_records=instance_records,
            models=[record for records in models.values() for record in records],
            loads=self.loads,
            routers=self.routers,
            prefill_answers=answers,
            queue=_prefill_queue(queue),
            tunables=[(t, msgspec.to_builtins(v)) for t, v in zip(self._tunables, live_values, strict=True)],
            problems=problems,
        )

    async def _prefill_answers(self, instance_ids: list[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
        if not instance_ids:
            return {}, []
        client = self._runtime.client(names.PREFILL_WORKER, names.PREFILL_STATUS)
        await client.watch()

        async def ask(instance_id: str) -> Any:
            return await client.call({}, target=instance_id, timeout=self._call_timeout_s)

        results = await asyncio.gather(*(ask(i) for i in instance_ids), return_exceptions=True)
        answers, problems = {}, []
        for instance_id, result in zip(instance_ids, results, strict=True):
            if isinstance(result, BaseException):
                problems.append(f"prefill worker {instance_id}: status unanswered ({type(result).__name__}: {result})")
            elif isinstance(result, dict):
                answers[instance_id] = result
        return answers, problems


def _prefill_queue(state: QueueState | None) -> PrefillQueue | None:
    if state is None:
        return None
    consumers = [
        QueueConsumer(
            name=c.name,
            num_pending=c.num_pending,
            num_ack_pending=c.num_ack_pending,
            num_waiting=c.num_waiting,
            num_redelivered=c.num_redelivered,
        )
        for c in state.consumers
    ]
    return PrefillQueue(
        stream=state.stream,
        depth=sum(c.num_pending + c.num_ack_pending for c in consumers),
        messages=state.messages,
        consumers=consumers,
    )


async def fleet_status(runtime: Runtime, tunables: Sequence[Tunable[Any]], listen_s: float) -> FleetStatus:
    """One status: listen for reports up to `listen_s` (less once every reporter spoke), then read."""
    observer = FleetObserver(runtime, tunables)
    await observer.start()
    try:
        await observer.wait_for_reports(listen_s)
        return await observer.snapshot()
    finally:
        await observer.close()
