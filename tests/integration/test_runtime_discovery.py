"""Discovery plane on real etcd: liveness via the lease, models, tunables."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from app.protocol import ModelRecord, ProcessRecord
from app.runtime import InstanceGoneError, RequestContext, Runtime
from app.runtime import discovery as discovery_module
from app.settings import RuntimeSettings
from tests.integration.child_process import Child

MakeRuntime = Callable[..., Awaitable[Runtime]]
ETCDCTL = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "etcdctl"


async def _wait_for(predicate: Callable[[], bool], timeout: float) -> float:
    """Seconds until `predicate()` held; fails the test after `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def test_killed_instance_leaves_within_ttl(make_runtime: MakeRuntime, runtime_settings: RuntimeSettings) -> None:
    ttl = 2
    caller = await make_runtime()
    client = caller.client("Child", "whoami")
    child = await Child.start(runtime_settings, "serve", lease_ttl_s=ttl)
    try:
        instance_id = (await child.read_line()).split()[1]
        await client.wait_for_instances(timeout=5)
        assert client.instance_ids() == [instance_id]
        assert await client.call(None) == child.proc.pid
        ticks = caller.client("Child", "ticks").stream(None)
        assert await anext(ticks) == 0
        child.proc.kill()
        await child.proc.wait()
        assert await _wait_for(lambda: client.instance_ids() == [], timeout=ttl + 2) <= ttl + 2
        # A stream from the dead instance ends with InstanceGoneError, not a hang: once
        # no heartbeat came within the proof-of-life window after its record went.
        with pytest.raises(InstanceGoneError):
            async with asyncio.timeout(3):
                async for _ in ticks:
                    pass
    finally:
        await child.kill()


async def test_a_caller_may_wait_longer_for_a_named_instance_to_accept(
    make_runtime: MakeRuntime, runtime_settings: RuntimeSettings
) -> None:
    """A stalled process (stopped, so its lease lives on) misses the default accept timeout;
    a call that names it with a longer `accept_timeout` is answered once it runs again."""
    caller = await make_runtime(request_ack_timeout_s=0.5)
    client = caller.client("Child", "whoami")
    child = await Child.start(runtime_settings, "serve", lease_ttl_s=30)
    try:
        instance_id = (await child.read_line()).split()[1]
        await client.wait_for_instances(timeout=5)
        child.proc.send_signal(signal.SIGSTOP)
        with pytest.raises(InstanceGoneError, match="did not accept"):
            await client.call(None, target=instance_id)
        patient = asyncio.create_task(client.call(None, target=instance_id, accept_timeout=20))
        await asyncio.sleep(2)  # four default accept timeouts
        assert not patient.done()
        child.proc.send_signal(signal.SIGCONT)
        assert await asyncio.wait_for(patient, 10) == child.proc.pid
    finally:
        child.proc.send_signal(signal.SIGCONT)
        await child.kill()


async def test_models_register_list_and_watch(make_runtime: MakeRuntime) -> None:
    worker, frontend = await make_runtime(), await make_runtime()
    watch = await frontend.discovery.watch_models()
    record = ModelRecord(
        name="org/tiny",
        instance_id=worker.instance_id,
        service="VllmWorker",
        endpoint="generate",
        metadata={"max_model_len": 2048},
    )
    await worker.discovery.register_model(record)
    assert await frontend.discovery.list_models() == {"org/tiny": [record]}
    await watch.wait_until(lambda models: "org/tiny" in models, timeout=5)
    assert watch.models == {"org/tiny": [record]}

    await worker.close()  # revokes the lease: the model record goes with it
    await watch.wait_until(lambda models: not models, timeout=5)
    assert await frontend.discovery.list_models() == {}


async def test_the_models_watch_keeps_each_models_instances(make_runtime: MakeRuntime) -> None:
    a1, a2, b1, frontend = [await make_runtime() for _ in range(4)]
    for worker, name in ((a1, "org/model-a"), (a2, "org/model-a"), (b1, "model-b")):
        await worker.discovery.register_model(
            ModelRecord(name=name, instance_id=worker.instance_id, service="VllmWorker", endpoint="generate")
        )
    watch = await frontend.discovery.watch_models()  # loads what is there already
    assert watch.instances("org/model-a") == {a1.instance_id, a2.instance_id}
    everyone = [a1.instance_id, b1.instance_id, a2.instance_id, "no-record"]
    assert watch.serving("model-b", everyone) == [b1.instance_id]
    assert watch.serving("", everyone) == everyone  # a request that names no model
    assert watch.serving("model-c", everyone) == []

    await a1.close()  # its lease, and its model record with it
    await _wait_for(lambda: a1.instance_id not in watch.instances("org/model-a"), timeout=5)
    assert watch.serving("org/model-a", everyone) == [a2.instance_id]
    late = await make_runtime()  # a worker that registers after the watch started
    await late.discovery.register_model(
        ModelRecord(name="model-b", instance_id=late.instance_id, service="VllmWorker", endpoint="generate")
    )
    await _wait_for(lambda: late.instance_id in watch.instances("model-b"), timeout=5)
    await watch.close()


async def test_process_and_instance_records_list_and_leave_with_the_lease(make_runtime: MakeRuntime) -> None:
    worker, reader = await make_runtime(), await make_runtime()

    async def handler(payload: Any, ctx: Any) -> AsyncGenerator[Any, None]:
        yield payload

    await worker.serve_endpoint("Echo", "echo", handler)
    record = ProcessRecord(
        instance_id=worker.instance_id, service="Echo", replica=1, host="10.0.0.9", pid=42, started_at=5.0
    )
    await worker.discovery.register_process(record)
    assert await reader.discovery.list_processes() == [record]
    (instance,) = await reader.discovery.list_instances()
    assert (instance.service, instance.endpoint, instance.instance_id) == ("Echo", "echo", worker.instance_id)
    await worker.close()
    assert await reader.discovery.list_processes() == [] and await reader.discovery.list_instances() == []


async def test_tunables_put_get_watch(make_runtime: MakeRuntime) -> None:
    writer, reader = await make_runtime(), await make_runtime()
    assert await reader.discovery.get_tunable("disagg/max_local_prefill_length", 1000) == 1000
    watch = await reader.discovery.watch_tunables()
    await writer.discovery.put_tunable("disagg/max_local_prefill_length", 512)
    assert await reader.discovery.get_tunable("disagg/max_local_prefill_length", 1000) == 512
    await watch.wait_until(lambda v: v.get("disagg/max_local_prefill_length") == 512, timeout=5)
    await writer.discovery.put_tunable("router/mode", {"name": "kv", "weight": 0.5})
    await watch.wait_until(lambda v: v.get("router/mode") == {"name": "kv", "weight": 0.5}, timeout=5)
    await writer.close()  # tunables outlive their writer
    assert await reader.discovery.get_tunable("router/mode") == {"name": "kv", "weight": 0.5}


async def test_lost_lease_is_granted_again_with_the_records(
    make_runtime: MakeRuntime, runtime_settings: RuntimeSettings
) -> None:
    server, caller = await make_runtime(lease_ttl_s=3), await make_runtime()
    await server.serve_endpoint("Phoenix", "go", _answer)
    client = caller.client("Phoenix", "go")
    await client.wait_for_instances(timeout=5)

    # Someone (an operator, an etcd outage longer than the TTL) drops the lease. Inline, with
    # this loop held: the watch, not the server's keepalive, is what must notice it first.
    subprocess.run(  # noqa: ASYNC221
        [str(ETCDCTL), f"--endpoints={runtime_settings.etcd_endpoints}", "lease", "revoke", server.instance_id],
        check=True,
        capture_output=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    await _wait_for(lambda: client.instance_ids() == [], timeout=2)
    await _wait_for(lambda: client.instance_ids() == [server.instance_id], timeout=5)
    assert await client.call(None) == "ok"


async def _answer(payload: object, ctx: RequestContext) -> AsyncGenerator[str, None]:
    yield "ok"


async def _pause_between(payload: float, ctx: RequestContext) -> AsyncGenerator[str, None]:
    yield "before"
    await asyncio.sleep(payload)  # nothing to send: only heartbeats show that it runs
    yield "after"


async def test_a_stream_goes_on_while_its_live_callee_has_lost_its_record(
    make_runtime: MakeRuntime, runtime_settings: RuntimeSettings
) -> None:
    """etcd drops a live callee's lease (an outage past the TTL, a partition): its record
    leaves discovery while it runs the call, with nothing to send for a while. The caller,
    which still hears its heartbeats, waits for the rest instead of giving the call up."""
    # A long TTL: the callee's keep-alive (every TTL/3) grants the lease again only after
    # the call has ended, so the record stays away for all of it.
    server, caller = await make_runtime(lease_ttl_s=30), await make_runtime()
    await server.serve_endpoint("Phoenix", "pause", _pause_between)
    client = caller.client("Phoenix", "pause")
    await client.wait_for_instances(timeout=5)
    stream = client.stream(4.0)
    assert await anext(stream) == "before"
    revoke = [str(ETCDCTL), f"--endpoints={runtime_settings.etcd_endpoints}", "lease", "revoke", server.instance_id]
    await asyncio.to_thread(subprocess.run, revoke, check=True, capture_output=True, env={"PATH": "/usr/bin:/bin"})
    await _wait_for(lambda: client.instance_ids() == [], timeout=2)
    async with asyncio.timeout(10):
        assert [item async for item in stream] == ["after"]
    assert client.instance_ids() == []  # the record was away all along


async def test_a_listener_that_raises_leaves_the_watch_and_the_process_running(make_runtime: MakeRuntime) -> None:
    writer, reader = await make_runtime(), await make_runtime()
    failures: list[str] = []
    reader.discovery.on_failure(failures.append)
    watch = await reader.discovery.watch_tunables()
    seen: list[str] = []

    def listener(key: str, value: Any) -> None:
        seen.append(key)
        if key == "router/mode":
            raise ValueError("a listener's bug")

    watch.add_listener(listener)
    await writer.discovery.put_tunable("router/mode", "kv")
    await writer.discovery.put_tunable("disagg/max_local_prefill_length", 512)
    await watch.wait_until(lambda v: v.get("disagg/max_local_prefill_length") == 512, timeout=5)
    assert seen == ["router/mode", "disagg/max_local_prefill_length"]
    assert failures == []


async def test_a_watch_or_keep_alive_that_ends_on_an_unexpected_error_fails_the_process(
    make_runtime: MakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing reports a watch that stopped (the view freezes) or a keep-alive that stopped
    (the records vanish a TTL later): the failure handler (the runner's ctx.fail) must."""
    writer, reader = await make_runtime(), await make_runtime(lease_ttl_s=3)
    failures: list[str] = []
    reader.discovery.on_failure(failures.append)
    await reader.discovery.watch_tunables()

    def unforeseen(self: Any, value: bytes) -> None:
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(discovery_module.PrefixWatch, "_decode", unforeseen)
    await writer.discovery.put_tunable("router/mode", "kv")
    async with asyncio.timeout(5):
        while not failures:
            await asyncio.sleep(0.02)
    assert failures == [
        f"background task etcd-watch:/tandem/{reader.namespace}/tunables/ ended: RuntimeError('unforeseen')"
    ]

    async def keep_alive_fails(self: Any) -> int:
        raise RuntimeError("keep-alive bug")

    monkeypatch.setattr(discovery_module.Discovery, "_keepalive_once", keep_alive_fails)
    async with asyncio.timeout(5):  # its next beat is a third of the TTL away
        while len(failures) < 2:
            await asyncio.sleep(0.02)
    assert failures[1] == "background task etcd-lease-keepalive ended: RuntimeError('keep-alive bug')"


async def test_an_instance_that_died_is_a_suspect_while_its_record_outlives_it(
    make_runtime: MakeRuntime, runtime_settings: RuntimeSettings
) -> None:
    """What the Processor pipeline avoids picking (app/serving/pipeline.py): a record whose
    process is gone answers with no-responders until its lease runs out."""
    caller = await make_runtime()
    client = caller.client("Child", "whoami")
    child = await Child.start(runtime_settings, "serve", lease_ttl_s=30)
    try:
        instance_id = (await child.read_line()).split()[1]
        await client.wait_for_instances(timeout=5)
        assert client.suspects() == []
        child.proc.kill()
        await child.proc.wait()
        assert client.instance_ids() == [instance_id]  # the record lives on
        with pytest.raises(InstanceGoneError):
            await client.call(None, target=instance_id)
        assert client.suspects() == [instance_id]
    finally:
        await child.kill()
