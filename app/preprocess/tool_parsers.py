"""tool_choice "auto": the model writes its calls in its own format (Hermes' `<tool_call>`
tags, Llama's JSON, ...) among ordinary text, and only a parser for that format finds them.
These are vLLM's tool parsers, by the names vLLM's `--tool-call-parser` takes.

Loading them imports vLLM and torch (about 13 s on this machine), so a Preprocessor loads
its parser once, when it starts, and only where the Processor config names one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.errors import InvalidRequestError
from app.openai.schema import ChatCompletionRequest
from app.protocol import ToolCallDelta


def load_tool_parser(name: str, plugin: str | None = None) -> Any:
    """vLLM's tool parser class called `name` (after importing `plugin`, a file that registers
    more parsers, as vLLM's `--tool-parser-plugin`); ValueError naming the known ones."""
    from vllm.tool_parsers import ToolParserManager

    if plugin:
        ToolParserManager.import_tool_parser(plugin)
    try:
        return ToolParserManager.get_tool_parser(name)
    except KeyError:
        known = ", ".join(ToolParserManager.list_registered())
        raise ValueError(f"tool-call-parser {name!r} is not one of vLLM's tool parsers: {known}") from None


def vllm_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer as vLLM's server hands it to its parsers: with its vocabulary and special
    tokens read once. Parsers read the vocabulary for each request, and transformers builds
    it anew at each call (1.8 ms for the tiny model's 3002 tokens, more for a real one's)."""
    from vllm.tokenizers.hf import get_cached_tokenizer

    return get_cached_tokenizer(tokenizer)


def vllm_chat_request(request: ChatCompletionRequest, reader: str = "the tool-call parser") -> Any:
    """The request as vLLM's own model, which its parsers read (`tools`, `tool_choice`,
    `include_reasoning`); `reader` names the parser in the 400 of a request it cannot read."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatRequest
    from vllm.exceptions import VLLMValidationError

    body = request.model_dump(mode="json", by_alias=True, exclude_none=True)
    try:
        return VllmChatRequest.model_validate(body)
    except ValueError as exc:
        raise InvalidRequestError(f"{reader} cannot read this request: {exc}", param="tools") from None
    except VLLMValidationError as exc:  # vLLM's own checks (`tools: []`, say): its 400 too
        raise InvalidRequestError(f"{reader} cannot read this request: {exc}", param=exc.parameter) from None


class AutoCallReader:
    """One response's text through a vLLM tool parser: content goes on as content, the calls
    the parser finds become tool-call pieces."""

    def __init__(self, parser_class: Any, tokenizer: Any, request: ChatCompletionRequest) -> None:
        self._request = vllm_chat_request(request)
        self._parser = parser_class(tokenizer, self._request.tools)
        # Some parsers need the request changed (Hermes keeps special tokens, where its tags are).
        self._request = self._parser.adjust_request(self._request)
        self.skip_special_tokens: bool = self._request.skip_special_tokens
        self._text = ""
        self._token_ids: list[int] = []
        self.called = False

    def feed(self, text: str, token_ids: Sequence[int] = ()) -> tuple[str, list[ToolCallDelta]]:
        """The content and the call pieces of the next piece of text."""
        previous_text, previous_ids = self._text, self._token_ids
        self._text = previous_text + text
        self._token_ids = previous_ids + list(token_ids)
        delta = self._parser.extract_tool_calls_streaming(
            previous_text, self._text, text, previous_ids, self._token_ids, list(token_ids), self._request
        )
        if delta is None:
            return "", []
        calls = []
        for call in delta.tool_calls or ():
            function = call.function
            calls.append(
                ToolCallDelta(
                    index=call.index,
                    id=call.id,
                    name=function.name if function is not None else None,
                    arguments=(function.arguments or "") if function is not None else "",
                )
            )
        self.called = self.called or bool(calls)
        return delta.content or "", calls
