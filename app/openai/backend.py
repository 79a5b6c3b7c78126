"""What the HTTP layer needs from whoever generates: the Processor, across NATS or in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, Protocol

import msgspec

from app.openai.schema import OpenAIRequest
from app.protocol import StreamItem

RequestKind = Literal["chat", "completion"]


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    max_model_len: int
    created: int = 0
    owned_by: str = "tandem"


class Backend(Protocol):
    def list_models(self) -> list[ModelCard]:
        """Models that can be served now (cheap: called on every request)."""

    def is_ready(self) -> bool:
        """Whether at least one model has a worker able to serve it."""

    def generate(self, kind: RequestKind, request: OpenAIRequest, request_id: str) -> AsyncIterator[StreamItem]:
        """Stream the response; closing the iterator must cancel the request end to end.

        The first item should carry `worker_id`. Raise an OpenAIError (or a runtime error
        that `to_openai_error` maps) for failures, before or after the first item.
        """
