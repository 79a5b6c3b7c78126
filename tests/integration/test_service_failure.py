"""A service that can serve nothing more (`ctx.fail`) leaves discovery first, then stops, and
its runner raises so that the process exits non-zero (supervisord then restarts it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from app.errors import WorkerUnavailableError
from app.runtime import Runtime
from app.sdk import ServiceContext, endpoint, on_shutdown, run_service, service
from app.sdk.config import GraphConfig
from app.sdk.runner import ServiceFailedError
from app.settings import RuntimeSettings

MakeRuntime = Callable[..., Awaitable[Runtime]]

# What the service saw, for the test to read.
SEEN: dict[str, bool] = {}


@service
class Fragile:
    runtime: Runtime
    ctx: ServiceContext

    @endpoint
    async def work(self, request: dict[str, Any]) -> AsyncIterator[str]:
        """Breaks the service, then keeps the call open for 5 s."""
        self.ctx.fail("asked to break")
        await asyncio.sleep(5)
        yield "too late"

    @on_shutdown
    async def record(self) -> None:
        SEEN["shutdown hook ran"] = True


async def test_a_failing_service_leaves_discovery_before_it_stops_and_its_runner_raises(
    make_runtime: MakeRuntime, runtime_settings: RuntimeSettings
) -> None:
    served = asyncio.create_task(run_service(Fragile, GraphConfig(path=None), runtime_settings, replica=0))
    caller = await make_runtime()
    client = caller.client("Fragile", "work")
    await client.wait_for_instances(timeout=10)

    # Out of discovery at once, while its handler still ran, and then stopped: the call in
    # flight ends with worker_unavailable then (its caller's pipeline would move it to
    # another worker), not after the handler's 5 s.
    start = asyncio.get_running_loop().time()
    with pytest.raises(WorkerUnavailableError, match="stopped before the call ended"):
        await client.call({})
    assert asyncio.get_running_loop().time() - start < 4
    # etcd itself (one read), not the caller's watch-fed cache: the watch event may reach the
    # caller a few ms after the reply frame that ended the call.
    assert [r for r in await caller.discovery.list_instances() if r.service == "Fragile"] == []

    with pytest.raises(ServiceFailedError, match="asked to break"):
        await asyncio.wait_for(served, timeout=30)
    assert SEEN == {"shutdown hook ran": True}
