"""Service declarations: @service, @endpoint, depends(), lifecycle hooks and .link().

A decorated class carries a `ServiceSpec` describing what the runner must serve; the class
itself stays a plain Python class that the runner instantiates once per process.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from pydantic import BaseModel, ConfigDict

_SPEC_ATTR = "__tandem_service__"
_ENDPOINT_ATTR = "__tandem_endpoint__"
_HOOK_ATTR = "__tandem_hook__"

C = TypeVar("C", bound=type)
F = TypeVar("F", bound=Callable[..., Any])


class EmptyConfig(BaseModel):
    """The config of a service that declares none: its section must be empty."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    method_name: str
    request_type: type | None
    # Whether the method takes the runtime's RequestContext after the request.
    wants_context: bool


@dataclass
class ServiceSpec:
    name: str
    cls: type
    config_model: type[BaseModel]
    endpoints: dict[str, EndpointSpec] = field(default_factory=dict)
    dependencies: dict[str, type] = field(default_factory=dict)  # attribute name -> service class
    on_start: list[str] = field(default_factory=list)  # method names, base classes first
    on_shutdown: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        """`module:Class`, importable by a fresh process."""
        return f"{self.cls.__module__}:{self.cls.__qualname__}"


# Every service class defined so far, by service name (config sections are checked against it).
SERVICES: dict[str, ServiceSpec] = {}

# Links declared by each module: module name -> edges (from, to). Kept per module so that
# importing two graph modules into one process does not merge their graphs.
LINKS: dict[str, list[tuple[type, type]]] = {}


def spec_of(cls: type) -> ServiceSpec:
    spec = cls.__dict__.get(_SPEC_ATTR)
    if spec is None:
        raise TypeError(f"{cls.__qualname__} is not a service (decorate it with @service)")
    return spec


def is_service(obj: object) -> bool:
    return isinstance(obj, type) and _SPEC_ATTR in obj.__dict__


class Link:
    """The tail of a `A.link(B).link(C)` chain; each `.link` records one edge."""

    def __init__(self, module: str, service: type) -> None:
        self._module = module
        self.service = service

    def link(self, target: type) -> Link:
        spec_of(target)
        LINKS.setdefault(self._module, []).append((self.service, target))
        return Link(self._module, target)


class Service:
    """Base of the service classes: `A.link(B)` declares an edge of the graph of the module that calls it."""

    @classmethod
    def link(cls, target: type) -> Link:
        # The edge belongs to the module whose top level wrote `A.link(B)`.
        module = sys._getframe(1).f_globals.get("__name__", "__main__")
        return Link(module, cls).link(target)


@overload
def service(cls: C, /) -> C: ...


@overload
def service(*, config: type[BaseModel] | None = None, name: str | None = None) -> Callable[[C], C]: ...


def service(
    cls: C | None = None, *, config: type[BaseModel] | None = None, name: str | None = None
) -> C | Callable[[C], C]:
    """Declare a service. `config` is the pydantic model of its YAML section."""

    def decorate(target: C) -> C:
        spec = ServiceSpec(name=name or target.__name__, cls=target, config_model=config or EmptyConfig)
        for klass in reversed(target.__mro__):
            for attr, value in vars(klass).items():
                if isinstance(value, depends):
                    spec.dependencies[attr] = value.target
                ep = getattr(value, _ENDPOINT_ATTR, None)
                if ep is not None:
                    spec.endpoints[ep.name] = ep
                hook = getattr(value, _HOOK_ATTR, None)
                if hook == "start" and attr not in spec.on_start:
                    spec.on_start.append(attr)
                elif hook == "shutdown" and attr not in spec.on_shutdown:
                    spec.on_shutdown.append(attr)
        setattr(target, _SPEC_ATTR, spec)
        SERVICES[spec.name] = spec
        return target

    return decorate(cls) if cls is not None else decorate


@overload
def endpoint(fn: F, /) -> F: ...


@overload
def endpoint(*, request: type | None = None) -> Callable[[F], F]: ...


def endpoint(fn: F | None = None, *, request: type | None = None) -> F | Callable[[F], F]:
    """Serve an async-generator method as endpoint `<method name>` of the service.

    `request=T` makes the runtime decode the payload to T; otherwise the method gets builtins.
    The method is `(self, request)` or `(self, request, ctx)` with the runtime's RequestContext.
    """

    def decorate(method: F) -> F:
        if not inspect.isasyncgenfunction(method):
            raise TypeError(f"@endpoint {method.__qualname__} must be an async generator (use yield)")
        params = list(inspect.signature(method).parameters)
        if len(params) not in (2, 3):
            raise TypeError(f"@endpoint {method.__qualname__} must take (self, request) or (self, request, ctx)")
        setattr(
            method,
            _ENDPOINT_ATTR,
            EndpointSpec(method.__name__, method.__name__, request, wants_context=len(params) == 3),
        )
        return method

    return decorate(fn) if fn is not None else decorate


def on_start(fn: F) -> F:
    """Run `await self.<fn>()` after config and runtime are injected, before serving."""
    setattr(fn, _HOOK_ATTR, "start")
    return fn


def on_shutdown(fn: F) -> F:
    """Run `await self.<fn>()` after the endpoints stopped and drained."""
    setattr(fn, _HOOK_ATTR, "shutdown")
    return fn


class DependencyClients:
    """`self.<dep>.<endpoint>`: the runtime's EndpointClient for that service's endpoint."""

    def __init__(self, runtime: Any, target: ServiceSpec) -> None:
        self._runtime = runtime
        self._target = target
        self._clients: dict[str, Any] = {}

    def __getattr__(self, endpoint_name: str) -> Any:
        if endpoint_name.startswith("_"):
            raise AttributeError(endpoint_name)
        if endpoint_name not in self._target.endpoints:
            raise AttributeError(f"service {self._target.name} has no endpoint {endpoint_name!r}")
        client = self._clients.get(endpoint_name)
        if client is None:
            client = self._clients[endpoint_name] = self._runtime.client(self._target.name, endpoint_name)
        return client


class depends:  # noqa: N801 - reads as a declaration: `worker = depends(VllmWorker)`
    """Declare that a service calls another; on an instance, gives its endpoint clients."""

    def __init__(self, target: type) -> None:
        spec_of(target)
        self.target = target
        self._attr = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._attr = name

    def __get__(self, instance: Any, owner: type) -> Any:
        if instance is None:
            return self
        cache_key = f"_tandem_dep_{self._attr}"
        clients = instance.__dict__.get(cache_key)
        if clients is None:
            runtime = instance.__dict__.get("runtime")
            if runtime is None:
                raise RuntimeError(f"{type(instance).__qualname__}.{self._attr} used before the runtime was injected")
            clients = instance.__dict__[cache_key] = DependencyClients(runtime, spec_of(self.target))
        return clients
