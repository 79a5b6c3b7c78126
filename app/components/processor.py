"""Processor: OpenAI request -> tokens -> a worker -> detokenized OpenAI stream, over NATS;
and /tokenize, /detokenize for the Frontends that hold no tokenizer.

The work is app.serving's RequestPipeline. The Frontend runs that pipeline in its own
process by default (`embed-processor`); this service serves the Frontends that do not.
It picks workers through the graph's Router where the graph has one, else it spreads
requests over the workers itself (graphs.agg).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry

from app.components.kv_router import Router
from app.components.worker import VllmWorker
from app.metrics import replica_port, serve_metrics
from app.openai.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIRequest,
    parse_request,
    parse_tokenize_request,
)
from app.protocol import StreamItem
from app.runtime import RequestContext, Runtime
from app.sdk import Service, ServiceContext, depends, endpoint, on_shutdown, on_start, service
from app.serving import PipelineConfig, RequestPipeline, create_picker


@service(config=PipelineConfig)
class Processor(Service):
    config: PipelineConfig
    runtime: Runtime
    ctx: ServiceContext
    router = depends(Router)
    worker = depends(VllmWorker)

    def __init__(self) -> None:
        workers = self.worker.generate
        picker = create_picker(self.runtime, workers, graph=self.ctx.graph, spread=self.config.spread)
        self._registry = CollectorRegistry()
        self._pipeline = RequestPipeline(self.config, picker, workers, registry=self._registry)
        self._metrics_server: Any = None

    @on_start
    async def start(self) -> None:
        await self._pipeline.start()
        self._metrics_server = serve_metrics(self._registry, replica_port(self.config.metrics_port, self.ctx.replica))

    @on_shutdown
    async def stop(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        await self._pipeline.close()

    @endpoint
    async def chat_completions(self, request: dict[str, Any], ctx: RequestContext) -> AsyncIterator[StreamItem]:
        async for item in self._generate(parse_request(ChatCompletionRequest, request), ctx):
            yield item

    @endpoint
    async def completions(self, request: dict[str, Any], ctx: RequestContext) -> AsyncIterator[StreamItem]:
        async for item in self._generate(parse_request(CompletionRequest, request), ctx):
            yield item

    @endpoint
    async def tokenize(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        tokenized = await self._pipeline.tokenize(parse_tokenize_request(request))
        yield tokenized._asdict()

    @endpoint
    async def detokenize(self, request: dict[str, Any]) -> AsyncIterator[str]:
        yield await self._pipeline.detokenize(parse_request(DetokenizeRequest, request))

    async def _generate(self, request: OpenAIRequest, ctx: RequestContext) -> AsyncIterator[StreamItem]:
        async with contextlib.aclosing(self._pipeline.generate(request, ctx.request_id)) as items:
            async for item in items:
                yield item
