"""The runtime across server restarts, and when a server is not there at all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import pytest

from app.errors import UnavailableError, WorkerUnavailableError
from app.infra import EtcdServer, NatsServer
from app.launch.ports import free_port
from app.runtime import ConnectError, NatsUnavailableError, RequestContext, Runtime
from app.settings import RuntimeSettings

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
