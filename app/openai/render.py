"""StreamItems -> OpenAI response objects (chunks and whole bodies), byte for byte as OpenAI shapes them.

A chunk carries one choice, named by its `index` (0..n-1); a whole body lists its choices
in index order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.protocol import TokenLogprobs, ToolCallDelta

# The usage so far, for vLLM's continuous_usage_stats: every chunk carries it. Called with
# the chunk's choice index: as vLLM's, a chunk counts the completion tokens of its choice.
RunningUsage = Callable[[int], dict[str, Any]]


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return usage


class ChoiceParts:
    """One choice of a whole (non-streamed) body, gathered from its stream items."""

    __slots__ = ("finish_reason", "logprobs", "texts", "tool_calls")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.logprobs: list[TokenLogprobs] | None = None
        self.tool_calls: dict[int, dict[str, Any]] | None = None  # by the call's index
        self.finish_reason = ""

    def add(self, text: str, logprobs: list[TokenLogprobs] | None, tool_calls: list[ToolCallDelta] | None) -> None:
        self.texts.append(text)
        if logprobs is not None:
            self.logprobs = (self.logprobs or []) + logprobs
        for piece in tool_calls or ():
            calls = self.tool_calls = self.tool_calls or {}
            call = calls.get(piece.index)
            if call is None:
                call = calls[piece.index] = {"id": piece.id, "type": "function", "function": {"name": piece.name}}
                call["function"]["arguments"] = ""
            call["function"]["arguments"] += piece.arguments

    def text(self) -> str:
        return "".join(self.texts)

    def calls(self) -> list[dict[str, Any]] | None:
        return [self.tool_calls[index] for index in sorted(self.tool_calls)] if self.tool_calls else None


class _StreamRenderer:
    """What both endpoints' chunks share: the head (id, object, created, model) and usage."""

    OBJECT = ""

    def __init__(
        self,
        response_id: str,
        model: str,
        created: int,
        *,
        include_usage: bool,
        running_usage: RunningUsage | None = None,
    ) -> None:
        self._head = {"id": response_id, "object": self.OBJECT, "created": created, "model": model}
        self._include_usage = include_usage
        self._running_usage = running_usage

    def _with_choice(self, choice: dict[str, Any], index: int) -> dict[str, Any]:
        chunk = dict(self._head)
        chunk["choices"] = [choice]
        if self._running_usage is not None:
            chunk["usage"] = self._running_usage(index)
        elif self._include_usage:
            # OpenAI: with include_usage every chunk carries usage, null until the last.
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._head, "choices": [], "usage": usage}

    def body(self, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
        """The whole response: `choices` made by `choice`, in index order."""
        return {**self._head, "choices": choices, "usage": usage}


class ChatRenderer(_StreamRenderer):
    OBJECT = "chat.completion.chunk"
    # The answer's role: as vLLM's server, the last message's when the request asks for no
    # generation prompt (the model continues that turn).
    role = "assistant"

    def _chunk(
        self, index: int, delta: dict[str, Any], logprobs: list[TokenLogprobs] | None, finish_reason: str | None
    ) -> dict:
        return self._with_choice(
            {"index": index, "delta": delta, "logprobs": self._logprobs(logprobs), "finish_reason": finish_reason},
            index,
        )

    def role_chunk(self, index: int = 0) -> dict[str, Any]:
        return self._chunk(index, {"role": self.role, "content": ""}, None, None)

    # A message with tool calls and no text: vLLM's content for the calls the request forced
    # (a named function, "required") is "", for those the model chose ("auto") null.
    content_beside_calls: str | None = ""

    def content_chunk(
        self,
        text: str,
        logprobs: list[TokenLogprobs] | None,
        index: int = 0,
        tool_calls: list[ToolCallDelta] | None = None,
    ) -> dict[str, Any]:
        if tool_calls is None:
            return self._chunk(index, {"content": text}, logprobs, None)
        delta: dict[str, Any] = {"content": text} if text else {}
        delta["tool_calls"] = [self._tool_call_piece(piece) for piece in tool_calls]
        return self._chunk(index, delta, logprobs, None)

    @staticmethod
    def _tool_call_piece(piece: ToolCallDelta) -> dict[str, Any]:
        """OpenAI's streamed tool call: id, type and name in a call's first piece only."""
        function: dict[str, Any] = {"arguments": piece.arguments}
        if piece.id is None:
            return {"index": piece.index, "function": function}
        function = {"name": piece.name, **function}
        return {"index": piece.index, "id": piece.id, "type": "function", "function": function}

    def finish_chunk(self, finish_reason: str, index: int = 0) -> dict[str, Any]:
        return self._chunk(index, {}, None, finish_reason)

    def choice(self, index: int, parts: ChoiceParts) -> dict[str, Any]:
        """One choice of a whole body."""
        text, calls = parts.text(), parts.calls()
        message: dict[str, Any] = {"role": self.role, "content": text}
        if calls is not None:
            message["content"] = text or self.content_beside_calls
            message["tool_calls"] = calls
        return {
            "index": index,
            "message": message,
            "logprobs": self._logprobs(parts.logprobs),
            "finish_reason": parts.finish_reason,
        }

    def body(self, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._head, "object": "chat.completion", "choices": choices, "usage": usage}

    @staticmethod
    def _logprobs(entries: list[TokenLogprobs] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        return {
            "content": [
                {
                    "token": e.token,
                    "logprob": e.logprob,
                    "bytes": e.bytes,
                    "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in e.top],
                }
                for e in entries
            ]
        }


class CompletionRenderer(_StreamRenderer):
    OBJECT = "text_completion"
    # Where the next token's text starts in each choice's completion (logprobs'
    # text_offset), by choice index; made at the first logprobs, the instance's own.
    _text_offsets: dict[int, int] | None = None

    def _chunk(
        self, index: int, text: str, logprobs: list[TokenLogprobs] | None, finish_reason: str | None
    ) -> dict[str, Any]:
        return self._with_choice(
            {"index": index, "text": text, "logprobs": self._logprobs(logprobs, index), "finish_reason": finish_reason},
            index,
        )

    def role_chunk(self, index: int = 0) -> None:
        """The legacy endpoint has no role chunk."""
        return None

    def content_chunk(
        self,
        text: str,
        logprobs: list[TokenLogprobs] | None,
        index: int = 0,
        tool_calls: list[ToolCallDelta] | None = None,
    ) -> dict[str, Any]:
        """`tool_calls` is always None here: completions take no tools."""
        return self._chunk(index, text, logprobs, None)

    def finish_chunk(self, finish_reason: str, index: int = 0) -> dict[str, Any]:
        return self._chunk(index, "", None, finish_reason)

    def choice(self, index: int, parts: ChoiceParts) -> dict[str, Any]:
        """One choice of a whole body."""
        return {
            "index": index,
            "text": parts.text(),
            "logprobs": self._logprobs(parts.logprobs, index),
            "finish_reason": parts.finish_reason,
        }

    def _logprobs(self, entries: list[TokenLogprobs] | None, index: int) -> dict[str, Any] | None:
        if entries is None:
            return None
        if self._text_offsets is None:
            self._text_offsets = {}
        offset = self._text_offsets.get(index, 0)
        offsets = []
        for entry in entries:
            offsets.append(offset)
            offset += len(entry.token)
        self._text_offsets[index] = offset
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            # OpenAI's: the chosen token's logprob too, so up to logprobs + 1 of them (as vLLM).
            "top_logprobs": [{e.token: e.logprob, **{t.token: t.logprob for t in e.top}} for e in entries],
            "text_offset": offsets,
        }


Renderer = ChatRenderer | CompletionRenderer
