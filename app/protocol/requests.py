"""Requests plane: what the endpoints take and stream (docs/internals.md §3 has the table).

The Processor builds a `PreprocessedRequest`; a worker's `generate` streams `EngineOutput`s;
the Router answers a `RouteRequest` with one `RouteDecision`; the Processor streams
`StreamItem`s (text, not token ids) to the Frontend.
"""

from __future__ import annotations

import msgspec

# --- generate: Processor -> VllmWorker -------------------------------------------------


class StructuredOutputs(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One constraint on the output the engine enforces while sampling: vLLM's
    StructuredOutputsParams, field for field. Exactly one of json..structural_tag is set."""

    json: str | None = None  # a JSON schema, as JSON text
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None  # xgrammar's structural tag, as JSON text
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    # The request field it came from, for an engine that cannot enforce it to name.
    param: str = "structured_outputs"


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
    structured: StructuredOutputs | None = None
    # Logprobs of the prompt's own tokens, with this many top alternatives each (vLLM's
    # prompt_logprobs; -1: the whole vocabulary). The engine must compute the prompt itself.
    prompt_logprobs: int | None = None


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
    # Choices to generate (OpenAI's n). The decode worker runs each as an engine request of
    # its own (app/engines/choices.py): engines themselves generate one sequence a request.
    n: int = 1
    # A reasoning model's chat (the Processor's reasoning-parser): whether the prompt already
    # ended the reasoning, and the parser's kwargs (the chat template's). An engine with a
    # reasoning parser of its own (vLLM's reasoning-parser engine argument) enforces
    # `structured` only after the reasoning, as vLLM's server has it; None: it decides alone.
    reasoning_ended: bool | None = None
    reasoning_parser_kwargs: dict | None = None


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float


class RankedLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float
    rank: int  # 1 for the most likely token


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
    # Which of the request's n choices this output continues (0 for n=1).
    index: int = 0
    # With the first output, when asked for (SamplingOptions.prompt_logprobs): one entry per
    # prompt token, the token itself first, then its alternatives; the first token's is
    # empty (nothing precedes it).
    prompt_logprobs: list[list[RankedLogprob]] | None = None


# --- route: Processor -> Router ---------------------------------------------------------


class RouteRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    request_id: str
    token_ids: list[int]
    # Workers that already failed this request before its first token (it is re-routed).
    exclude: list[str] = []
    # Route among the workers of this model only ("": any worker, from an older Processor).
    model: str = ""


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


class PromptLogprob(msgspec.Struct, array_like=True):
    """One candidate at one prompt position, as vLLM's prompt_logprobs report it."""

    token_id: int
    logprob: float
    rank: int
    decoded_token: str


class EchoedPrompt(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A completion's prompt as `echo` shows it before the completion."""

    text: str
    # vLLM's server streams them with the echo.
    token_ids: list[int] = []
    # Each prompt token's text, for the echoed logprobs (None: the request has no logprobs).
    token_texts: list[str] | None = None


class ToolCallDelta(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A piece of one tool call, as OpenAI streams it: the first piece of a call has its id
    and function name, later pieces add to its arguments (JSON text)."""

    index: int  # which call of the response
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class StreamItem(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One step of a response as the client will see it.

    The first item of a response names the worker (and the prefill worker, if any): the
    Frontend puts them in its response headers.
    """

    text: str = ""
    # Which of the request's n choices this item continues (0 for n=1); each choice's
    # items arrive in order, the choices' items interleaved.
    index: int = 0
    # Output tokens of this choice (`index`) generated so far, cumulative (stop strings do
    # not reduce it). Per choice, not per request: the request's usage is the sum over
    # its choices' last counts (the Frontend adds them up).
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    # Known from the first engine output on.
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    logprobs: list[TokenLogprobs] | None = None
    # The model's tool calls, read out of its text (which then is not content).
    tool_calls: list[ToolCallDelta] | None = None
    # A reasoning model's reasoning (the Processor's reasoning-parser), kept out of `text`;
    # "" on the first item of a choice whose text the parser splits, if no reasoning came.
    reasoning: str | None = None
    # The choice's reasoning tokens so far (vLLM's count), where a reasoning parser reads
    # the chat: on its last item, and on every item for continuous usage stats.
    reasoning_tokens: int | None = None
    worker_id: str | None = None
    # The PrefillWorker that computed the prompt's KV, when it was prefilled remotely.
    prefill_worker_id: str | None = None
    # With the first item, when the request asked for them: EngineOutput.prompt_logprobs
    # with each token's text (the first position None).
    prompt_logprobs: list[list[PromptLogprob] | None] | None = None
    # With the first item of a completion that echoes its prompt.
    echo: EchoedPrompt | None = None
