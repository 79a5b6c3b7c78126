"""The OpenAI request bodies Tandem accepts, validated strictly.

Strict on purpose: an unknown field, a wrong type or an out-of-range value is a 400
that names the parameter, never a silent default and never a 500. Bounds exist on
every number so that absurd values stop here instead of deep inside an engine.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.errors import InvalidRequestError

# Engines index and count tokens with 32-bit integers.
MAX_INT32 = 2**31 - 1
MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # Passed through to the chat template, which alone knows how to render tool turns.
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message must have content")
        return self

    def text(self) -> str | None:
        """The content as one string; text parts are joined with newlines, as vLLM does."""
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TokenCount = Annotated[int, Field(ge=1, le=MAX_INT32)]
StopSequences = str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)]
# vLLM accepts any 64-bit seed, signed or not.
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
# vLLM: -1 or 0 disables top-k.
TopK = Annotated[int, Field(ge=-1, le=MAX_INT32)]


class _SamplingFields(_Strict):
    """Fields shared by both endpoints, with OpenAI's names and vLLM's extras."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: TokenCount | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: int = 1
    stop: StopSequences | None = None
    seed: Seed | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    user: str | None = None
    top_k: TopK | None = None
    min_tokens: Annotated[int, Field(ge=0, le=MAX_INT32)] = 0
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _common_checks(self) -> _SamplingFields:
        if self.n != 1:
            raise InvalidRequestError("only n=1 is supported", param="n")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")
        if any(stop == "" for stop in self.stop_list()):
            raise InvalidRequestError("stop sequences must not be empty", param="stop")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: TokenCount | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS_CHAT)] | None = None

    @model_validator(mode="after")
    def _chat_checks(self) -> ChatCompletionRequest:
        if not self.messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        return self

    def max_output_tokens(self) -> int | None:
        """max_completion_tokens supersedes the deprecated max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_top_logprobs(self) -> int | None:
        """None when logprobs are off, else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


TokenId = Annotated[int, Field(ge=0, le=MAX_INT32)]


class CompletionRequest(_SamplingFields):
    prompt: str | Annotated[list[TokenId], Field(min_length=1)] | Annotated[list[str], Field(min_length=1)]
    # OpenAI's default for the legacy endpoint.
    max_tokens: TokenCount | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS_COMPLETION)] | None = None
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_checks(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise InvalidRequestError("a list of prompts is not supported; send one prompt per request", param="prompt")
        if self.echo:
            raise InvalidRequestError("echo is not supported", param="echo")
        if self.suffix is not None:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        return self

    def prompt_text(self) -> str | None:
        if isinstance(self.prompt, str):
            return self.prompt
        if self.prompt and isinstance(self.prompt[0], str):
            return self.prompt[0]
        return None

    def prompt_token_ids(self) -> list[int] | None:
        return None if self.prompt_text() is not None else list(self.prompt)  # type: ignore[arg-type]

    def max_output_tokens(self) -> int | None:
        return self.max_tokens

    def num_top_logprobs(self) -> int | None:
        return self.logprobs


OpenAIRequest = ChatCompletionRequest | CompletionRequest

# Pydantic names union branches in error locations ("str", "list[TextPart]", ...);
# clients know only their own field names.
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|none|dict)$|\[")


def _param_name(loc: tuple[int | str, ...]) -> str | None:
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif not _UNION_BRANCH.search(part):
            param += f".{part}" if param else part
    return param or None


def _request_error(exc: ValidationError) -> InvalidRequestError:
    errors = exc.errors(include_url=False)
    deepest = max(len(e["loc"]) for e in errors)
    candidates = [e for e in errors if len(e["loc"]) == deepest]
    # Across union branches a wrong value ("too long") says more than "wrong type".
    first = next((e for e in candidates if not e["type"].endswith("_type")), candidates[0])
    if first["type"] == "json_invalid":
        return InvalidRequestError(f"We could not parse the JSON body of your request: {first['msg']}")
    if first["type"] == "model_type" and not first["loc"]:
        return InvalidRequestError("The request body must be a JSON object.")
    param = _param_name(first["loc"])
    if first["type"] == "extra_forbidden":
        return InvalidRequestError(f"Unrecognized request argument supplied: {param}", param=param)
    if first["type"] == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param)
    if first["type"].endswith("_type") and len(candidates) > 1:
        return InvalidRequestError(f"Invalid type for '{param}'.", param=param)
    message = first["msg"].removeprefix("Value error, ")
    return InvalidRequestError(f"Invalid value for '{param}': {message}", param=param)


def parse_request(request_type: type[OpenAIRequest], body: bytes | str | dict[str, Any]) -> OpenAIRequest:
    """Validate a raw body (or an already-decoded dict, after a hop) into a request.

    Raises InvalidRequestError naming the offending parameter (validators raise it directly:
    pydantic wraps only ValueErrors, so a InvalidRequestError passes through as it is).
    """
    try:
        if isinstance(body, dict):
            return request_type.model_validate(body)
        return request_type.model_validate_json(body)
    except ValidationError as exc:
        raise _request_error(exc) from None
