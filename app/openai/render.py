"""StreamItems -> OpenAI response objects (chunks and whole bodies), byte for byte as OpenAI shapes them.

A chunk carries one choice, named by its `index` (0..n-1); a whole body lists its choices
in index order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.protocol import EchoedPrompt, PromptLogprob, TokenLogprobs, ToolCallDelta

PromptLogprobs = list[list[PromptLogprob] | None]

# The usage so far, for vLLM's continuous_usage_stats: every chunk carries it. Called with
# the chunk's choice index: as vLLM's, a chunk counts the completion tokens of its choice.
RunningUsage = Callable[[int], dict[str, Any]]


def usage_dict(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int | None, reasoning_tokens: int | None = None
) -> dict[str, Any]:
    """`reasoning_tokens`: counted where a reasoning parser reads the chat (as vLLM's, else none)."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    if reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


def prompt_logprobs_list(positions: PromptLogprobs) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token its candidates by token id (the token
    itself first), null for the first token."""
    return [
        None
        if position is None
        else {
            str(c.token_id): {"logprob": c.logprob, "rank": c.rank, "decoded_token": c.decoded_token} for c in position
        }
        for position in positions
    ]


class ChoiceParts:
    """One choice of a whole (non-streamed) body, gathered from its stream items."""

    __slots__ = ("finish_reason", "logprobs", "reasoning", "texts", "tool_calls")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.logprobs: list[TokenLogprobs] | None = None
        self.tool_calls: dict[int, dict[str, Any]] | None = None  # by the call's index
        # A reasoning parser's pieces (None: the text was not split).
        self.reasoning: list[str] | None = None
        self.finish_reason = ""

    def add(
        self,
        text: str,
        logprobs: list[TokenLogprobs] | None,
        tool_calls: list[ToolCallDelta] | None,
        reasoning: str | None = None,
    ) -> None:
        self.texts.append(text)
        if reasoning is not None:
            self.reasoning = (self.reasoning or []) + [reasoning]
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


def _reasoning_fields(reasoning: str) -> dict[str, str]:
    """vLLM 0.32's `reasoning`, and the same text as `reasoning_content`: the name of DeepSeek's
    API and of older vLLM, which clients of reasoning models read."""
    return {"reasoning": reasoning, "reasoning_content": reasoning}


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
    # vLLM's include_reasoning: false leaves a reasoning parser's reasoning out.
    include_reasoning = True
    # A "required" stream's later pieces of a call say "name": null in vLLM's server: its
    # `extract_required_tool_call_streaming` (vllm/tool_parsers/streaming.py) sets
    # `DeltaFunctionCall(name=None, ...)`, and a chunk is serialized with exclude_unset=True,
    # which keeps a field set to None. Its named (and OpenAI's) later pieces leave `name` out.
    null_name_in_later_pieces = False

    def content_chunk(
        self,
        text: str,
        logprobs: list[TokenLogprobs] | None,
        index: int = 0,
        tool_calls: list[ToolCallDelta] | None = None,
        reasoning: str | None = None,
    ) -> dict[str, Any]:
        if tool_calls is None and not reasoning:
            return self._chunk(index, {"content": text}, logprobs, None)
        delta: dict[str, Any] = _reasoning_fields(reasoning) if reasoning else {}
        if text:
            delta["content"] = text
        if tool_calls is not None:
            delta["tool_calls"] = [self._tool_call_piece(piece) for piece in tool_calls]
        return self._chunk(index, delta, logprobs, None)

    def _tool_call_piece(self, piece: ToolCallDelta) -> dict[str, Any]:
        """OpenAI's streamed tool call: id, type and name in a call's first piece only."""
        function: dict[str, Any] = {"arguments": piece.arguments}
        if piece.id is None:
            if self.null_name_in_later_pieces:
                function = {"name": None, **function}
            return {"index": piece.index, "function": function}
        function = {"name": piece.name, **function}
        return {"index": piece.index, "id": piece.id, "type": "function", "function": function}

    def finish_chunk(self, finish_reason: str, index: int = 0) -> dict[str, Any]:
        return self._chunk(index, {}, None, finish_reason)

    def choice(self, index: int, parts: ChoiceParts) -> dict[str, Any]:
        """One choice of a whole body."""
        text, calls = parts.text(), parts.calls()
        # vLLM's reasoning parsers: no text after the reasoning is no content (null), not "".
        message: dict[str, Any] = {"role": self.role, "content": text if parts.reasoning is None else text or None}
        if calls is not None:
            message["content"] = text or self.content_beside_calls
            message["tool_calls"] = calls
        if parts.reasoning is not None and self.include_reasoning:
            message.update(_reasoning_fields("".join(parts.reasoning)))
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


# One token of a completion's logprobs: its text, logprob and top alternatives (by text);
# an echoed prompt's first token has neither.
_LogprobRow = tuple[str, float | None, dict[str, float] | None]


def _rows(entries: list[TokenLogprobs]) -> list[_LogprobRow]:
    # OpenAI's: the chosen token's logprob too, so up to logprobs + 1 of them (as vLLM).
    return [(e.token, e.logprob, {e.token: e.logprob, **{t.token: t.logprob for t in e.top}}) for e in entries]


def _echo_rows(prompt: EchoedPrompt, positions: PromptLogprobs | None, num_top: int) -> list[_LogprobRow]:
    """The echoed prompt's logprobs, as vLLM's: its first token has none; each other's top
    lists the token itself and the `num_top` best (up to num_top + 1 in all)."""
    rows: list[_LogprobRow] = []
    for text, position in zip(prompt.token_texts or (), positions or (), strict=False):
        if position is None:
            rows.append((text, None, None))
        else:
            rows.append((text, position[0].logprob, {c.decoded_token: c.logprob for c in position[: num_top + 1]}))
    return rows


class _Echo:
    """What one choice's first chunk (or its whole body) begins with."""

    __slots__ = ("rows", "text", "token_ids")

    def __init__(self, text: str, rows: list[_LogprobRow] | None, token_ids: list[int]) -> None:
        self.text, self.rows, self.token_ids = text, rows, token_ids


class CompletionRenderer(_StreamRenderer):
    OBJECT = "text_completion"
    # Where the next token's text starts in each choice's completion (logprobs'
    # text_offset), by choice index; made at the first logprobs, the instance's own.
    _text_offsets: dict[int, int] | None = None
    # echo: by choice index, until the choice's first chunk (or its whole body) took it.
    _echoes: dict[int, _Echo] | None = None
    # echo with max_tokens 0: the prompt alone; the token the engine made is left out.
    echo_only = False

    def echo(self, index: int, prompt: EchoedPrompt, positions: PromptLogprobs | None, num_top: int | None) -> None:
        """Choice `index` begins with `prompt` (its logprobs too, where the request has them)."""
        rows = _echo_rows(prompt, positions, num_top) if num_top is not None else None
        if self._echoes is None:
            self._echoes = {}
        self._echoes[index] = _Echo(prompt.text, rows, prompt.token_ids)

    def _with_echo(
        self, index: int, text: str, logprobs: list[TokenLogprobs] | None
    ) -> tuple[str, list[_LogprobRow] | None, _Echo | None]:
        rows = _rows(logprobs) if logprobs is not None else None
        if self.echo_only:
            text, rows = "", None
        echo = self._echoes.pop(index, None) if self._echoes else None
        if echo is None:
            return text, rows, None
        if echo.rows is not None:
            rows = echo.rows + (rows or [])
        return echo.text + text, rows, echo

    def _chunk(
        self, index: int, text: str, logprobs: list[TokenLogprobs] | None, finish_reason: str | None
    ) -> dict[str, Any]:
        text, rows, echo = self._with_echo(index, text, logprobs)
        choice = {"index": index, "text": text, "logprobs": self._logprobs(rows, index), "finish_reason": finish_reason}
        if echo is not None:
            # vLLM's server streams the echoed prompt's ids with it.
            choice["prompt_token_ids"] = echo.token_ids
        return self._with_choice(choice, index)

    def role_chunk(self, index: int = 0) -> None:
        """The legacy endpoint has no role chunk."""
        return None

    def content_chunk(
        self,
        text: str,
        logprobs: list[TokenLogprobs] | None,
        index: int = 0,
        tool_calls: list[ToolCallDelta] | None = None,
        reasoning: str | None = None,
    ) -> dict[str, Any]:
        """`tool_calls` and `reasoning` are always None here: completions take no tools and
        have no reasoning split (nor in vLLM)."""
        return self._chunk(index, text, logprobs, None)

    def finish_chunk(self, finish_reason: str, index: int = 0) -> dict[str, Any]:
        # A choice whose items had no text yet (echo alone) echoes here.
        return self._chunk(index, "", None, finish_reason)

    def choice(self, index: int, parts: ChoiceParts) -> dict[str, Any]:
        """One choice of a whole body."""
        text, rows, _ = self._with_echo(index, parts.text(), parts.logprobs)
        return {
            "index": index,
            "text": text,
            "logprobs": self._logprobs(rows, index),
            "finish_reason": parts.finish_reason,
        }

    def _logprobs(self, rows: list[_LogprobRow] | None, index: int) -> dict[str, Any] | None:
        if rows is None:
            return None
        if self._text_offsets is None:
            self._text_offsets = {}
        offset = self._text_offsets.get(index, 0)
        offsets = []
        for token, _, _ in rows:
            offsets.append(offset)
            offset += len(token)
        self._text_offsets[index] = offset
        return {
            "tokens": [token for token, _, _ in rows],
            "token_logprobs": [logprob for _, logprob, _ in rows],
            "top_logprobs": [top for _, _, top in rows],
            "text_offset": offsets,
        }


Renderer = ChatRenderer | CompletionRenderer
