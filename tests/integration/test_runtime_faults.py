"""The runtime across server restarts, and when a server is not there at all."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import nats.errors
import pytest

from app.errors import UnavailableError, WorkerUnavailableError
from app.infra import EtcdServer, NatsServer
from app.launch.ports import free_port
from app.runtime import (
    ConnectError,
    FramesLostError,
    InstanceGoneError,
    NatsUnavailableError,
    RequestContext,
    Runtime,
)
from app.settings import RuntimeSettings
from tests.integration.child_process import Child

MakeRuntime = Callable[..., Awaitable[Runtime]]


async def _echo(payload: Any, ctx: RequestContext) -> AsyncGenerator[Any, None]:
    yield payload


async def _call_until_ok(runtime: Runtime, service: str, payload: Any, timeout: float) -> Any:
    """Calls fail while a server is away; the first success after it is back is returned."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await runtime.client(service, "echo").call(payload, timeout=2)
        except (UnavailableError, WorkerUnavailableError):  # the runtime's own failures
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_survives_nats_restart(make_runtime: MakeRuntime, nats_server: NatsServer) -> None:
    server, caller = await make_runtime(), await make_runtime()
    await server.serve_endpoint("Echo", "echo", _echo)
    sub = await caller.subscribe("ping")
    queue = await caller.work_queue("jobs", ack_wait_s=5)
    await queue.push({"job": 1})
    assert await caller.client("Echo", "echo").call("before") == "before"

    await asyncio.to_thread(nats_server.restart)

    assert await _call_until_ok(caller, "Echo", "after", timeout=10) == "after"
    await server.publish("ping", {"n": 1})  # subscriptions were restored on reconnect
    assert await asyncio.wait_for(anext(sub), timeout=5) == {"n": 1}
    job = await queue.pull(timeout=5)  # the JetStream file store kept the job
    assert job is not None and job.data == {"job": 1}
    await job.ack()


async def test_a_call_made_while_nats_is_down_waits_for_it_within_the_outage_wait(
    make_runtime: MakeRuntime, nats_server: NatsServer
) -> None:
    server = await make_runtime()
    patient, hasty = await make_runtime(outage_wait_s=20), await make_runtime(outage_wait_s=1)
    await server.serve_endpoint("Echo", "echo", _echo)
    assert await patient.client("Echo", "echo").call("before") == "before"
    assert await hasty.client("Echo", "echo").call("before") == "before"

    await asyncio.to_thread(nats_server.stop)
    try:
        waiting = asyncio.create_task(patient.client("Echo", "echo").call("during"))
        start = time.monotonic()
        with pytest.raises(NatsUnavailableError, match="not sent"):
            await hasty.client("Echo", "echo").call("during")
        assert 0.9 < time.monotonic() - start < 3
        assert not waiting.done()
    finally:
        await asyncio.to_thread(nats_server.start)
    # Sent once the connection is back, answered once the callee has subscribed again.
    assert await asyncio.wait_for(waiting, 15) == "during"


async def test_survives_etcd_restart(make_runtime: MakeRuntime, etcd_server: EtcdServer) -> None:
    ttl = 3
    server, caller = await make_runtime(lease_ttl_s=ttl), await make_runtime(lease_ttl_s=ttl)
    await server.serve_endpoint("Echo", "echo", _echo)
    client = caller.client("Echo", "echo")
    await client.wait_for_instances(timeout=5)
    tunables = await caller.discovery.watch_tunables()

    await asyncio.to_thread(etcd_server.restart)

    late = await make_runtime(lease_ttl_s=ttl)
    await late.serve_endpoint("Echo", "echo", _echo)
    await late.discovery.put_tunable("router/mode", "kv")
    # The watches were rebuilt: what happened after the restart is seen ...
    await tunables.wait_until(lambda v: v.get("router/mode") == "kv", timeout=10)
    deadline = time.monotonic() + 10
    while len(client.instance_ids()) < 2:
        assert time.monotonic() < deadline, client.instance_ids()
        await asyncio.sleep(0.1)
    # ... and the leases were kept alive: the first instance is still there after a TTL.
    await asyncio.sleep(ttl + 1)
    assert sorted(client.instance_ids()) == sorted([server.instance_id, late.instance_id])
    assert await client.call("still", target=server.instance_id) == "still"


