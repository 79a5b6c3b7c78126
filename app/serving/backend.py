"""What the HTTP layer serves from: the models the fleet's workers registered, and the text
pipeline's work (generation, /tokenize, /detokenize) by a request pipeline in this process
or by Processor services over NATS."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

from app.openai.backend import ModelCard, RequestKind, Tokenized
from app.openai.schema import DetokenizeRequest, OpenAIRequest, TokenizeRequest
from app.protocol import ModelRecord, StreamItem
from app.runtime import EndpointClient
from app.runtime.discovery import ModelsWatch
from app.serving.pipeline import RequestPipeline


class Processing(Protocol):
    """The Processor's work for the HTTP layer. Implementations: `LocalProcessing` (the
    pipeline in this process, `embed-processor`) and `RemoteProcessing` (the Processor
    services' endpoints)."""

    def generate(self, kind: RequestKind, request: OpenAIRequest, request_id: str) -> AsyncIterator[StreamItem]: ...

    async def tokenize(self, request: TokenizeRequest) -> Tokenized: ...

    async def detokenize(self, request: DetokenizeRequest) -> str: ...

    def is_ready(self) -> bool:
        """Whether it can serve generation now, models aside."""


class FleetBackend:
    """app.openai's Backend: models from etcd's model records, the rest by `processing`.

    It serves (lists, and admits requests for) the models its one pipeline can preprocess:
    `served_model_name` where set, else those whose workers read their tokenizer and chat
    template where the pipeline does (`pipeline_model`, the Processor section's `model`,
    equal to the model record's `model_path` or to its name; None: every model). A request
    for another model of the namespace is a 404 that names these (app/openai/app.py): its
    text would be tokenized for a model it is not.
    """

    def __init__(
        self,
        models: ModelsWatch,
        processing: Processing,
        served_model_name: str | None,
        pipeline_model: str | None = None,
    ) -> None:
        self._models = models
        self._processing = processing
        self.generate = processing.generate
        self.tokenize = processing.tokenize
        self.detokenize = processing.detokenize
        self._served_model_name = served_model_name
        self._pipeline_model = pipeline_model

    def _serves(self, name: str, records: list[ModelRecord]) -> bool:
        if self._served_model_name is not None:
            return name == self._served_model_name
        if self._pipeline_model is None:
            return True
        return name == self._pipeline_model or any(
            record.metadata.get("model_path") == self._pipeline_model for record in records
        )

    def list_models(self) -> list[ModelCard]:
        cards = []
        for name, records in self._models.models.items():
            if not records or not self._serves(name, records):
                continue
            # A request may go to any of the workers: it must fit the shortest of them.
            max_model_len = min(int(record.metadata.get("max_model_len", 0)) for record in records)
            root = records[0].metadata.get("model_path") or None
            cards.append(ModelCard(id=name, max_model_len=max_model_len, root=root))
        return cards

    def is_ready(self) -> bool:
        """/health: a worker serves a model of ours, and the pipeline can route to it (an
        embedded router replica that could not start yet cannot)."""
        return bool(self.list_models()) and self._processing.is_ready()


class LocalProcessing:
    """The request pipeline in this process."""

    def __init__(self, pipeline: RequestPipeline) -> None:
        self._pipeline = pipeline
        self.tokenize = pipeline.tokenize
        self.detokenize = pipeline.detokenize

    def generate(self, kind: RequestKind, request: OpenAIRequest, request_id: str) -> AsyncIterator[StreamItem]:
        return self._pipeline.generate(request, request_id)

    def is_ready(self) -> bool:
        return self._pipeline.is_ready()


class RemoteProcessing:
    """The Processor services, over NATS: each of their endpoints gets the request body as it came."""

    def __init__(
        self, chat: EndpointClient, completions: EndpointClient, tokenize: EndpointClient, detokenize: EndpointClient
    ) -> None:
        self._generators = {"chat": chat, "completion": completions}
        self._tokenize = tokenize
        self._detokenize = detokenize

    def is_ready(self) -> bool:
        # The Processors' own routing is theirs to answer for: a request that reaches one
        # that cannot route gets its 503.
        return True

    async def generate(self, kind: RequestKind, request: OpenAIRequest, request_id: str) -> AsyncIterator[StreamItem]:
        stream = self._generators[kind].stream(
            request.model_dump(exclude_unset=True, by_alias=True), response_type=StreamItem, request_id=request_id
        )
        async with contextlib.aclosing(stream) as items:
            async for item in items:
                yield item

    async def tokenize(self, request: TokenizeRequest) -> Tokenized:
        reply = await self._tokenize.call(request.model_dump(exclude_unset=True, by_alias=True))
        return Tokenized(reply["tokens"], reply["token_strs"])

    async def detokenize(self, request: DetokenizeRequest) -> str:
        text: str = await self._detokenize.call(request.model_dump(exclude_unset=True, by_alias=True))
        return text
