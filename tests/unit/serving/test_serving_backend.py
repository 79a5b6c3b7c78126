"""The Frontend's backend: /v1/models from the fleet's model records."""

from __future__ import annotations

from typing import Any, cast

import msgspec

from app.openai.backend import ModelCard
from app.protocol import ModelInfo, ModelRecord
from app.runtime.discovery import ModelsWatch
from app.serving.backend import FleetBackend, Processing


class _Models:
    """ModelsWatch's `.models`, set by the test."""

    def __init__(self, models: dict[str, list[ModelRecord]]) -> None:
        self.models = models


def _record(name: str, instance_id: str, max_model_len: int) -> ModelRecord:
    """As a worker registers it: its ModelInfo as builtins."""
    info = ModelInfo(name=name, max_model_len=max_model_len, block_size=16, model_path=f"/models/{name}")
    metadata = msgspec.to_builtins(info)
    return ModelRecord(name=name, instance_id=instance_id, service="VllmWorker", endpoint="generate", metadata=metadata)


class _NoProcessing:
    def generate(self, *args: Any) -> Any:
        raise NotImplementedError

    async def tokenize(self, request: Any) -> Any:
        raise NotImplementedError

    async def detokenize(self, request: Any) -> str:
        raise NotImplementedError


def _backend(models: dict[str, list[ModelRecord]], only_model: str | None = None) -> FleetBackend:
    processing: Processing = _NoProcessing()
    return FleetBackend(cast(ModelsWatch, _Models(models)), processing, only_model)


def test_a_models_length_is_its_shortest_workers() -> None:
    backend = _backend({"tiny": [_record("tiny", "a", 4096), _record("tiny", "b", 2048)], "gone": []})
    assert backend.list_models() == [ModelCard(id="tiny", max_model_len=2048, root="/models/tiny")]
    assert backend.is_ready()


def test_served_model_name_limits_the_list() -> None:
    backend = _backend({"tiny": [_record("tiny", "a", 64)], "other": [_record("other", "b", 64)]}, only_model="other")
    assert [card.id for card in backend.list_models()] == ["other"]
    assert not _backend({}).is_ready()
