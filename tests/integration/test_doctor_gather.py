"""`gather_fleet` and the doctor's checks against real NATS and etcd: what stand-ins for a
decode worker and a PrefillWorker publish is read back as the checks need it (the queue's
settings, the server's max_payload, the clocks, the side channel)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from app.doctor.cli import fleet_checks
from app.doctor.gather import gather_fleet
from app.infra import EtcdServer, NatsServer
from app.launch.ports import free_port
from app.protocol import PREFILL_ACK_WAIT_S, KvEventBatch, LoadReport, ModelInfo, ModelRecord, ProcessRecord, names
from app.runtime import Runtime
from app.settings import RuntimeSettings

MakeRuntime = Callable[..., Awaitable[Runtime]]
PREFILL_CLOCK_AHEAD_S = 5.0


def record(runtime: Runtime, service: str, host: str, **fields: Any) -> ProcessRecord:
    return ProcessRecord(
        instance_id=runtime.instance_id, service=service, replica=0, host=host, pid=1, started_at=time.time(), **fields
    )


async def test_a_fleet_is_read_back_as_published_and_its_faults_are_found(make_runtime: MakeRuntime) -> None:
    decode, prefill, doctor = await make_runtime(), await make_runtime(), await make_runtime()
    side_channel = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)
    port = side_channel.sockets[0].getsockname()[1]

    async def status(_payload: Any, _ctx: Any) -> AsyncGenerator[dict[str, Any], None]:
        yield {"worker_id": prefill.instance_id, "pullers": 1, "time": time.time() + PREFILL_CLOCK_AHEAD_S}

    async def publish_reports() -> None:
        while True:
            await decode.publish(
                names.LOAD_TOPIC,
                LoadReport(
                    worker_id=decode.instance_id,
                    running=0,
                    waiting=0,
                    kv_used_blocks=0,
                    kv_total_blocks=8,
                    timestamp=time.time(),
                ),
            )
            await decode.publish(
                names.KV_EVENTS_TOPIC, KvEventBatch(worker_id=decode.instance_id, seq=0, block_size=16, events=[])
            )
            await asyncio.sleep(0.2)

    # Opened as the workers open it, except for a longer ack_wait: JetStream keeps it.
    await prefill.work_queue(names.PREFILL_QUEUE, ack_wait_s=3 * PREFILL_ACK_WAIT_S)
    await prefill.serve_endpoint(names.PREFILL_WORKER, names.PREFILL_STATUS, status)
    await prefill.discovery.register_process(
        record(prefill, names.PREFILL_WORKER, "127.0.0.2", nixl_side_channel=f"127.0.0.1:{port}")
    )
    await decode.discovery.register_process(record(decode, names.VLLM_WORKER, "127.0.0.1"))
    reports = asyncio.create_task(publish_reports())
    try:
        fleet = await gather_fleet(doctor, listen_s=1.0)
        checks = {c.name: c for c in await fleet_checks(fleet, clock_margin_s=3.0, connect_timeout_s=2.0)}
    finally:
        reports.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reports
        side_channel.close()
        await side_channel.wait_closed()

    assert fleet.max_payload == 1024 * 1024  # nats-server's default, from its INFO
    assert {p.instance_id for p in fleet.processes} == {decode.instance_id, prefill.instance_id}
    assert fleet.kv_heard == {decode.instance_id} and decode.instance_id in fleet.loads

    assert fleet.queue is not None
    (consumer,) = fleet.queue.consumers
    assert (fleet.queue.retention, consumer.ack_policy, consumer.max_deliver) == ("workqueue", "explicit", -1)
    assert consumer.ack_wait_s == 3 * PREFILL_ACK_WAIT_S
    queue = checks["prefill-queue"]
    assert not queue.ok and f"ack_wait 30.0s (expected {PREFILL_ACK_WAIT_S:g}s)" in queue.message, queue

    by_instance = {sample.instance_id: sample for sample in fleet.clocks}
    assert abs(by_instance[decode.instance_id].offset_s) < 0.5
    assert abs(by_instance[prefill.instance_id].offset_s - PREFILL_CLOCK_AHEAD_S) < 0.5
    assert by_instance[prefill.instance_id].error_s < 0.5
    clocks = checks["clocks"]
    assert not clocks.ok and "the clock of 127.0.0.2 is 5." in clocks.message, clocks

    # Listening, but on loopback, where the decode worker of the other node cannot dial it.
    reach = checks["nixl-side-channels"]
    assert not reach.ok and f"advertises side channel 127.0.0.1:{port}, which decode workers on 127.0.0.1" in (
        reach.message
    )
    assert checks["versions"].ok  # neither stand-in says a version: the same "unknown"


class SmallPayloadNats(NatsServer):
    """nats-server told, by its config file, to take messages of 64 KiB at most."""

    def command(self) -> list[str]:
        config = self.state_dir / "small-payload.conf"
        config.write_text("max_payload: 65536\n")
        return [*super().command(), "-c", str(config)]


async def test_a_nats_server_whose_max_payload_is_below_a_models_requests_fails_the_check(
    tmp_path: Path, etcd_server: EtcdServer
) -> None:
    nats = SmallPayloadNats("127.0.0.1", free_port(), free_port(), tmp_path / "nats")
    nats.start()
    try:
        settings = RuntimeSettings(
            nats_server=nats.url, etcd_endpoints=etcd_server.url, namespace=f"p{uuid.uuid4().hex[:8]}"
        )
        async with await Runtime.connect(settings) as worker, await Runtime.connect(settings) as doctor:
            info = ModelInfo(name="long", max_model_len=32768, block_size=16, model_path="/models/long")
            await worker.discovery.register_model(
                ModelRecord(
                    name="long",
                    instance_id=worker.instance_id,
                    service=names.VLLM_WORKER,
                    endpoint=names.GENERATE,
                    metadata=msgspec.to_builtins(info),
                )
            )
            fleet = await gather_fleet(doctor, listen_s=0.2)
        checks = {c.name: c for c in await fleet_checks(fleet, clock_margin_s=3.0, connect_timeout_s=2.0)}
    finally:
        nats.stop()
    assert fleet.max_payload == 65536  # what the server told the connection
    check = checks["nats-max-payload"]
    assert not check.ok, check
    assert "model 'long' takes prompts of 32768 tokens" in check.message and "max_payload" in check.message
