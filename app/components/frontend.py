"""Frontend: the OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the pipeline.

By default the Frontend runs the request pipeline in its own process (configured by the
Processor section of the same file): a token then crosses one process boundary between
worker and client instead of two. `embed-processor: false` calls the Processor services
over NATS instead, for frontends that must stay thin: /tokenize and /detokenize too, so
that such a Frontend loads no tokenizer (nor transformers) and needs no model files.

In a graph with a Router the Frontend is by default also the router replica (configured by
the Router section): it builds the KV index from the fleet's events and routes each request
in process, as Dynamo's frontend does, and `tandem serve` starts no Router processes.
Several Frontends then share their placements like Router replicas do. A config that asks
for Router processes gets them instead (`FrontendConfig.routes_in_process`).

With API keys (`api-keys`, `api-keys-file`, TANDEM_API_KEYS, TANDEM_API_KEYS_FILE; read
once at start) every route but /health and /live needs one, and a key's own limits admit
its generation requests (app/openai/auth.py, app/openai/limits.py, docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.aio import end_on_exit
from app.components.processor import Processor
from app.openai import create_app
from app.openai.app import DEFAULT_REQUEST_TIMEOUT_S
from app.openai.auth import ApiKey, ApiKeyError, ApiKeyItem, ApiKeys, KeyLimits, load_api_keys
from app.openai.metrics import FrontendMetrics
from app.openai.server import ConnectionLimits, make_server
from app.protocol import names
from app.router.config import RouterConfig, router_replica
from app.runtime import Runtime
from app.sdk import (
    ConfigError,
    GraphConfig,
    Service,
    ServiceContext,
    depends,
    drain_budget_s,
    on_shutdown,
    on_start,
    service,
)
from app.serving import PipelineConfig, RequestPipeline, create_picker
from app.serving.backend import FleetBackend, LocalProcessing, Processing, RemoteProcessing

log = logging.getLogger(__name__)


class FrontendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    served_model_name: str | None = Field(
        default=None,
        description="the model this Frontend serves (the name its workers registered); default: every model "
        "whose workers read the Processor section's model (their model path or name)",
    )
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=1, le=65535)
    embed_processor: bool = Field(
        default=True, description="run the Processor pipeline in this process instead of calling Processor over NATS"
    )
    embed_router: bool | None = Field(
        default=None,
        description="route in this process (a router replica configured by the Router section) instead of "
        "calling Router processes over NATS; the graph's Router processes are then not started. Default: "
        "true, unless the Router section asks for replicas (ServiceArgs.workers: 2 or more) or "
        "embed-processor is false",
    )
    max_inflight_requests: int | None = Field(
        default=None, ge=1, description="past this many requests in flight, answer 429 with Retry-After"
    )
    # API keys (docs/security.md); TANDEM_API_KEYS and TANDEM_API_KEYS_FILE add to these.
    api_keys: list[ApiKeyItem] | None = Field(
        default=None,
        min_length=1,
        description="keys clients send as `Authorization: Bearer KEY`: strings, or {key, max-inflight, "
        "requests-per-minute} mappings; unset (and no key from the environment): no key needed",
    )
    api_keys_file: str | None = Field(default=None, description="a file of more API keys, one a line (# comments)")
    api_key_limits: KeyLimits = Field(
        default_factory=KeyLimits,
        description="{max-inflight, requests-per-minute}: the limits of each API key that does not set its own",
    )
    metrics_auth: bool = Field(default=False, description="/metrics needs an API key too")
    # What one client connection may hold (app/openai/server.py ConnectionLimits).
    max_connections: int | None = Field(
        default=ConnectionLimits.max_connections, ge=1, description="past this many open connections, answer 503"
    )
    header_timeout_s: float = Field(
        default=ConnectionLimits.header_timeout_s, gt=0, description="a request's headers must arrive within this"
    )
    body_timeout_s: float = Field(
        default=ConnectionLimits.body_timeout_s, gt=0, description="a request's body must arrive within this"
    )
    write_stall_timeout_s: float = Field(
        default=ConnectionLimits.write_stall_timeout_s,
        gt=0,
        description="a client that reads none of its response for this long is dropped and its request cancelled",
    )
    request_timeout_s: float = Field(
        default=DEFAULT_REQUEST_TIMEOUT_S,
        gt=0,
        description="a generation request not done within this ends with 504 (an in-stream error once its "
        "stream has begun) and its engine work is cancelled",
    )

    @model_validator(mode="after")
    def _router_needs_pipeline(self) -> FrontendConfig:
        if self.embed_router and not self.embed_processor:
            raise ValueError("embed-router needs embed-processor: the routing happens in the request pipeline")
        return self

    def routes_in_process(self, config: GraphConfig, graph: Collection[str]) -> bool:
        """Whether this Frontend is the router replica of `graph` (service names) rather than
        calling its Router processes over NATS: the one place that decides where the routing
        runs, for `tandem serve` (which then starts no Router) and the Frontend alike.

        In process by default: no NATS round trip per request, and the request path's CPU
        per request divided by about 1.7 (docs/benchmarks.md). The whole `config` decides,
        not this section alone, because a config asks for Router processes in three ways:
        `embed-router: false`; Router replicas (`ServiceArgs.workers` of 2 or more in the
        Router section; 1, the default count, is the one replica this Frontend is); or
        `embed-processor: false` (the routing happens in the pipeline, which then runs in the
        Processor processes). A graph without a Router spreads.
        """
        if self.embed_router is not None:
            return self.embed_router
        replicas = config.service_args(names.ROUTER).workers
        return names.ROUTER in graph and self.embed_processor and replicas == 1

    def embedded_services(self, config: GraphConfig, graph: Collection[str]) -> set[str]:
        """Services of `graph` this Frontend stands in for, so that `tandem serve` skips them.

        Only the Router: an idle Router replica would still ingest every KV event of the
        fleet. The Processor service stays up under `embed-processor` (it idles at no cost,
        and Frontends that set `embed-processor: false` call it).
        """
        return {names.ROUTER} if self.routes_in_process(config, graph) else set()


def _described(key: ApiKey) -> str:
    limits = key.limits
    return f"{key.key_id} (max-inflight {limits.max_inflight}, requests-per-minute {limits.requests_per_minute})"


@service(config=FrontendConfig)
class Frontend(Service):
    config: FrontendConfig
    runtime: Runtime
    ctx: ServiceContext
    processor = depends(Processor)

    def __init__(self) -> None:
        self._pipeline: RequestPipeline | None = None
        self._stopping = False  # set by our shutdown: uvicorn's serve() may end now

    @on_start
    async def start(self) -> None:
        api_keys = self._api_keys()  # first: a bad key source stops the start before anything runs
        models = await self.runtime.discovery.watch_models()
        metrics = FrontendMetrics()
        processing: Processing
        if self.config.embed_processor:
            self._pipeline = self._embedded_pipeline(metrics)
            await self._pipeline.start()
            processing = LocalProcessing(self._pipeline)
        else:
            processor = self.processor
            processing = RemoteProcessing(
                processor.chat_completions, processor.completions, processor.tokenize, processor.detokenize
            )
        backend = FleetBackend(models, processing, self.config.served_model_name, self._pipeline_model())
        app = create_app(
            backend,
            metrics=metrics,
            max_inflight=self.config.max_inflight_requests,
            api_keys=api_keys,
            metrics_auth=self.config.metrics_auth,
            request_timeout_s=self.config.request_timeout_s,
        )
        # On SIGTERM the streams in flight finish within every service's drain budget.
        limits = ConnectionLimits(
            max_connections=self.config.max_connections,
            header_timeout_s=self.config.header_timeout_s,
            body_timeout_s=self.config.body_timeout_s,
            write_stall_timeout_s=self.config.write_stall_timeout_s,
        )
        self._server = make_server(
            app, self.config.host, self.config.port, graceful_shutdown_s=drain_budget_s(), limits=limits
        )
        # The service runner owns SIGTERM/SIGINT (it drains, then stops us); uvicorn must
        # not install its own handlers over the runner's.
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        self._serving = asyncio.create_task(self._server.serve(), name="uvicorn")
        while not self._server.started:
            if self._serving.done():
                self._serving.result()  # re-raises why uvicorn could not start (port in use, ...)
                raise RuntimeError(f"the HTTP server on port {self.config.port} stopped at start")
            await asyncio.sleep(0.05)
        # Once up, an HTTP server that stops before our shutdown asked it to would leave a
        # registered Frontend that answers nothing: the process leaves and is restarted.
        end_on_exit(self._serving, self.ctx.fail, unless=lambda: self._stopping)
        log.info("OpenAI API on http://%s:%d/v1", self.config.host, self.config.port)

    def _api_keys(self) -> ApiKeys | None:
        """The keys of every source; a ConfigError (one line in the log, no traceback) for one
        that cannot be used."""
        config = self.config
        try:
            keys = load_api_keys(config.api_keys, config.api_keys_file, config.api_key_limits)
        except ApiKeyError as exc:
            raise ConfigError([f"{names.FRONTEND}: {exc}"]) from None
        if keys is None:
            if config.metrics_auth:
                raise ConfigError([f"{names.FRONTEND}: metrics-auth: no API key is configured for /metrics to need"])
            log.info("no API keys: every route is open")
            return None
        # By key id only (docs/security.md): the keys themselves are never logged.
        log.info("%d API keys: %s", len(keys), ", ".join(_described(key) for key in keys))
        return keys

    def _pipeline_model(self) -> str | None:
        """One pipeline (tokenizer, chat template) per Frontend: it serves the model of its
        Processor section (docs/internals.md), which served-model-name names where set."""
        if self.config.served_model_name is not None:
            return None
        return self.ctx.config.section_config(names.PROCESSOR, PipelineConfig).model

    def _embedded_pipeline(self, metrics: FrontendMetrics) -> RequestPipeline:
        """The Processor section's pipeline, picking workers as this deployment does."""
        config = self.ctx.config.section_config(names.PROCESSOR, PipelineConfig)
        workers = self.runtime.client(names.VLLM_WORKER, names.GENERATE)
        replica = None
        if self.config.routes_in_process(self.ctx.config, self.ctx.graph):
            router_config = self.ctx.config.section_config(names.ROUTER, RouterConfig)
            replica = router_replica(self.runtime, router_config, workers, self.ctx.replica, registry=metrics.registry)
            # Said once: which layout a config gets is decided from more than this section.
            log.info("routing in this process: the router replica of the Router section")
        picker = create_picker(self.runtime, workers, graph=self.ctx.graph, spread=config.spread, replica=replica)
        return RequestPipeline(config, picker, workers, registry=metrics.registry)

    @on_shutdown
    async def stop(self) -> None:
        self._stopping = True
        self._server.should_exit = True
        await self._serving
        if self._pipeline is not None:
            await self._pipeline.close()
