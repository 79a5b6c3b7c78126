"""A router replica over the runtime's feed (app/router/runtime_feed.py) on real NATS and
etcd: what a Router process runs, and a Frontend in its own process under `embed-router`.

Two replicas (as a Frontend and a Router process would be) follow one fleet of two
workers: both index the workers' KV events, each sees the other's placements, and a worker
that leaves is forgotten by both. Both follow the live policy `tandem router set` writes,
and ignore one that does not validate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import pytest

from app.cli import main as tandem
from app.errors import NoWorkerError
from app.protocol import BlockStored, KvEventBatch, ModelRecord, names
from app.router import RouterReplica
from app.router.config import RouterConfig, router_replica
from app.router.tunables import ROUTER_POLICY
from app.runtime import RequestContext, Runtime
from app.settings import RuntimeSettings

MakeRuntime = Callable[..., Awaitable[Runtime]]
BLOCK = 4


async def never_called(payload: Any, ctx: RequestContext) -> AsyncGenerator[Any, None]:
    raise AssertionError("the routers only watch the workers' instances")
    yield  # an async generator, as endpoints are


async def eventually(condition: Callable[..., bool], what: str, timeout: float = 10.0) -> None:
    """`condition` is called without arguments; `...` lets it bind a loop variable as a
    default (`lambda f=fleet: ...`), which mypy cannot match against `Callable[[], bool]`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


async def replica(make_runtime: MakeRuntime) -> RouterReplica:
    runtime = await make_runtime()
    workers = runtime.client(names.VLLM_WORKER, names.GENERATE)
    fleet = router_replica(runtime, RouterConfig(policy="kv", block_size=BLOCK), workers, replica=0)
    await fleet.start()
    return fleet


async def test_replicas_share_the_index_and_their_placements_and_forget_a_worker_that_leaves(
    make_runtime: MakeRuntime,
) -> None:
    workers = [await make_runtime() for _ in range(2)]
    for worker in workers:
        await worker.serve_endpoint(names.VLLM_WORKER, names.GENERATE, never_called)
    holder, other = (w.instance_id for w in workers)
    frontend, router = await replica(make_runtime), await replica(make_runtime)
    for fleet in (frontend, router):
        await eventually(lambda f=fleet: len(f.live_workers()) == 2, "both workers are seen")

    cached = list(range(4 * BLOCK))
    await workers[0].publish(
        names.KV_EVENTS_TOPIC,
        KvEventBatch(
            worker_id=holder,
            seq=0,
            block_size=BLOCK,
            events=[BlockStored(token_ids=cached, block_hashes=[101, 102, 103, 104])],
        ),
    )
    for fleet in (frontend, router):
        await eventually(lambda f=fleet: f.core.index.num_blocks() == 4, "the KV events are indexed")

    decision = frontend.route("request-1", [*cached, 7, 7, 7, 7, 7])
    assert (decision.worker_id, decision.overlap_blocks) == (holder, 4)
    # The other replica counts the placement: the next burst must not think the worker idle.
    await eventually(lambda: router.core.load.view(holder).active_requests == 1, "the placement is shared")
    frontend.on_finished("request-1")
    await eventually(lambda: router.core.load.view(holder).active_requests == 0, "the finish is shared")

    await workers[0].close()  # its lease goes, and its instance record with it
    for fleet in (frontend, router):
        await eventually(lambda f=fleet: f.core.index.num_blocks() == 0, "the departed worker's blocks are dropped")
    assert frontend.route("request-2", cached).worker_id == other

    await workers[1].close()
    await eventually(lambda: not frontend.live_workers(), "no worker is left")
    with pytest.raises(NoWorkerError):
        frontend.route("request-3", cached)
    for fleet in (frontend, router):
        await fleet.close()


