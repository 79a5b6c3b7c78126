"""Frontend: the OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the Processor.

By default the Frontend runs the Processor's pipeline in its own process (configured by
the Processor section of the same file): a token then crosses one process boundary
between worker and client instead of two. `embed-processor: false` calls the Processor
services over NATS instead, for frontends that must stay thin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel, ConfigDict, Field

from app.components.kv_router import Router
from app.components.processor import Processor, ProcessorConfig, RequestPipeline
from app.components.worker import VllmWorker
from app.openai import create_app
from app.openai.backend import ModelCard, RequestKind
from app.openai.schema import OpenAIRequest
from app.openai.server import make_server
from app.preprocess import StreamItem
from app.runtime import Runtime
from app.runtime.discovery import ModelsWatch
from app.runtime.requests import EndpointClient
from app.sdk import ServiceContext, depends, on_shutdown, on_start, service
from app.sdk.service import spec_of

log = logging.getLogger(__name__)


class FrontendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    served_model_name: str | None = Field(default=None, description="model name clients send; default: every model discovered")
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=1, le=65535)
    embed_processor: bool = Field(
        default=True, description="run the Processor pipeline in this process instead of calling Processor over NATS"
    )
    max_inflight_requests: int | None = Field(
        default=None, ge=1, description="past this many requests in flight, answer 429 with Retry-After"
    )


Generate = Callable[[RequestKind, OpenAIRequest, str], AsyncIterator[StreamItem]]


class FleetBackend:
    """The HTTP layer's Backend: models from etcd's model records, generation by a Processor
    (embedded or remote)."""

    def __init__(self, models: ModelsWatch, generate: Generate, only_model: str | None) -> None:
        self._models = models
        self.generate = generate
        self._only_model = only_model

    def list_models(self) -> list[ModelCard]:
        cards = []
        for name, records in self._models.models.items():
            if not records or (self._only_model is not None and name != self._only_model):
                continue
            cards.append(ModelCard(id=name, max_model_len=int(records[0].metadata.get("max_model_len", 0))))
        return cards

    def is_ready(self) -> bool:
        return bool(self.list_models())


def remote_processor(chat: EndpointClient, completions: EndpointClient) -> Generate:
    clients = {"chat": chat, "completion": completions}

    async def generate(kind: RequestKind, request: OpenAIRequest, request_id: str) -> AsyncIterator[StreamItem]:
        stream = clients[kind].stream(request.model_dump(exclude_unset=True), response_type=StreamItem, request_id=request_id)
        async with contextlib.aclosing(stream) as items:
            async for item in items:
                yield item

    return generate


@service(config=FrontendConfig)
class Frontend:
    config: FrontendConfig
    runtime: Runtime
    ctx: ServiceContext
    processor = depends(Processor)

    @on_start
    async def start(self) -> None:
        models = await self.runtime.discovery.watch_models()
        if self.config.embed_processor:
            processor_config = self.ctx.config.service_config(spec_of(Processor))
            assert isinstance(processor_config, ProcessorConfig)
            pipeline = RequestPipeline(
                processor_config,
                self.runtime,
                self.runtime.client(spec_of(Router).name, "route"),
                self.runtime.client(spec_of(VllmWorker).name, "generate"),
            )
            await pipeline.start()

            def generate(kind: RequestKind, request: OpenAIRequest, request_id: str) -> AsyncIterator[StreamItem]:
                return pipeline.generate(request, request_id)
        else:
            generate = remote_processor(self.processor.chat_completions, self.processor.completions)
        backend = FleetBackend(models, generate, self.config.served_model_name)
        app = create_app(backend, max_inflight=self.config.max_inflight_requests)
        self._server = make_server(app, self.config.host, self.config.port)
        # The service runner owns SIGTERM/SIGINT (it drains, then stops us); uvicorn must
        # not install its own handlers over the runner's.
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self._serving = asyncio.create_task(self._server.serve(), name="uvicorn")
        while not self._server.started:
            if self._serving.done():
                self._serving.result()  # re-raises why uvicorn could not start (port in use, ...)
                raise RuntimeError(f"the HTTP server on port {self.config.port} stopped at start")
            await asyncio.sleep(0.05)
        log.info("OpenAI API on http://%s:%d/v1", self.config.host, self.config.port)

    @on_shutdown
    async def stop(self) -> None:
        self._server.should_exit = True
        await self._serving
