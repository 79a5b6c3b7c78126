"""Requests plane: what the endpoints take and stream (docs/internals.md §3 has the table).

The Processor builds a `PreprocessedRequest`; a worker's `generate` streams `EngineOutput`s;
the Router answers a `RouteRequest` with one `RouteDecision`; the Processor streams
`StreamItem`s (text, not token ids) to the Frontend.
"""

from __future__ import annotations

import msgspec

# --- generate: Processor -> VllmWorker -------------------------------------------------


class SamplingOptions(msgspec.Struct, omit_defaults=True, kw_only=True):
    """OpenAI's and vLLM's sampling parameters, already validated by the Processor as far as
    it can without the model's vocabulary (token ids in range are the engine's to check).

    Each means what vLLM's SamplingParams field of the same name means.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled (vLLM's convention)
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # number of top logprobs per generated token
    logit_bias: dict[int, float] | None = None  # token id -> bias, clamped to [-100, 100]
    allowed_token_ids: list[int] | None = None
    # Text: the engine tokenizes them (vLLM: as `bad_words` in its own tokenizer).
    bad_words: list[str] = []


class StopConditions(msgspec.Struct, omit_defaults=True, kw_only=True):
    max_tokens: int
    # The request's own, then the model's EOS tokens unless ignore_eos.
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    min_tokens: int = 0


class PreprocessedRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    """What a worker needs to generate: token ids in, token ids out."""

    request_id: str
    model: str
    token_ids: list[int]
    sampling: SamplingOptions
    stop: StopConditions
    # Set by disaggregated serving: the prefill side's KV hand-off (vLLM kv_transfer_params).
    kv_transfer_params: dict | None = None


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float


class EngineOutput(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One step of a generation: the tokens added since the previous output."""

    token_ids: list[int] = []
    # One entry per token in token_ids: (chosen token logprob, top alternatives).
    logprobs: list[float] | None = None
    top_logprobs: list[list[TokenLogprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    # Sent with the first output of a request.
    num_prompt_tokens: int | None = None
    num_cached_tokens: int | None = None
    # Which instance served the request (and which prefilled it, when disaggregated).
    worker_id: str | None = None
    prefill_worker_id: str | None = None
    kv_transfer_params: dict | None = None


# --- route: Processor -> Router ---------------------------------------------------------


class RouteRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    request_id: str
    token_ids: list[int]
    # Workers that already failed this request before its first token (it is re-routed).
    exclude: list[str] = []


class RouteDecision(msgspec.Struct, omit_defaults=True, kw_only=True):
    worker_id: str
    overlap_blocks: int = 0
    prompt_blocks: int = 0


# --- chat_completions / completions: Processor -> Frontend -------------------------------


class TopLogprob(msgspec.Struct, array_like=True):
    token: str
    bytes: list[int]
    logprob: float


class TokenLogprobs(msgspec.Struct, array_like=True):
    """One generated token with its logprob and the requested top alternatives."""

    token: str
    bytes: list[int]
    logprob: float
    top: list[TopLogprob]


class StreamItem(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One step of a response as the client will see it.

    The first item of a response names the worker (and the prefill worker, if any): the
    Frontend puts them in its response headers.
    """

    text: str = ""
    # Output tokens generated so far, cumulative (stop strings do not reduce it).
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    # Known from the first engine output on.
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    logprobs: list[TokenLogprobs] | None = None
    worker_id: str | None = None
    # The PrefillWorker that computed the prompt's KV, when it was prefilled remotely.
    prefill_worker_id: str | None = None
