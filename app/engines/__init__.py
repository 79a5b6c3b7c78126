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


def create_engine(name: str, section: dict[str, Any]) -> Engine:
    try:
        factory = ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(sorted(ENGINES))}") from None
    return factory(section)


__all__ = ["ENGINES", "Engine", "EngineStats", "create_engine"]
