"""Processor: OpenAI request -> tokens -> routed worker -> detokenized OpenAI stream.

The work itself is `RequestPipeline`, which the Processor service serves over NATS and
which the Frontend embeds by default (one process and one hop fewer per token).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.components.kv_router import FleetRouter, NoRoutableWorkerError, PlacementPublisher, Router
from app.components.routing import RouterPolicyName
from app.components.worker import VllmWorker
from app.openai.schema import ChatCompletionRequest, CompletionRequest, OpenAIRequest, parse_request
from app.preprocess import Preprocessor, StreamItem, postprocess_stream
from app.protocol import EngineOutput, PreprocessedRequest, RouteDecision, RouteRequest
from app.router import PlacementEvent
from app.runtime import RequestContext, Runtime
from app.runtime.requests import EndpointClient
from app.sdk import depends, endpoint, on_start, service

log = logging.getLogger(__name__)

# How long a request waits for a worker to appear before it fails with 503; covers a
# worker restarting under supervisord, not a cluster with no workers at all.
WORKER_WAIT_S = 5.0
# Prompts up to this many characters are tokenized on the event loop: that takes tens of
# microseconds, less than handing the work to a thread and back. Longer ones (a long
# prompt takes up to a second) go off the loop.
INLINE_PREPROCESS_CHARS = 4096


def _prompt_chars(request: OpenAIRequest) -> int:
    """The prompt's size in characters (token ids count as one each), before templating."""
    if isinstance(request, ChatCompletionRequest):
        return sum(len(message.text() or "") for message in request.messages)
    text = request.prompt_text()
    return len(text) if text is not None else len(request.prompt_token_ids() or ())


def _log_start_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the embedded router could not start; requests fail until a restart", exc_info=task.exception())


class ProcessorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="model path or name: its tokenizer and chat template")
    block_size: int | None = Field(default=None, ge=1, description="KV block size; default: the model record's")
    max_model_len: int | None = Field(default=None, ge=1, description="default: the model record's")
    router: RouterPolicyName = Field(
        default="round-robin",
        description="how to pick a worker when no Router service runs (round-robin or random); "
        "with a Router deployed, the Router's policy decides",
    )


