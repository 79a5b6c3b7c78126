"""Request migration: a request whose worker fails mid-stream goes on on another worker.

The pipeline has seen every token the request produced, so it can ask another worker for
the rest: the same request with the prompt followed by those tokens, the `max_tokens`
(and `min_tokens`) still left, and no KV hand-off (the continuation is routed, and
prefilled, like any request: by a worker that holds the prefix, where one does). Its
outputs join the stream as if the first worker had gone on, so the Postprocessor's
detokenizer, stop strings and counts carry on and the client sees neither an error, a
repeated token nor a gap. The prompt's own figures (its token count, cache hits, prompt
logprobs) stay the original request's.

Greedy decoding continues exactly as an unbroken run. A sampled request continues with
its seed's generator started afresh at the continuation (as in Dynamo's migration), so
after that point its text is not the unbroken run's. Not migrated, because the engine
cannot resume them mid-way: requests with n > 1 (each choice its own engine request on
the worker that died) and requests whose output a grammar constrains (structured
outputs, forced tool calls): a continuation would restart the grammar at its beginning.
"""

from __future__ import annotations

import msgspec

from app.errors import WorkerUnavailableError
from app.protocol import EngineOutput, PreprocessedRequest


class WorkerAbortedError(WorkerUnavailableError):
    """The worker ended the request itself (finish reason "abort"): it is going away."""


def not_migratable(request: PreprocessedRequest) -> str | None:
    """Why `request` cannot continue on another worker, or None when it can."""
    if request.n > 1:
        return "n > 1"
    if request.sampling.structured is not None:
        return f"its output is constrained ({request.sampling.structured.param})"
    return None


def continuation(request: PreprocessedRequest, generated: list[int], attempt: int) -> PreprocessedRequest | None:
    """The rest of `request` after `generated`, as a request of its own; None when nothing is
    left to generate (the worker failed after its last token, before saying it was done)."""
    remaining = request.stop.max_tokens - len(generated)
    if remaining <= 0:
        return None
    stop = msgspec.structs.replace(
        request.stop, max_tokens=remaining, min_tokens=max(0, request.stop.min_tokens - len(generated))
    )
    return msgspec.structs.replace(
        request,
        request_id=f"{request.request_id}-m{attempt}",
        token_ids=request.token_ids + generated,
        stop=stop,
        # The prompt's logprobs went out with the first output already.
        sampling=msgspec.structs.replace(request.sampling, prompt_logprobs=None),
        kv_transfer_params=None,
    )


def as_continued(output: EngineOutput) -> EngineOutput:
    """A continuation's output, as the original request's: the prompt's figures were given."""
    output.num_prompt_tokens = output.num_cached_tokens = None
    output.prompt_logprobs = None
    return output
