"""The `Fleet` the doctor checks, read through a `Runtime` from what the fleet publishes.

As `tandem status` does (app/status/gather.py, whose `FleetObserver` keeps the reports):
the records in etcd, the reports the workers and router replicas publish on their own
schedule, JetStream's queue info; besides, the clock readings (app/doctor/clocks.py) and
which workers' KV event batches arrive while it listens. The one call it makes is each
PrefillWorker's `status` (for its clock), as `tandem status` makes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from app.doctor.check import ClockSample, Fleet
from app.doctor.clocks import REPORT_DELAY_BOUND_S
from app.protocol import KvEventBatch, LoadReport, RouterReport, names
from app.runtime import Runtime
from app.status.gather import FleetObserver

log = logging.getLogger(__name__)


class _Readings:
    """What the doctor hears besides the reports' contents: clock readings and KV senders."""

    def __init__(self) -> None:
        self.report_offsets: dict[str, float] = {}  # sender -> the largest (timestamp - receipt)
        self.kv_heard: set[str] = set()

    def on_report(self, sender: str, timestamp: float) -> None:
        if not timestamp:
            return  # a sender that does not stamp its reports
        reading = timestamp - time.time()
        self.report_offsets[sender] = max(reading, self.report_offsets.get(sender, reading))

    def on_load(self, report: LoadReport) -> None:
        self.on_report(report.worker_id, report.timestamp)

    def on_router(self, report: RouterReport) -> None:
        self.on_report(report.router_id, report.timestamp)

    def on_kv(self, batch: KvEventBatch) -> None:
        self.kv_heard.add(batch.worker_id)


async def gather_fleet(runtime: Runtime, listen_s: float, call_timeout_s: float = 2.0) -> Fleet:
    """Listen for `listen_s` (every report is heard at least once with the default
    intervals of 1 s and 2 s), then read the records and ask the PrefillWorkers."""
    observer = FleetObserver(runtime, ())
    readings = _Readings()
    await observer.start()
    subscriptions = [
        await runtime.subscribe(names.LOAD_TOPIC, LoadReport, on_event=readings.on_load),
        await runtime.subscribe(names.ROUTER_REPORT_TOPIC, RouterReport, on_event=readings.on_router),
        await runtime.subscribe(names.KV_EVENTS_TOPIC, KvEventBatch, on_event=readings.on_kv),
    ]
    try:
        await asyncio.sleep(listen_s)
        discovery = runtime.discovery
        processes, models, queue = await asyncio.gather(
            discovery.list_processes(), discovery.list_models(), runtime.queue_state(names.PREFILL_QUEUE)
        )
        prefill_ids = [p.instance_id for p in processes if p.service == names.PREFILL_WORKER]
        clocks = [
            ClockSample(sender, offset, REPORT_DELAY_BOUND_S) for sender, offset in readings.report_offsets.items()
        ]
        clocks += await _prefill_clocks(runtime, prefill_ids, call_timeout_s)
        return Fleet(
            namespace=runtime.namespace,
            doctor_host=runtime.host,
            processes=processes,
            models=[record for records in models.values() for record in records],
            routers=dict(observer.routers),
            loads=dict(observer.loads),
            queue=queue,
            max_payload=runtime.max_payload,
            listened_s=listen_s,
            kv_heard=readings.kv_heard,
            clocks=clocks,
        )
    finally:
        for subscription in subscriptions:
            await subscription.close()
        await observer.close()


async def _prefill_clocks(runtime: Runtime, instance_ids: list[str], timeout_s: float) -> list[ClockSample]:
    """Each PrefillWorker's clock, read by a `status` call: its clock minus the call's middle."""
    if not instance_ids:
        return []
    client = runtime.client(names.PREFILL_WORKER, names.PREFILL_STATUS)
    await client.watch()

    async def read(instance_id: str) -> ClockSample | None:
        sent = time.time()
        try:
            answer: Any = await client.call({}, target=instance_id, timeout=timeout_s)
        except Exception as exc:
            log.info("PrefillWorker %s: status unanswered (%s): its clock is not read", instance_id, exc)
            return None
        received = time.time()
        if not isinstance(answer, dict) or not isinstance(answer.get("time"), (int, float)):
            return None  # a PrefillWorker of an older Tandem: it does not say its clock
        return ClockSample(instance_id, answer["time"] - (sent + received) / 2, (received - sent) / 2)

    samples = await asyncio.gather(*(read(i) for i in instance_ids))
    return [sample for sample in samples if sample is not None]
