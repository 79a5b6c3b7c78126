"""How the mocker honours the sampling fields that constrain which tokens come out.

The mocker has no model, so it has no distribution to sample from; its "model" is one
pick per position (a hash of the tokens so far and the seed). Sampling fields that
reshape a distribution (temperature, top_p, top_k, min_p, the penalties) therefore change
nothing, while those that say which tokens may or must come out are honoured as vLLM
honours them, on a simple model of the logits: the mocker's own pick scores
`OWN_PICK_LOGIT` and every other token 0, each plus its `logit_bias`, and the highest
score wins. So a bias past the margin (vLLM's +100) forces a token, one below minus the
margin (-100) bars the own pick in favour of the next pick of the same hash; tokens
outside `allowed_token_ids`, and a token that would complete one of the `bad_words`
after the output so far (vLLM's rule: vllm/v1/sample/ops/bad_words.py), are never picked.
Where a grammar constrains the output (app/engines/mocker_grammar.py), only the tokens it
allows are candidates, and where these rules leave none of them, the grammar wins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer

from app.errors import InvalidRequestError
from app.protocol import SamplingOptions

OWN_PICK_LOGIT = 10.0
# Further picks tried (rank 1, 2, ...) before the vocabulary is scanned in order.
_MAX_RANKED_PICKS = 64


class Permitted(Protocol):
    """The tokens a grammar allows at this position."""

    def __contains__(self, token: int, /) -> bool: ...

    @property
    def tokens(self) -> Sequence[int]: ...


class TokenChoice:
    """One request's constraints on its tokens; `pick` applies them to one position."""

    __slots__ = ("_allowed", "_allowed_list", "_bias", "_bad_words")

    def __init__(
        self, allowed: Sequence[int] | None, bias: dict[int, float] | None, bad_words: list[list[int]]
    ) -> None:
        self._allowed_list = list(dict.fromkeys(allowed)) if allowed is not None else None
        self._allowed = set(self._allowed_list) if self._allowed_list is not None else None
        self._bias = bias or {}
        self._bad_words = bad_words

    def pick(
        self,
        own: int,
        tokens: Sequence[int],
        num_prompt: int,
        mix: Callable[[int], int],
        vocab: int,
        permitted: Permitted | None = None,
    ) -> int:
        """The token for this position: `own` is the mocker's pick, `mix(rank)` a hash for the
        pick of that rank, `tokens[num_prompt:]` the output so far, `permitted` what a grammar
        allows (None: no grammar)."""
        banned = self._banned(tokens, num_prompt)

        def may(token: int) -> bool:
            return (
                (self._allowed is None or token in self._allowed)
                and token not in banned
                and (permitted is None or token in permitted)
            )

        best, best_score = None, float("-inf")
        if may(own):
            best, best_score = own, OWN_PICK_LOGIT + self._bias.get(own, 0.0)
        for token, bias in self._bias.items():
            if bias > best_score and token != own and may(token):
                best, best_score = token, bias
        if best_score < 0.0:
            # Any unbiased token (score 0) beats it: the next pick that may come out.
            other = self._next_pick(own, may, mix, vocab, permitted)
            if other is not None:
                best = other
        if best is None:
            return own if permitted is None else permitted.tokens[0]
        return best

    def _banned(self, tokens: Sequence[int], num_prompt: int) -> set[int]:
        if not self._bad_words:
            return set()
        num_output = len(tokens) - num_prompt
        banned = set()
        for word in self._bad_words:
            prefix = len(word) - 1
            if prefix > num_output:
                continue
            if prefix == 0 or list(tokens[len(tokens) - prefix :]) == word[:prefix]:
                banned.add(word[-1])
        return banned

    def _next_pick(
        self, own: int, may: Callable[[int], bool], mix: Callable[[int], int], vocab: int, permitted: Permitted | None
    ) -> int | None:
        candidates: Sequence[int] = self._allowed_list if self._allowed_list is not None else range(vocab)
        if permitted is not None:
            candidates = (
                permitted.tokens if self._allowed_list is None else [t for t in self._allowed_list if t in permitted]
            )
            if not candidates:
                return None

        def unbiased(token: int) -> bool:
            return token != own and token not in self._bias and may(token)

        for rank in range(1, _MAX_RANKED_PICKS + 1):
            token = candidates[mix(rank) % len(candidates)]
            if unbiased(token):
                return token
        return next((token for token in candidates if unbiased(token)), None)


def token_choice(
    request_id: str, sampling: SamplingOptions, vocab: int, tokenizer: Tokenizer | None
) -> TokenChoice | None:
    """The request's constraints besides a grammar's (None when it has none), checked as vLLM
    checks them."""
    if sampling.prompt_logprobs is not None:
        raise InvalidRequestError(
            f"request {request_id}: prompt_logprobs (asked for directly, or by echo with logprobs) is not "
            "supported by the mocker engine (it does not score prompts: serve with the vllm engine)",
            param="prompt_logprobs",
        )
    if sampling.allowed_token_ids is None and not sampling.logit_bias and not sampling.bad_words:
        return None
    for field, ids in (
        ("logit_bias", sampling.logit_bias or ()),
        ("allowed_token_ids", sampling.allowed_token_ids or ()),
    ):
        if out_of_vocab := [token for token in ids if not 0 <= token < vocab]:
            raise InvalidRequestError(
                f"request {request_id}: token_id(s) {out_of_vocab} in {field} contain out-of-vocab token ids. "
                f"Vocabulary size: {vocab} (mocker engine)"
            )
    if sampling.allowed_token_ids is not None and not sampling.allowed_token_ids:
        raise InvalidRequestError(f"request {request_id}: allowed_token_ids is not None and empty!")
    bad_words = bad_words_token_ids(request_id, sampling.bad_words, tokenizer) if sampling.bad_words else []
    return TokenChoice(sampling.allowed_token_ids, sampling.logit_bias, bad_words)


def bad_words_token_ids(request_id: str, words: Sequence[str], tokenizer: Tokenizer | None) -> list[list[int]]:
    """Each bad word's token ids, with and without a leading space: vLLM's
    SamplingParams.update_from_tokenizer, step for step."""
    if tokenizer is None:
        raise InvalidRequestError(
            f"request {request_id}: the mocker engine cannot honour bad_words: its model has no tokenizer.json"
        )
    ids: list[list[int]] = []
    for word in words:
        for prefix_space in (False, True):
            encoded = tokenizer.encode((" " if prefix_space else "") + word.lstrip(), add_special_tokens=False).ids
            if not encoded:
                if not prefix_space:
                    raise InvalidRequestError(
                        f"request {request_id}: bad_words entries must tokenize to at least one token."
                    )
                continue
            # The spaced form counts only where it is another word of the same length.
            if not prefix_space or (encoded[0] != ids[-1][0] and len(encoded) == len(ids[-1])):
                ids.append(encoded)
    return ids


def load_tokenizer(model: str) -> Tokenizer | None:
    """The tokenizer of the mocker's `model` directory (the Processor's), if it has one."""
    path = Path(model) / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None
