"""Resolving `module:Service` addresses and the set of services a graph runs."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from types import ModuleType

from app.sdk.service import LINKS, SERVICES, ServiceSpec, is_service, spec_of

# Short module prefixes of the seed's commands (`graphs.agg_router`, `components.worker`).
_SHORT_PREFIXES = ("graphs", "components")


class GraphError(ValueError):
    """A graph address or --service-name that does not resolve; the message says why."""


def import_module(name: str) -> ModuleType:
    """Import `graphs.X` / `components.X` from the app package, anything else as given.

    The working directory is importable, as it is for `python -m`, so a graph module that
    lives next to the operator's config (or a test's service module) resolves too.
    """
    if name.split(".", 1)[0] in _SHORT_PREFIXES:
        name = f"app.{name}"
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and name.startswith(exc.name):
            raise GraphError(f"no module named {name!r}") from exc
        raise


def resolve(address: str) -> tuple[ModuleType, ServiceSpec]:
    """`module:Service` -> (the module, the service's spec)."""
    module_name, sep, attr = address.partition(":")
    if not sep or not module_name or not attr:
        raise GraphError(f"expected MODULE:Service, got {address!r}")
    module = import_module(module_name)
    obj = getattr(module, attr, None)
    if obj is None:
        raise GraphError(f"module {module.__name__} has no {attr!r}")
    if not is_service(obj):
        raise GraphError(f"{module.__name__}:{attr} is not a service (decorate it with @service)")
    return module, spec_of(obj)


def graph_services(module: ModuleType, entry: ServiceSpec, service_name: str | None = None) -> list[ServiceSpec]:
    """The services to run, entry first.

    The links the module declares, followed from the entry, define the graph. A module that
    links nothing from the entry (a component module) runs the entry and its depends(),
    transitively. `service_name` narrows the result to that one service.
    """
    edges: dict[type, list[type]] = {}
    for source, target in LINKS.get(module.__name__, []):
        edges.setdefault(source, []).append(target)
    linked = entry.cls in edges
    order: list[type] = [entry.cls]
    for cls in order:  # grows while iterating: a breadth-first walk
        for nxt in edges.get(cls, []) if linked else spec_of(cls).dependencies.values():
            if nxt not in order:
                order.append(nxt)
    services = [spec_of(cls) for cls in order]
    if service_name is None:
        return services
    for spec in services:
        if spec.name == service_name:
            return [spec]
    for obj in vars(module).values():
        if is_service(obj) and spec_of(obj).name == service_name:
            return [spec_of(obj)]
    known = ", ".join(s.name for s in services)
    raise GraphError(f"--service-name {service_name!r} is not in the graph of {entry.name} ({known})")


def dependency_names(spec: ServiceSpec) -> frozenset[str]:
    """The service and every service its depends() reach, transitively."""
    order = [spec.cls]
    for cls in order:
        order += [nxt for nxt in spec_of(cls).dependencies.values() if nxt not in order]
    return frozenset(spec_of(cls).name for cls in order)


def graph_service_names(address: str) -> frozenset[str]:
    """The names of the services the graph at `address` runs (a service alone: it and its
    depends(), transitively), so that a service knows which of its dependencies exist."""
    module, entry = resolve(address)
    return frozenset(spec.name for spec in graph_services(module, entry))


def import_components() -> dict[str, ServiceSpec]:
    """Import every module of app.components so that all their services are known by name."""
    import app.components

    for info in pkgutil.iter_modules(app.components.__path__):
        importlib.import_module(f"app.components.{info.name}")
    return SERVICES