async def test_connect_gives_up_after_the_timeout_naming_the_address(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    closed = free_port()
    for settings, address in [
        (
            RuntimeSettings(
                nats_server=f"nats://127.0.0.1:{closed}", etcd_endpoints=etcd_server.url, connect_timeout_s=1.0
            ),
            f"127.0.0.1:{closed}",
        ),
        (
            RuntimeSettings(
                nats_server=nats_server.url, etcd_endpoints=f"http://127.0.0.1:{closed}", connect_timeout_s=1.0
            ),
            f"127.0.0.1:{closed}",
        ),
    ]:
        start = time.monotonic()
        with pytest.raises(ConnectError) as caught:
            await Runtime.connect(settings)
        elapsed = time.monotonic() - start
        assert 0.9 <= elapsed < 4, elapsed
        assert address in str(caught.value)


async def test_a_call_on_a_closed_nats_connection_is_a_503_not_a_500(make_runtime: MakeRuntime) -> None:
    server, caller = await make_runtime(), await make_runtime()
    await server.serve_endpoint("Echo", "echo", _echo)
    client = caller.client("Echo", "echo")
    assert await client.call("before") == "before"
    await caller._nc.close()
    with pytest.raises(NatsUnavailableError, match="not sent") as caught:
        await client.call("after")
    assert caught.value.status == 503


async def _ticks(payload: Any, ctx: RequestContext) -> AsyncGenerator[int, None]:
    """0, 1, 2, ...: one a frame (it pauses between them)."""
    for tick in range(payload):
        yield tick
        await asyncio.sleep(0.02)


async def _read_until_it_fails(stream: AsyncGenerator[Any, None], timeout: float) -> tuple[list[Any], BaseException]:
    items: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            async for item in stream:
                items.append(item)
    except Exception as exc:
        return items, exc
    raise AssertionError(f"the stream ended without an error: {items}")


async def test_a_reply_frame_nats_refuses_to_send_is_a_gap_the_caller_raises_on(make_runtime: MakeRuntime) -> None:
    """The callee's publish of one frame fails as it does when its reconnect buffer is full
    (the callee logs "reply frame lost" and goes on): the caller must not stream on past the
    hole."""
    server, caller = await make_runtime(), await make_runtime()
    await server.serve_endpoint("Ticks", "go", _ticks)
    publish = server._nc.publish
    data_frames = 0

    async def publish_losing_the_third_data_frame(subject: str, payload: bytes = b"", **kwargs: Any) -> None:
        nonlocal data_frames
        if payload[:1] in (b"D", b"d"):  # a data frame (its kind's lower-case letter where numbered)
            data_frames += 1
            if data_frames == 3:
                raise nats.errors.OutboundBufferLimitError
        await publish(subject, payload, **kwargs)

    server._nc.publish = publish_losing_the_third_data_frame  # type: ignore[method-assign,assignment]
    items, error = await _read_until_it_fails(caller.client("Ticks", "go").stream(20), timeout=5)
    assert items == [0, 1]  # what came before the hole, and nothing after it
    assert isinstance(error, FramesLostError) and "frames were lost" in str(error)
    assert isinstance(error, WorkerUnavailableError) and not error.worker_at_fault  # the pipeline migrates on it


async def test_reply_frames_a_slow_consumer_dropped_are_a_gap_the_caller_raises_on(
    make_runtime: MakeRuntime, runtime_settings: RuntimeSettings
) -> None:
    """nats-py drops messages for a subscription whose pending bytes pass its limit (a slow
    consumer) and the connection stays up: here the caller's event loop stalls while a
    callee in another process streams on, so that the burst it reads when it wakes passes a
    limit lowered for the test (128 MiB by default)."""
    caller = await make_runtime()
    child = await Child.start(runtime_settings, "serve")
    try:
        await child.read_line()
        ticks = caller.client("Child", "ticks").stream(None)
        assert await anext(ticks) == 0
        replies = caller._replies._sub
        assert replies is not None
        limit = replies._pending_bytes_limit
        replies._pending_bytes_limit = 30  # a few 6-byte frames
        time.sleep(1.0)  # the loop stalls: some 20 frames wait in the socket  # noqa: ASYNC251
        await asyncio.sleep(0.2)  # they are read at once; most are dropped
        replies._pending_bytes_limit = limit
        items, error = await _read_until_it_fails(ticks, timeout=5)
        assert items == list(range(1, len(items) + 1))  # no gap in what it yielded
        assert isinstance(error, FramesLostError), error
    finally:
        await child.kill()


async def test_a_stopped_callee_whose_record_lives_on_is_given_up_within_a_few_heartbeats(
    make_runtime: MakeRuntime, runtime_settings: RuntimeSettings
) -> None:
    """SIGSTOP: no frame, no heartbeat, and its lease (60 s) outlives the test. Before, the
    caller waited for the record to go, however long that took."""
    caller = await make_runtime()
    child = await Child.start(runtime_settings, "serve", lease_ttl_s=60)
    try:
        instance_id = (await child.read_line()).split()[1]
        client = caller.client("Child", "ticks")
        ticks = client.stream(None)
        assert await anext(ticks) == 0
        child.proc.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        _, error = await _read_until_it_fails(ticks, timeout=15)
        assert isinstance(error, InstanceGoneError) and "has not been heard from" in str(error), error
        assert 4.5 < time.monotonic() - start < 8
        assert instance_id in client.instance_ids() and instance_id in client.suspects()
    finally:
        child.proc.send_signal(signal.SIGCONT)
        await child.kill()
