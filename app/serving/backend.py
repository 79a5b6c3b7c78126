"""What the HTTP layer serves from: the models the fleet's workers registered, and
generation by a request pipeline in this process or by Processor services over NATS."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from app.openai.backend import ModelCard, RequestKind
from app.openai.schema import OpenAIRequest
from app.protocol import StreamItem
from app.runtime import EndpointClient
from app.runtime.discovery import ModelsWatch
from app.serving.pipeline import RequestPipeline

Generate = Callable[[RequestKind, OpenAIRequest, str], AsyncIterator[StreamItem]]


class FleetBackend:
    """app.openai's Backend: models from etcd's model records, generation by `generate`."""

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


def pipeline_generate(pipeline: RequestPipeline) -> Generate:
    def generate(kind: RequestKind, request: OpenAIRequest, request_id: str) -> AsyncIterator[StreamItem]:
        return pipeline.generate(request, request_id)

    return generate


def remote_processor_generate(chat: EndpointClient, completions: EndpointClient) -> Generate:
    """Generation by the Processor services (their chat_completions and completions endpoints)."""
    clients = {"chat": chat, "completion": completions}

    async def generate(kind: RequestKind, request: OpenAIRequest, request_id: str) -> AsyncIterator[StreamItem]:
        stream = clients[kind].stream(
            request.model_dump(exclude_unset=True), response_type=StreamItem, request_id=request_id
        )
        async with contextlib.aclosing(stream) as items:
            async for item in items:
                yield item

    return generate
