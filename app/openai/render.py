"""StreamItems -> OpenAI response objects (chunks and whole bodies), byte for byte as OpenAI shapes them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.protocol import TokenLogprobs

# The usage so far, for vLLM's continuous_usage_stats: every chunk carries it.
RunningUsage = Callable[[], dict[str, Any]]


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return usage


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

    def _with_choice(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk = dict(self._head)
        chunk["choices"] = [choice]
        if self._running_usage is not None:
            chunk["usage"] = self._running_usage()
        elif self._include_usage:
            # OpenAI: with include_usage every chunk carries usage, null until the last.
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {**self._head, "choices": [], "usage": usage}


class ChatRenderer(_StreamRenderer):
    OBJECT = "chat.completion.chunk"

    def _chunk(self, delta: dict[str, Any], logprobs: list[TokenLogprobs] | None, finish_reason: str | None) -> dict:
        return self._with_choice(
            {"index": 0, "delta": delta, "logprobs": self._logprobs(logprobs), "finish_reason": finish_reason}
        )

    def role_chunk(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, None, None)

    def content_chunk(self, text: str, logprobs: list[TokenLogprobs] | None) -> dict[str, Any]:
        return self._chunk({"content": text}, logprobs, None)

    def finish_chunk(self, finish_reason: str) -> dict[str, Any]:
        return self._chunk({}, None, finish_reason)

    def body(
        self, text: str, logprobs: list[TokenLogprobs] | None, finish_reason: str, usage: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            **self._head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": self._logprobs(logprobs),
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage,
        }

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
    # Where the next token's text starts in the whole completion (logprobs' text_offset);
    # the first += makes it the instance's own.
    _text_offset = 0

    def _chunk(self, text: str, logprobs: list[TokenLogprobs] | None, finish_reason: str | None) -> dict[str, Any]:
        return self._with_choice(
            {"index": 0, "text": text, "logprobs": self._logprobs(logprobs), "finish_reason": finish_reason}
        )

    def role_chunk(self) -> None:
        """The legacy endpoint has no role chunk."""
        return None

    def content_chunk(self, text: str, logprobs: list[TokenLogprobs] | None) -> dict[str, Any]:
        return self._chunk(text, logprobs, None)

    def finish_chunk(self, finish_reason: str) -> dict[str, Any]:
        return self._chunk("", None, finish_reason)

    def body(
        self, text: str, logprobs: list[TokenLogprobs] | None, finish_reason: str, usage: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            **self._head,
            "choices": [
                {"index": 0, "text": text, "logprobs": self._logprobs(logprobs), "finish_reason": finish_reason}
            ],
            "usage": usage,
        }

    def _logprobs(self, entries: list[TokenLogprobs] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        offsets = []
        for entry in entries:
            offsets.append(self._text_offset)
            self._text_offset += len(entry.token)
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
            "text_offset": offsets,
        }


Renderer = ChatRenderer | CompletionRenderer
