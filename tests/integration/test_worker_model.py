"""A VllmWorker serves its own model only: a real worker (the mocker engine), run in process
by the service runner, on real NATS and etcd.

A request for another model is refused before any work, with `worker_unavailable` (what a
caller's pipeline re-routes on) naming both models; one for its model, or one that names
no model (a caller from before routing by model), is served.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from app.components.worker import VllmWorker
from app.errors import WorkerUnavailableError
from app.protocol import EngineOutput, PreprocessedRequest, SamplingOptions, StopConditions, names
from app.runtime import EndpointClient, Runtime
from app.sdk import run_service
from app.sdk.config import GraphConfig
from app.settings import RuntimeSettings

MakeRuntime = Callable[..., Awaitable[Runtime]]
SERVED = "model-b"


def _request(model: str) -> PreprocessedRequest:
    return PreprocessedRequest(
        request_id=f"for-{model or 'any'}",
        model=model,
        token_ids=[5, 6, 7, 8],
        sampling=SamplingOptions(temperature=0.0),
        stop=StopConditions(max_tokens=3, ignore_eos=True),
    )


async def _tokens(client: EndpointClient, model: str) -> list[int]:
    stream = client.stream(_request(model), response_type=EngineOutput, timeout=30)
    return [token async for output in stream for token in output.token_ids]


@pytest.fixture
async def worker(
    tiny_model: Path, runtime_settings: RuntimeSettings, make_runtime: MakeRuntime
) -> AsyncIterator[EndpointClient]:
    section = {
        "engine": "mocker",
        "model": str(tiny_model),
        "served-model-name": SERVED,
        "vocab-size": 3000,
        "block-size": 16,
        "max-model-len": 256,
    }
    stop = asyncio.Event()
    served = asyncio.create_task(
        run_service(VllmWorker, GraphConfig(path=None, raw={names.VLLM_WORKER: section}), runtime_settings, stop=stop)
    )
    caller = await make_runtime()
    client = caller.client(names.VLLM_WORKER, names.GENERATE)
    await client.wait_for_instances(timeout=30)
    try:
        yield client
    finally:
        stop.set()
        await asyncio.wait_for(served, timeout=30)


async def test_a_worker_refuses_another_models_request_before_any_work(worker: EndpointClient) -> None:
    with pytest.raises(WorkerUnavailableError, match=f"serves model `{SERVED}`, not `model-a`") as refused:
        await _tokens(worker, "model-a")
    assert refused.value.code == "worker_unavailable"  # what every caller re-routes on
    assert len(await _tokens(worker, SERVED)) == 3
    assert len(await _tokens(worker, "")) == 3  # names no model: any worker serves it
