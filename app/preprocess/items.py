"""What the Processor streams to the Frontend: text, not token ids.

msgspec structs because they cross NATS; versioned by field additions only.
"""

from __future__ import annotations

import msgspec


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
