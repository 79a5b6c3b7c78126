"""Incremental detokenization: token ids in, text deltas out, per token.

The text of a token can depend on its neighbours (a split UTF-8 character, a
SentencePiece leading space), so each step decodes a short window of recent tokens
and emits what it adds to the window's already-emitted text; the window slides
forward at every clean character boundary. Cost per step is O(window), not
O(generated text), and the window stays a few tokens long in all but garbage output.

Replacement characters at the end of the window are held back: they are usually a
character whose remaining bytes are in the next token. A U+FFFD that is still there
when a real character follows was genuinely invalid and goes out then, so the
concatenated deltas equal one decode of all the tokens, except at the very end: there
`finish` leaves out the bytes of a character the output stopped inside of, as vLLM does.

Without spaces between special tokens (vLLM's spaces_between_special_tokens=false, with
special tokens kept), an added token that follows an added token adds exactly its own
text, as vLLM's detokenizer for fast tokenizers does (vllm/v1/engine/detokenizer.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as left context, enough for any leading-space rule we know of.
_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        context_ids: Sequence[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # Added token id -> its text, when the rule above applies (None: it does not).
        self._added: dict[int, str] | None = None
        if not skip_special_tokens and not spaces_between_special_tokens:
            self._added = {token_id: t.content for token_id, t in tokenizer.get_added_tokens_decoder().items()} or None
        self._last_added = False
        context = list(context_ids[-_CONTEXT_TOKENS:])
        # A context that ends inside a character would shift every later delta.
        if context and self._decode(context).endswith(_REPLACEMENT):
            context = []
        self._ids: list[int] = context
        self._prefix_offset = 0  # where the decoded window starts
        self._read_offset = len(context)  # tokens before this are fully emitted
        self._emitted = len(self._decode(context))  # chars of the window's text already out

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add generated tokens; return the text they complete (may be empty)."""
        if self._added is None:
            return self._push(token_ids)
        deltas: list[str] = []
        run: list[int] = []
        for token_id in token_ids:
            added = token_id in self._added
            if added and self._last_added:
                deltas.append(self._push(run))
                run = []
                deltas.append(self._push_verbatim(token_id, self._added[token_id]))
            else:
                run.append(token_id)
            self._last_added = added
        deltas.append(self._push(run))
        return "".join(deltas)

    def _push_verbatim(self, token_id: int, text: str) -> str:
        """The held-back tail and `text`; the window then restarts at this token."""
        held = self.flush()
        self._ids.append(token_id)
        self._prefix_offset = len(self._ids) - 1
        self._read_offset = len(self._ids)
        self._emitted = len(self._decode(self._ids[self._prefix_offset :]))
        return held + text

    def _push(self, token_ids: Sequence[int]) -> str:
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        text = self._decode(self._ids[self._prefix_offset :])
        final_end = len(text.rstrip(_REPLACEMENT))
        delta = text[self._emitted : final_end] if final_end > self._emitted else ""
        if final_end == len(text):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._emitted = len(self._decode(self._ids[self._prefix_offset : self._read_offset]))
        elif final_end > self._emitted:
            self._emitted = final_end
        return delta

    def flush(self) -> str:
        """The held-back tail, as it decodes now."""
        text = self._decode(self._ids[self._prefix_offset :])
        delta = text[self._emitted :]
        self._emitted = len(text)
        return delta

    def finish(self) -> str:
        """The held-back tail once no more tokens will come, less a character the output
        ended inside of: as vLLM's detokenizer, the text leaves out what never completed."""
        return self.flush().rstrip(_REPLACEMENT)
