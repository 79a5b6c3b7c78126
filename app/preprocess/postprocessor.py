"""Engine outputs (token ids) -> StreamItems (text), one request at a time.

Runs once per engine step for every request, so it keeps O(1)-sized state per step:
an incremental detokenizer and, for stop strings, only the few trailing characters
that could still begin one.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence

from tokenizers import Tokenizer

from app.errors import InternalError
from app.preprocess.detokenizer import IncrementalDetokenizer
from app.preprocess.reasoning import ReasoningReader
from app.preprocess.tokenizer import TokenTexts
from app.preprocess.tools import NamedCallReader, ToolCallReader
from app.protocol import (
    EngineOutput,
    PromptLogprob,
    RankedLogprob,
    StreamItem,
    TokenLogprob,
    TokenLogprobs,
    TopLogprob,
)


class StopStringMatcher:
    """Finds stop strings in streamed text, even when split across tokens.

    Text that could be the start of a stop string is withheld until the next delta
    shows whether it is; everything before a stop string is released, the stop string
    itself never is. With `include_in_output` (vLLM's include_stop_str_in_output) the text
    up to the end of the stop string is released, and nothing is ever withheld: only the
    released text's last few characters are kept, to find a stop string that began there.
    """

    def __init__(self, stop: Sequence[str], *, include_in_output: bool = False) -> None:
        self._stop = [s for s in stop if s]
        self._include = include_in_output
        self._pending = ""  # withheld text (stop strings left out) or released tail (kept in)
        self._tail_length = max((len(s) for s in self._stop), default=1) - 1

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was found)."""
        if not self._stop:
            return delta, False
        if self._include:
            return self._feed_including(delta)
        text = self._pending + delta
        # The stop string that completes first wins, as if text arrived one character at
        # a time; so the result does not depend on how the text was split into tokens.
        hits = [(i + len(s), i) for s in self._stop if (i := text.find(s)) >= 0]
        if hits:
            self._pending = ""
            return text[: min(hits)[1]], True
        held = self._withheld_length(text)
        self._pending = text[len(text) - held :] if held else ""
        return text[: len(text) - held], False

    def _feed_including(self, delta: str) -> tuple[str, bool]:
        released = len(self._pending)
        text = self._pending + delta
        # A stop string wholly inside the released tail would have been found before, so
        # the first to complete ends in the new delta.
        ends = [i + len(s) for s in self._stop if (i := text.find(s)) >= 0]
        if ends:
            self._pending = ""
            return text[released : min(ends)], True
        self._pending = text[-self._tail_length :] if self._tail_length else ""
        return delta, False

    def flush(self) -> str:
        if self._include:
            self._pending = ""
            return ""
        text, self._pending = self._pending, ""
        return text

    def _withheld_length(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest


class Postprocessor:
    """Turns one request's EngineOutputs into StreamItems (one choice's, for n > 1).

    After an item with a finish_reason, `finished` is true and the caller must close
    the engine stream (a stop string ends the request before the engine knows it) once
    every choice has finished.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        token_texts: TokenTexts,
        *,
        stop: Sequence[str] = (),
        min_tokens: int = 0,
        num_top_logprobs: int | None = None,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
        tool_calls: ToolCallReader | None = None,
        reasoning: ReasoningReader | None = None,
    ) -> None:
        self._detokenizer = IncrementalDetokenizer(
            tokenizer,
            skip_special_tokens=skip_special_tokens,
            spaces_between_special_tokens=spaces_between_special_tokens,
            context_ids=prompt_token_ids,
        )
        self._stop = StopStringMatcher(stop, include_in_output=include_stop_str_in_output)
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        self._num_top_logprobs = num_top_logprobs
        self._token_texts = token_texts
        self._completion_tokens = 0
        self._prompt_tokens: int | None = len(prompt_token_ids) or None
        # With a tool choice that makes the model call tools, its text is the calls.
        self._tool_calls = tool_calls
        # A reasoning model's text: the reasoning first, the rest (content, tool calls) after it.
        self._reasoning = reasoning
        self.finished = False

    def process(self, output: EngineOutput) -> StreamItem:
        if self.finished:
            raise RuntimeError("process() called after the request finished")
        self._completion_tokens += len(output.token_ids)
        finish_reason = output.finish_reason
        token_ids: Sequence[int] = output.token_ids
        if finish_reason == "stop" and token_ids and not self._include_stop:
            # The engine stopped at a stop token (EOS or stop_token_ids), the last one: as
            # vLLM, its text is left out (it still counts as generated).
            token_ids = token_ids[:-1]
        delta = self._detokenizer.push(token_ids)
        if finish_reason is not None:
            delta += self._detokenizer.finish()
        # As vLLM: stop strings count only once min_tokens have been generated.
        if self._completion_tokens >= self._min_tokens:
            delta, hit_stop = self._stop.feed(delta)
            if hit_stop:
                finish_reason = "stop"
            elif finish_reason is not None:
                delta += self._stop.flush()
        if output.num_prompt_tokens is not None:
            self._prompt_tokens = output.num_prompt_tokens
        self.finished = finish_reason is not None
        reasoning = reasoning_tokens = None
        content_ids: Sequence[int] = token_ids
        if self._reasoning is not None:
            reasoning, delta, content_ids = self._reasoning.feed(
                delta, token_ids, output.token_ids, finished=self.finished
            )
            reasoning_tokens = self._reasoning.reasoning_tokens(self.finished)
        tool_calls = None
        if self._tool_calls is not None:
            delta, calls = self._tool_calls.feed(delta, content_ids)
            tool_calls = calls or None
            if (
                finish_reason == "stop"
                and self._tool_calls.called
                and not isinstance(self._tool_calls, NamedCallReader)
            ):
                # OpenAI's: calls the model chose to make end with "tool_calls"; a named call, "stop".
                finish_reason = "tool_calls"
        return StreamItem(
            text=delta,
            tool_calls=tool_calls,
            reasoning=reasoning,
            reasoning_tokens=reasoning_tokens,
            completion_tokens=self._completion_tokens,
            finish_reason=finish_reason,
            prompt_tokens=self._prompt_tokens,
            cached_tokens=output.num_cached_tokens,
            logprobs=self._logprobs(output),
            worker_id=output.worker_id,
            prefill_worker_id=output.prefill_worker_id,
            prompt_logprobs=self._prompt_logprobs(output.prompt_logprobs),
        )

    def _prompt_logprobs(self, positions: list[list[RankedLogprob]] | None) -> list[list[PromptLogprob] | None] | None:
        if positions is None:
            return None
        text = self._token_texts.get
        # As vLLM's: -inf (a token the model rules out) as OpenAI's -9999.0, which JSON can hold.
        return [
            [PromptLogprob(c.token_id, max(c.logprob, -9999.0), c.rank, text(c.token_id)[0]) for c in position]
            if position
            else None
            for position in positions
        ]

    def _logprobs(self, output: EngineOutput) -> list[TokenLogprobs] | None:
        if self._num_top_logprobs is None or output.logprobs is None:
            return None
        top_lists: Sequence[list[TokenLogprob]] = output.top_logprobs or [[] for _ in output.token_ids]
        entries = []
        for token_id, logprob, top in zip(output.token_ids, output.logprobs, top_lists, strict=True):
            alternatives = [
                TopLogprob(*self._token_texts.get(alt.token_id), alt.logprob) for alt in top[: self._num_top_logprobs]
            ]
            entries.append(TokenLogprobs(*self._token_texts.get(token_id), logprob, alternatives))
        return entries


async def postprocess_stream(
    postprocessors: Postprocessor | Sequence[Postprocessor], outputs: AsyncIterator[EngineOutput]
) -> AsyncGenerator[StreamItem, None]:
    """Stream items until the request finishes, then close the engine stream.

    One Postprocessor for a request of one choice; for n choices, one per choice, each with
    its own detokenizer and stop strings: outputs go to the postprocessor of their `index`,
    items carry it, and the request finishes when every choice has.

    Closing (not draining) is what aborts the request inside the engine when a stop
    string ended it early or the consumer went away.
    """
    try:
        if isinstance(postprocessors, Postprocessor):
            async for output in outputs:
                item = postprocessors.process(output)
                yield item
                if postprocessors.finished:
                    return
        else:
            unfinished = len(postprocessors)
            async for output in outputs:
                postprocessor = postprocessors[output.index]
                if postprocessor.finished:
                    # A stop string ended this choice; its engine request goes on to its own
                    # stop (EOS, max_tokens), since one choice cannot be aborted alone over
                    # the wire. Wasted engine work, acceptable for now: the request's end
                    # closes the stream, and that aborts whatever still runs.
                    continue
                item = postprocessor.process(output)
                item.index = output.index
                yield item
                if postprocessor.finished:
                    unfinished -= 1
                    if not unfinished:
                        return
        raise InternalError("the engine stream ended without a finish reason")
    finally:
        aclose = getattr(outputs, "aclose", None)
        if aclose is not None:
            await aclose()
