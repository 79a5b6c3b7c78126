"""What the HTTP layer needs from whoever generates: the Processor, across NATS or in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, NamedTuple, Protocol

import msgspec

from app.openai.schema import DetokenizeRequest, OpenAIRequest, TokenizeRequest
from app.protocol import StreamItem

RequestKind = Literal["chat", "completion"]


class ModelCard(msgspec.Struct, kw_only=True):
    """One entry of /v1/models, in vLLM's shape (less its `permission` list)."""

    id: str
    max_model_len: int
    created: int = 0
    owned_by: str = "tandem"
    root: str | None = None  # where the model was loaded from
    parent: str | None = None  # the base model of an adapter; Tandem serves none


class Tokenized(NamedTuple):
    """What /tokenize answers with, before the HTTP layer adds the count and the model's length."""

    tokens: list[int]
    token_strs: list[str] | None = None


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

    async def tokenize(self, request: TokenizeRequest) -> Tokenized:
        """The model's tokenizer (and chat template) applied to the request; no engine involved."""

    async def detokenize(self, request: DetokenizeRequest) -> str:
        """The text of the request's token ids; a token outside the vocabulary is an InvalidRequestError."""
