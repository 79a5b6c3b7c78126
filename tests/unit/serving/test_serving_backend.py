"""The Frontend's backend: /v1/models from the fleet's model records."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import msgspec

from app.openai.backend import ModelCard
from app.openai.schema import ChatCompletionRequest, parse_request
from app.protocol import ModelInfo, ModelRecord, StreamItem
from app.runtime.discovery import ModelsWatch
from app.serving.backend import FleetBackend, Processing, RemoteProcessing


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
    ready = True

    def generate(self, *args: Any) -> Any:
        raise NotImplementedError

    async def tokenize(self, request: Any) -> Any:
        raise NotImplementedError

    async def detokenize(self, request: Any) -> str:
        raise NotImplementedError

    def is_ready(self) -> bool:
        return self.ready


def _backend(
    models: dict[str, list[ModelRecord]], only_model: str | None = None, pipeline_model: str | None = None
) -> FleetBackend:
    processing: Processing = _NoProcessing()
    return FleetBackend(cast(ModelsWatch, _Models(models)), processing, only_model, pipeline_model)


def test_a_models_length_is_its_shortest_workers() -> None:
    backend = _backend({"tiny": [_record("tiny", "a", 4096), _record("tiny", "b", 2048)], "gone": []})
    assert backend.list_models() == [ModelCard(id="tiny", max_model_len=2048, root="/models/tiny")]
    assert backend.is_ready()


def test_it_is_not_ready_while_its_pipeline_cannot_route() -> None:
    """/health: an embedded router replica that has not started is no Frontend to send to."""
    backend = _backend({"tiny": [_record("tiny", "a", 64)]})
    processing = backend._processing
    assert isinstance(processing, _NoProcessing)
    processing.ready = False
    assert backend.list_models() and not backend.is_ready()


def test_served_model_name_limits_the_list() -> None:
    backend = _backend({"tiny": [_record("tiny", "a", 64)], "other": [_record("other", "b", 64)]}, only_model="other")
    assert [card.id for card in backend.list_models()] == ["other"]
    assert not _backend({}).is_ready()


def test_without_a_served_model_name_it_serves_the_models_its_pipeline_reads() -> None:
    # Two models of the namespace from one tokenizer, a third from another: this Frontend's
    # pipeline (its Processor section's model) can preprocess the first two only.
    tiny, again = _record("tiny", "a", 64), _record("tiny-v2", "b", 64)
    again.metadata["model_path"] = tiny.metadata["model_path"]
    models = {"tiny": [tiny], "tiny-v2": [again], "other": [_record("other", "c", 64)]}
    backend = _backend(models, pipeline_model="/models/tiny")
    assert [card.id for card in backend.list_models()] == ["tiny", "tiny-v2"]
    # A Processor section that names the model as its workers registered it (a hub id).
    assert [card.id for card in _backend(models, pipeline_model="other").list_models()] == ["other"]
    assert not _backend(models, pipeline_model="/models/elsewhere").is_ready()


class _Endpoint:
    """A Processor endpoint's client: records each payload as it crosses NATS (msgpack), and
    answers with `items` decoded as the runtime decodes them (`response_type`)."""

    def __init__(self, items: list[StreamItem]) -> None:
        self.items = items
        self.payloads: list[dict[str, Any]] = []

    async def stream(self, payload: Any, *, response_type: type, **_: Any) -> AsyncIterator[Any]:
        self.payloads.append(msgspec.msgpack.decode(msgspec.msgpack.encode(payload)))
        for item in self.items:
            yield msgspec.msgpack.decode(msgspec.msgpack.encode(item), type=response_type)


async def test_a_thin_frontend_forwards_n_and_gets_each_items_choice_back() -> None:
    chat = _Endpoint([StreamItem(text="a"), StreamItem(text="b", index=2, completion_tokens=1, finish_reason="stop")])
    unused = _Endpoint([])
    processing = RemoteProcessing(chat, unused, unused, unused)  # type: ignore[arg-type]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 3, "temperature": 0.5}
    items = [item async for item in processing.generate("chat", parse_request(ChatCompletionRequest, body), "r1")]
    # The Processor service parses what arrives: the same n.
    assert parse_request(ChatCompletionRequest, chat.payloads[0]).num_choices() == 3
    assert [(item.index, item.text) for item in items] == [(0, "a"), (2, "b")]
