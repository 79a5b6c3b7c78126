"""Engine registry: a worker's `engine:` config key picks one of these.

Factories import lazily so that a mocker-only process never imports vLLM (6 s, 3 GB).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.engines.base import Engine, EngineStats


def _vllm(section: dict[str, Any]) -> Engine:
    from app.engines.vllm import VllmEngine

    return VllmEngine.from_config(section)


def _mocker(section: dict[str, Any]) -> Engine:
    from app.engines.mocker import MockerEngine

    return MockerEngine.from_config(section)


ENGINES: dict[str, Callable[[dict[str, Any]], Engine]] = {
    "vllm": _vllm,
    "mocker": _mocker,
}


def engine_arg_names(name: str) -> frozenset[str]:
    """The engine-specific keys a worker's config section may carry (snake_case).

    The config loader uses this to reject a misspelt key with its name instead of
    passing it silently to an engine that would ignore it.
    """
    if name == "vllm":
        import dataclasses

        from vllm.engine.arg_utils import AsyncEngineArgs

        return frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))
    if name == "mocker":
        from app.engines.mocker import MockerEngine

        return MockerEngine.ARG_NAMES
    raise ValueError(f"unknown engine {name!r}; known: {', '.join(sorted(ENGINES))}")


def create_engine(name: str, section: dict[str, Any]) -> Engine:
    try:
        factory = ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(sorted(ENGINES))}") from None
    return factory(section)


__all__ = ["ENGINES", "Engine", "EngineStats", "create_engine", "engine_arg_names"]