async def test_replicas_follow_the_live_policy_and_ignore_an_invalid_one(
    make_runtime: MakeRuntime,
    runtime_settings: RuntimeSettings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("NATS_SERVER", runtime_settings.nats_server)
    monkeypatch.setenv("ETCD_ENDPOINTS", runtime_settings.etcd_endpoints)
    monkeypatch.setenv("TANDEM_NAMESPACE", runtime_settings.namespace)
    replicas = [await replica(make_runtime), await replica(make_runtime)]

    # The operator's command, in-process (it runs its own event loop, so in a thread).
    assert await asyncio.to_thread(tandem, ["router", "set", "--policy", "round-robin"]) == 0
    for fleet in replicas:
        await eventually(lambda f=fleet: f.core.policy.name == "round-robin", "the live policy applies")

    writer = await make_runtime()
    await writer.discovery.put_tunable(ROUTER_POLICY.key, {"policy": "fastest"})  # as `etcdctl put` could
    await asyncio.sleep(0.5)  # every replica's watch has it by now
    assert [fleet.core.policy.name for fleet in replicas] == ["round-robin", "round-robin"]
    capsys.readouterr()
    assert await asyncio.to_thread(tandem, ["router", "show"]) == 0
    assert "invalid, ignored by readers: router/policy: unknown router policy 'fastest'" in capsys.readouterr().out

    assert await asyncio.to_thread(tandem, ["router", "reset"]) == 0
    for fleet in replicas:
        await eventually(lambda f=fleet: f.core.policy.name == "kv", "the configured policy applies again")
    for fleet in replicas:
        await fleet.close()


async def test_a_replica_routes_a_request_among_the_workers_of_its_model_only(make_runtime: MakeRuntime) -> None:
    workers = [await make_runtime() for _ in range(3)]
    for worker, model in zip(workers, ("model-a", "model-a", "model-b"), strict=True):
        await worker.serve_endpoint(names.VLLM_WORKER, names.GENERATE, never_called)
        await worker.discovery.register_model(
            ModelRecord(name=model, instance_id=worker.instance_id, service=names.VLLM_WORKER, endpoint=names.GENERATE)
        )
    of_a = {workers[0].instance_id, workers[1].instance_id}
    of_b = workers[2].instance_id
    router = await replica(make_runtime)
    await eventually(lambda: len(router.live_workers()) == 3, "every worker is seen")
    await eventually(lambda: len(router.live_workers("model-a")) == 2, "model-a's records are seen")
    # model-b's worker holds the prompt's blocks: KV overlap must not draw model-a's requests there.
    cached = list(range(4 * BLOCK))
    batch = KvEventBatch(
        worker_id=of_b, seq=0, block_size=BLOCK, events=[BlockStored(token_ids=cached, block_hashes=[1, 2, 3, 4])]
    )
    await workers[2].publish(names.KV_EVENTS_TOPIC, batch)
    await eventually(lambda: router.core.index.num_blocks() == 4, "the KV events are indexed")
    assert {router.route(f"a{i}", cached, model="model-a").worker_id for i in range(6)} <= of_a
    assert router.route("b", cached, model="model-b").worker_id == of_b

    await workers[2].close()  # model-b's only worker leaves
    await eventually(lambda: not router.live_workers("model-b"), "model-b has no worker left")
    with pytest.raises(NoWorkerError, match="model `model-b`"):
        router.route("b2", cached, model="model-b")
    await router.close()


async def test_a_replica_without_a_block_size_takes_its_models_by_name_or_by_path(make_runtime: MakeRuntime) -> None:
    """The shipped configs hand a Router the Common section's `model`, a path, while the
    workers' records are named by the served name: the path must find them too."""
    worker = await make_runtime()
    metadata = {"block_size": 16, "model_path": "/models/tiny-llama"}
    await worker.discovery.register_model(
        ModelRecord(
            name="tiny-llama",
            instance_id=worker.instance_id,
            service=names.VLLM_WORKER,
            endpoint=names.GENERATE,
            metadata=metadata,
        )
    )
    for model in ("tiny-llama", "/models/tiny-llama"):
        runtime = await make_runtime()
        workers = runtime.client(names.VLLM_WORKER, names.GENERATE)
        router = router_replica(runtime, RouterConfig(policy="kv", model=model), workers, replica=0)
        await asyncio.wait_for(router.start(), 10)
        assert router.core.block_size == 16, model
        await router.close()
