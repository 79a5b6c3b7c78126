"""Service declarations: what @service collects for the runner."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

import pytest
from pydantic import BaseModel

from app.runtime import Runtime
from app.sdk import Service, depends, endpoint, on_shutdown, on_start, service
from app.sdk.service import LINKS, spec_of


class EchoConfig(BaseModel):
    greeting: str = "hi"


@service(config=EchoConfig, name="EchoSvc")
class Echo(Service):
    @endpoint(request=dict)
    async def echo(self, request: dict) -> AsyncIterator[dict]:
        yield request

    @endpoint
    async def echo_with_context(self, request: str, ctx: object) -> AsyncIterator[str]:
        yield request


@service
class Caller(Service):
    runtime: Runtime
    echo = depends(Echo)

    @on_start
    async def open(self) -> None: ...

    @on_shutdown
    async def close(self) -> None: ...


@service
class SpecialCaller(Caller):
    @on_start
    async def more(self) -> None: ...


Caller.link(Echo)


def test_service_collects_name_config_endpoints_and_hooks() -> None:
    spec = spec_of(Echo)
    assert (spec.name, spec.config_model, spec.address) == ("EchoSvc", EchoConfig, f"{__name__}:Echo")
    assert {name: (ep.request_type, ep.wants_context) for name, ep in spec.endpoints.items()} == {
        "echo": (dict, False),
        "echo_with_context": (None, True),
    }


def test_subclass_inherits_dependencies_and_runs_base_hooks_first() -> None:
    spec = spec_of(SpecialCaller)
    assert spec.dependencies == {"echo": Echo}
    assert (spec.on_start, spec.on_shutdown) == (["open", "more"], ["close"])


def test_links_are_recorded_under_the_declaring_module() -> None:
    assert (Caller, Echo) in LINKS[__name__]


def test_endpoint_must_be_an_async_generator() -> None:
    with pytest.raises(TypeError, match="must be an async generator"):

        @endpoint
        async def not_streaming(self, request: dict) -> dict:
            return request


def test_depends_names_the_missing_endpoint() -> None:
    caller = Caller()
    caller.runtime = cast(Runtime, object())  # never reached: the endpoint name is checked first
    with pytest.raises(AttributeError, match="service EchoSvc has no endpoint 'ehco'"):
        _ = caller.echo.ehco


def test_depends_before_injection_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="before the runtime was injected"):
        _ = Caller().echo.echo
