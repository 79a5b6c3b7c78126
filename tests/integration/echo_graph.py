"""Two small services for the `tandem serve` integration test: Greeter calls Echo."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from pydantic import BaseModel, ConfigDict

from app import env
from app.sdk import Service, ServiceContext, depends, endpoint, on_shutdown, on_start, service

log = logging.getLogger(__name__)

# Request ids of `count` streams whose generator was closed, for in-process tests.
FINISHED_COUNTS: list[str] = []


class CountRequest(msgspec.Struct):
    upto: int


class TickRequest(msgspec.Struct):
    times: int
    every_s: float


class EchoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prefix: str = ""


@service(config=EchoConfig)
class Echo(Service):
    config: EchoConfig
    ctx: ServiceContext

    @endpoint
    async def echo(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        for word in request["text"].split():
            yield {
                "word": self.config.prefix + word,
                "replica": self.ctx.replica,
                "devices": env.CUDA_VISIBLE_DEVICES.get(),
            }

    @endpoint(request=CountRequest)
    async def count(self, request: CountRequest, ctx: Any) -> AsyncIterator[int]:
        try:
            for n in range(request.upto):
                yield n
                await asyncio.sleep(0)
        finally:
            FINISHED_COUNTS.append(ctx.request_id)

    @endpoint(request=TickRequest)
    async def tick(self, request: TickRequest) -> AsyncIterator[int]:
        """A slow stream, for drain tests: `times` items, `every_s` apart."""
        for n in range(request.times):
            await asyncio.sleep(request.every_s)
            yield n

    @on_shutdown
    async def say_goodbye(self) -> None:
        log.info("shutdown hook ran")


class GreeterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    greeting: str = "hello"


@service(config=GreeterConfig)
class Greeter(Service):
    config: GreeterConfig
    echo = depends(Echo)

    @on_start
    async def check_config(self) -> None:
        log.info("greeting with %r", self.config.greeting)

    @endpoint
    async def greet(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for item in self.echo.echo.stream({"text": f"{self.config.greeting} {request['name']}"}):
            yield item


Greeter.link(Echo)


@service
class SlowStart(Service):
    """Starts as a large model's engine loads: a minute in a thread nothing can cancel."""

    @on_start
    async def load(self) -> None:
        log.info("loading")
        await asyncio.to_thread(time.sleep, 60)

    @endpoint
    async def never(self, request: dict[str, Any]) -> AsyncIterator[str]:
        yield "loaded"
