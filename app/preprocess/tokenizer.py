"""Tokenizer loading and per-token text, shared by pre- and postprocessing.

Loading is cached per model directory: a Processor builds one Preprocessor per model
but tests and in-process graphs may build several.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@functools.lru_cache(maxsize=8)
def load_tokenizer(model_dir: str) -> PreTrainedTokenizerBase:
    """The model's fast tokenizer with its chat template (transformers imports slowly: lazily)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(model_dir), use_fast=True)
    if not tokenizer.is_fast:
        raise ValueError(f"{model_dir} has no fast tokenizer (tokenizer.json)")
    return tokenizer


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-printable-character table, inverted."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars, strict=True)}


class TokenTexts:
    """Each token's own text and raw bytes, as OpenAI's logprobs report them.

    A byte-level token may hold part of a UTF-8 character; its `bytes` are then the raw
    bytes and its text shows U+FFFD, exactly as OpenAI does.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self._added = {token_id: added.content for token_id, added in tokenizer.get_added_tokens_decoder().items()}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._compute(token_id)
        return cached

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        if token_id in self._added:
            text = self._added[token_id]
            return text, list(text.encode())
        piece = self._tokenizer.id_to_token(token_id)
        if piece is None:
            return "", []
        if self._byte_level:
            alphabet = _byte_level_alphabet()
            if all(char in alphabet for char in piece):
                raw = bytes(alphabet[char] for char in piece)
                return raw.decode("utf-8", errors="replace"), list(raw)
        text = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text, list(text.encode())
