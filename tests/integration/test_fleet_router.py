"""FleetRouter on real NATS and etcd: the router replica that a Router process runs, and that
a Frontend runs in its own process under `embed-router`.

Two replicas (as a Frontend and a Router process would be) follow one fleet of two
workers: both index the workers' KV events, each sees the other's placements, and a worker
that leaves is forgotten by both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from app.components.kv_router import FleetRouter, NoRoutableWorkerError, RouterConfig
from app.protocol import BlockStored, KvEventBatch
from app.runtime import RequestContext, Runtime

MakeRuntime = Callable[..., Awaitable[Runtime]]
BLOCK = 4


async def never_called(payload: Any, ctx: RequestContext) -> AsyncIterator[Any]:
    raise AssertionError("the routers only watch the workers' instances")
    yield  # an async generator, as endpoints are


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


async def replica(make_runtime: MakeRuntime) -> FleetRouter:
    runtime = await make_runtime()
    fleet = FleetRouter(runtime, RouterConfig(router="kv", block_size=BLOCK), runtime.client("VllmWorker", "generate"))
    await fleet.start()
    return fleet


async def test_replicas_share_the_index_and_their_placements_and_forget_a_worker_that_leaves(
    make_runtime: MakeRuntime,
) -> None:
    workers = [await make_runtime() for _ in range(2)]
    for worker in workers:
        await worker.serve_endpoint("VllmWorker", "generate", never_called)
    holder, other = (w.instance_id for w in workers)
    frontend, router = await replica(make_runtime), await replica(make_runtime)
    for fleet in (frontend, router):
        await eventually(lambda f=fleet: len(f.live_workers()) == 2, "both workers are seen")

    cached = list(range(4 * BLOCK))
    await workers[0].publish("kv", KvEventBatch(
        worker_id=holder, seq=0, block_size=BLOCK,
        events=[BlockStored(token_ids=cached, block_hashes=[101, 102, 103, 104])],
    ))
    for fleet in (frontend, router):
        await eventually(lambda f=fleet: f.router.index.num_blocks() == 4, "the KV events are indexed")

    decision = frontend.route("request-1", cached + [7, 7, 7, 7, 7])
    assert (decision.worker_id, decision.overlap_blocks) == (holder, 4)
    # The other replica counts the placement: the next burst must not think the worker idle.
    await eventually(lambda: router.router.load.view(holder).active_requests == 1, "the placement is shared")
    frontend.router.on_finished("request-1")
    await eventually(lambda: router.router.load.view(holder).active_requests == 0, "the finish is shared")

    await workers[0].close()  # its lease goes, and its instance record with it
    for fleet in (frontend, router):
        await eventually(lambda f=fleet: f.router.index.num_blocks() == 0, "the departed worker's blocks are dropped")
    assert frontend.route("request-2", cached).worker_id == other

    await workers[1].close()
    await eventually(lambda: not frontend.live_workers(), "no worker is left")
    with pytest.raises(NoRoutableWorkerError):
        frontend.route("request-3", cached)
    for fleet in (frontend, router):
        await fleet.close()
