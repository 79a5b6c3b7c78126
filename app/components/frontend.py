"""Frontend: the OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the Processor.

By default the Frontend runs the Processor's pipeline in its own process (configured by
the Processor section of the same file): a token then crosses one process boundary
between worker and client instead of two. `embed-processor: false` calls the Processor
services over NATS instead, for frontends that must stay thin.

With `embed-router: true` the Frontend is also a Router replica (configured by the Router
section): it builds the KV index from the fleet's events and routes each request in
process, as Dynamo's frontend does, and `tandem serve` starts no Router processes. Several
Frontends then share their placements like Router replicas do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.components.kv_router import FleetRouter, Router, RouterConfig
from app.components.processor import Processor, ProcessorConfig, RequestPipeline
from app.components.worker import VllmWorker
from app.openai import create_app
from app.openai.backend import ModelCard, RequestKind
from app.openai.metrics import FrontendMetrics
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
    embed_router: bool = Field(
        default=False,
        description="route in this process (a Router replica configured by the Router section) instead of "
        "calling Router services over NATS; the graph's Router processes are then not started",
    )
    max_inflight_requests: int | None = Field(
        default=None, ge=1, description="past this many requests in flight, answer 429 with Retry-After"
    )

    @model_validator(mode="after")
    def _router_needs_pipeline(self) -> FrontendConfig:
        if self.embed_router and not self.embed_processor:
            raise ValueError("embed-router needs embed-processor: the routing happens in the Processor pipeline")
        return self

    def embedded_services(self) -> set[str]:
        """Services of the graph this Frontend stands in for, so that `tandem serve` skips them.

        Only the Router: an idle Router replica would still ingest every KV event of the
        fleet. The Processor service stays up under `embed-processor` (it idles at no cost,
        and Frontends that set `embed-processor: false` call it).
        """
        return {spec_of(Router).name} if self.embed_router else set()


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

    def __init__(self) -> None:
        self._pipeline: RequestPipeline | None = None

    @on_start
    async def start(self) -> None:
        models = await self.runtime.discovery.watch_models()
        metrics = FrontendMetrics()
        if self.config.embed_processor:
            processor_config = self.ctx.config.service_config(spec_of(Processor))
            assert isinstance(processor_config, ProcessorConfig)
            workers = self.runtime.client(spec_of(VllmWorker).name, "generate")
            embedded_router = None
            if self.config.embed_router:
                router_config = self.ctx.config.service_config(spec_of(Router))
                assert isinstance(router_config, RouterConfig)
                embedded_router = FleetRouter(
                    self.runtime, router_config, workers, self.ctx.replica, registry=metrics.registry
                )
            pipeline = RequestPipeline(
                processor_config,
                self.runtime,
                self.runtime.client(spec_of(Router).name, "route"),
                workers,
                embedded_router,
            )
            await pipeline.start()
            self._pipeline = pipeline

            def generate(kind: RequestKind, request: OpenAIRequest, request_id: str) -> AsyncIterator[StreamItem]:
                return pipeline.generate(request, request_id)
        else:
            generate = remote_processor(self.processor.chat_completions, self.processor.completions)
        backend = FleetBackend(models, generate, self.config.served_model_name)
        app = create_app(backend, metrics=metrics, max_inflight=self.config.max_inflight_requests)
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
        if self._pipeline is not None:
            await self._pipeline.close()