class RequestPipeline:
    """Tokenizes, asks the Router for a worker, streams from that worker, detokenizes."""

    def __init__(
        self,
        config: ProcessorConfig,
        runtime: Runtime,
        router: EndpointClient,
        worker: EndpointClient,
        embedded_router: FleetRouter | None = None,
    ) -> None:
        self._config = config
        self._router = router
        self._worker = worker
        # A router replica in this process (the Frontend's `embed-router`): no NATS round
        # trip per request, and its own placement accounting instead of the Router's.
        self._embedded_router = embedded_router
        self._router_started: asyncio.Task[None] | None = None
        self._preprocessor: Preprocessor | None = None
        self._round_robin = itertools.count()
        # Placement events name their source; the Routers apply every source but their own.
        self._placement_source = f"processor-{runtime.instance_id}"
        self._placements = PlacementPublisher(runtime)

    async def start(self) -> None:
        # Loading transformers and the tokenizer takes seconds: off the event loop, which
        # must keep the process's etcd lease alive meanwhile.
        self._preprocessor = await asyncio.to_thread(
            Preprocessor, self._config.model, max_model_len=self._config.max_model_len
        )
        # Follow both services from now on, so that the first request already knows
        # whether a Router is deployed (graphs.agg has none).
        await self._router.watch()
        await self._worker.watch()
        if self._embedded_router is not None:
            # Without a block size in its config the router learns it from the first worker's
            # model record: in the background, so that the Frontend serves /health meanwhile.
            self._router_started = asyncio.create_task(self._embedded_router.start(), name="embedded-router")
            self._router_started.add_done_callback(_log_start_failure)

    async def close(self) -> None:
        if self._embedded_router is not None and self._router_started is not None:
            self._router_started.cancel()
            await asyncio.gather(self._router_started, return_exceptions=True)
            await self._embedded_router.close()

    async def generate(self, request: OpenAIRequest, request_id: str) -> AsyncIterator[StreamItem]:
        assert self._preprocessor is not None, "request before start()"
        if _prompt_chars(request) <= INLINE_PREPROCESS_CHARS:
            preprocessed = self._preprocessor.preprocess(request, request_id)
        else:
            preprocessed = await asyncio.to_thread(self._preprocessor.preprocess, request, request_id)
        decision = await self._pick_worker(preprocessed)
        postprocessor = self._preprocessor.postprocessor(request, preprocessed)
        outputs = self._worker.stream(
            preprocessed, target=decision.worker_id, response_type=EngineOutput, request_id=request_id
        )
        first = True
        try:
            async with contextlib.aclosing(postprocess_stream(postprocessor, outputs)) as items:
                async for item in items:
                    if first:
                        first = False
                        self._placement(request_id, decision.worker_id, "prefill_done")
                        # The Frontend's response headers name the workers from the first item.
                        item.worker_id = item.worker_id or decision.worker_id
                    yield item
        finally:
            self._placement(request_id, decision.worker_id, "finished")

    async def _pick_worker(self, request: PreprocessedRequest) -> RouteDecision:
        if not self._worker.instance_ids():
            await self._worker.wait_for_instances(timeout=WORKER_WAIT_S)
        if self._embedded_router is not None and self._router_started is not None:
            if not self._router_started.done():
                try:
                    await asyncio.wait_for(asyncio.shield(self._router_started), WORKER_WAIT_S)
                except TimeoutError:
                    raise NoRoutableWorkerError("the router has not started yet (no worker's model record)") from None
            self._router_started.result()  # re-raises why it could not start
            return self._embedded_router.route(request.request_id, request.token_ids)
        if self._router.instance_ids():
            decision = await self._router.call(
                RouteRequest(request_id=request.request_id, token_ids=request.token_ids),
                response_type=RouteDecision,
                target="round_robin",
            )
            log.debug("%s: routed to %s (%d/%d blocks cached)", request.request_id, decision.worker_id,
                      decision.overlap_blocks, decision.prompt_blocks)
            return decision
        # graphs.agg has no Router: spread over the workers directly.
        workers = self._worker.instance_ids()
        if self._config.router == "random":
            return RouteDecision(worker_id=random.choice(workers))
        return RouteDecision(worker_id=workers[next(self._round_robin) % len(workers)])

    def _placement(self, request_id: str, worker_id: str, kind: str) -> None:
        if self._embedded_router is not None:
            # The replica accounts for it and publishes it to the others.
            if kind == "prefill_done":
                self._embedded_router.router.on_prefill_done(request_id)
            else:
                self._embedded_router.router.on_finished(request_id)
            return
        if not self._router.instance_ids():
            return
        self._placements.publish(
            PlacementEvent(router_id=self._placement_source, request_id=request_id, worker_id=worker_id, kind=kind)
        )


@service(config=ProcessorConfig)
class Processor:
    config: ProcessorConfig
    runtime: Runtime
    router = depends(Router)
    worker = depends(VllmWorker)

    def __init__(self) -> None:
        self._pipeline = RequestPipeline(self.config, self.runtime, self.router.route, self.worker.generate)

    @on_start
    async def start(self) -> None:
        await self._pipeline.start()

    @endpoint
    async def chat_completions(self, request: dict[str, Any], ctx: RequestContext) -> AsyncIterator[StreamItem]:
        stream = self._pipeline.generate(parse_request(ChatCompletionRequest, request), ctx.request_id)
        async with contextlib.aclosing(stream) as items:
            async for item in items:
                yield item

    @endpoint
    async def completions(self, request: dict[str, Any], ctx: RequestContext) -> AsyncIterator[StreamItem]:
        stream = self._pipeline.generate(parse_request(CompletionRequest, request), ctx.request_id)
        async with contextlib.aclosing(stream) as items:
            async for item in items:
                yield item
