"""How the mocker enforces structured outputs: vLLM's own xgrammar backend, steering a pick.

The mocker has no logits for a grammar's bitmask to mask, so the bitmask steers its pick
instead: each step the request's matcher says which tokens may come next, and the mocker
takes its own pick where the grammar allows it, otherwise one of the allowed tokens chosen
by the same hash (`TokenChoice.pick`, which also applies logit_bias, allowed_token_ids
and bad_words), so the tokens stay a function of the context and the seed. A stop token
is taken as soon as the grammar allows one, and the request then finishes ("stop") as
its matcher terminates: a random pick among the allowed tokens would otherwise wander to
`max_tokens` wherever the grammar may end or go on (a model trained on the format ends
it).

Everything else is vLLM's (vllm/v1/structured_output/backend_xgrammar.py): a constraint is
validated as vLLM validates one for its xgrammar backend (`validate_xgrammar_grammar`: the
same 400s, and `choice` made a grammar), compiled by `XgrammarBackend`, whose compiler
caches each distinct constraint's grammar (VLLM_XGRAMMAR_CACHE_MB), and matched by one
matcher per engine request (so per choice of `n`), whose stop tokens are the request's as
vLLM's (its stop_token_ids, which hold the model's EOS unless ignore_eos). Two differences:
- JSON is compiled without free whitespace, as vLLM's `disable_any_whitespace` engine
  option does: after `{`, 50 of the 52 tokens the tiny model's tokenizer may write are
  whitespace, so a hashed pick among them would write little else. The answers are still
  ones vLLM's default grammar accepts.
- vLLM falls back to its guidance backend where xgrammar lacks a JSON schema feature
  (`has_xgrammar_unsupported_json_features`); the mocker has no fallback and refuses such
  a schema (400 naming the field and the engine) rather than enforce part of it.

Importing xgrammar and vLLM's backend takes seconds and about 0.6 GB, so it happens in a
thread at an engine's first constrained request; plain requests never pay for it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from app.engines.mocker_sampling import TokenChoice
from app.errors import InvalidRequestError
from app.protocol import PreprocessedRequest, StructuredOutputs

if TYPE_CHECKING:
    import numpy as np
    import torch
    from vllm.v1.structured_output.backend_types import StructuredOutputGrammar
    from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend
    from vllm.v1.structured_output.request import StructuredOutputKey

# Validated constraints kept (their grammars are in the compiler's own cache, by size).
_VALIDATED_LIMIT = 1024
_UNCONSTRAINED = TokenChoice(None, None, [])


class Allowed:
    """The tokens a grammar allows next, read off its bitmask (bit i of word i // 32)."""

    __slots__ = ("_words", "_vocab", "_tokens")

    def __init__(self, words: np.ndarray, vocab: int) -> None:
        self._words = words
        self._vocab = vocab
        self._tokens: list[int] | None = None

    def __contains__(self, token: int) -> bool:
        return 0 <= token < self._vocab and bool((int(self._words[token >> 5]) >> (token & 31)) & 1)

    @property
    def tokens(self) -> Sequence[int]:
        """All of them, in id order: only when the own pick is not one."""
        if self._tokens is None:
            import numpy as np

            bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")[: self._vocab]
            self._tokens = np.flatnonzero(bits).tolist()
        return self._tokens


class RequestGrammar:
    """One engine request's matcher: what it allows next, what it took, whether it ended."""

    __slots__ = ("_request_id", "_grammar", "_bitmask", "_words", "_vocab", "_stops")

    def __init__(self, request_id: str, grammar: StructuredOutputGrammar, bitmask: torch.Tensor, vocab: int) -> None:
        self._request_id = request_id
        self._grammar = grammar
        # The engine's one bitmask row: filled and read within one pick (one scheduler task).
        self._bitmask = bitmask
        self._words = bitmask.numpy()[0]
        self._vocab = vocab
        self._stops: list[int] = list(grammar.matcher.stop_token_ids)  # type: ignore[attr-defined]

    def pick(
        self, own: int, choice: TokenChoice | None, tokens: Sequence[int], num_prompt: int, mix: Callable[[int], int]
    ) -> int:
        self._grammar.fill_bitmask(self._bitmask, 0)
        allowed = Allowed(self._words, self._vocab)
        for stop in self._stops:
            if stop in allowed:
                return stop
        return (choice or _UNCONSTRAINED).pick(own, tokens, num_prompt, mix, self._vocab, allowed)

    def accept(self, token: int) -> bool:
        """Advance past `token`; False if the grammar refused it (a bug: picks are allowed ones)."""
        return self._grammar.accept_tokens(self._request_id, [token])

    @property
    def terminated(self) -> bool:
        return self._grammar.is_terminated()


class Grammars:
    """One mocker engine's grammar compiler, over the tokenizer of its `model` directory."""

    def __init__(self, model: str, vocab_size: int) -> None:
        self._model = model
        self._vocab = vocab_size
        self._loading = asyncio.Lock()
        self._loaded = False
        self._backend: XgrammarBackend | None = None  # None once loaded: the model has no tokenizer
        self._bitmask: torch.Tensor | None = None
        # The wire's constraint -> vLLM's (kind, spec) for the compiler, once validated.
        self._validated: dict[bytes, StructuredOutputKey] = {}

    async def grammar_for(self, request: PreprocessedRequest) -> RequestGrammar:
        """A matcher of its own for `request`'s constraint; InvalidRequestError (a 400) where
        the constraint is invalid, or one the mocker cannot enforce."""
        structured = request.sampling.structured
        assert structured is not None
        if not self._loaded:
            async with self._loading:
                if not self._loaded:
                    await asyncio.to_thread(self._load)
                    self._loaded = True
        if self._backend is None:
            raise InvalidRequestError(
                f"request {request.request_id}: the mocker engine cannot honour {structured.param}: "
                f"its model ({self._model}) has no tokenizer.json to build a grammar over",
                param=structured.param,
            )
        key = msgspec.msgpack.encode(structured)
        spec = self._validated.get(key)
        if spec is not None:
            grammar = self._compile(request, spec)  # the compiler's cache has it: microseconds
        else:
            # A first compile can take a while (a large schema): off the scheduler's loop.
            first, grammar = await asyncio.to_thread(self._first_compile, request, structured)
            if len(self._validated) >= _VALIDATED_LIMIT:
                del self._validated[next(iter(self._validated))]
            self._validated[key] = first
        assert self._bitmask is not None
        return RequestGrammar(request.request_id, grammar, self._bitmask, self._vocab)

    def _load(self) -> None:
        if not (Path(self._model) / "tokenizer.json").is_file():
            return
        from vllm.config import StructuredOutputsConfig, VllmConfig
        from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend

        from app.preprocess.tokenizer import load_tokenizer

        config = VllmConfig(
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
        )
        tokenizer = load_tokenizer(self._model)  # vLLM's TokenizerLike is a protocol of what it reads of one
        self._backend = XgrammarBackend(config, tokenizer=tokenizer, vocab_size=self._vocab)  # type: ignore[arg-type]
        self._bitmask = self._backend.allocate_token_bitmask(1)

    def _first_compile(
        self, request: PreprocessedRequest, structured: StructuredOutputs
    ) -> tuple[StructuredOutputKey, StructuredOutputGrammar]:
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import SamplingParams, StructuredOutputsParams
        from vllm.v1.structured_output.backend_xgrammar import (
            has_xgrammar_unsupported_json_features,
            validate_xgrammar_grammar,
        )
        from vllm.v1.structured_output.request import get_structured_output_key

        fields = msgspec.structs.asdict(structured)
        del fields["param"]
        try:
            params = StructuredOutputsParams(**fields)
            if (schema := _schema(params.json)) is not None and has_xgrammar_unsupported_json_features(schema):
                raise InvalidRequestError(
                    f"request {request.request_id}: {structured.param}: the JSON schema has features xgrammar "
                    "does not support; vLLM enforces it with its guidance backend, the mocker engine has none "
                    "(serve with the vllm engine)",
                    param=structured.param,
                )
            validate_xgrammar_grammar(SamplingParams(structured_outputs=params))  # makes `choice` a grammar
            spec = get_structured_output_key(params)
        except (VLLMClientError, ValueError) as exc:
            # vLLM's words, as the vllm engine gives them (app/engines/vllm.py).
            raise InvalidRequestError(
                f"request {request.request_id}: {exc}", param=getattr(exc, "parameter", None)
            ) from exc
        return spec, self._compile(request, spec)

    def _compile(self, request: PreprocessedRequest, spec: StructuredOutputKey) -> StructuredOutputGrammar:
        assert self._backend is not None
        # vLLM's all_stop_token_ids: the Processor's stop_token_ids hold the EOS unless ignore_eos.
        stops = {token for token in request.stop.stop_token_ids if 0 <= token < self._vocab}
        try:
            return self._backend.compile_grammar(*spec, stop_token_ids=stops or None)
        except (RuntimeError, ValueError) as exc:
            raise InvalidRequestError(f"request {request.request_id}: {exc}") from exc


def _schema(spec: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            return None  # validate_xgrammar_grammar names it
    return spec if isinstance(spec, dict) else None
