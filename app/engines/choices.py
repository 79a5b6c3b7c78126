"""A request's n choices (OpenAI's `n`) as n engine requests, merged into one stream.

Engines generate one sequence a request; the decode worker runs a request with n > 1 as n
child requests on its engine, as vLLM's own parallel sampling does
(vllm/v1/engine/parallel_sampling.py): child i is request `f"{i}_{request_id}"` and, where
the request has a seed, samples with `seed + i`, so that seeded choices are the ones vLLM's
server gives for the same request.

Choice 0 starts first, alone, and carries the request's KV hand-off (`kv_transfer_params`,
where it was prefilled remotely); the others start once its first output arrived and carry
none. By then the prompt's KV is in the engine's prefix cache, which they share: a prefix
is cached only once it has been computed, so n children started together would each
prefill the prompt (n times the prefill work, and n remote prefills where one was made).

The merged stream tags every output with its choice's `index` and ends after all n
finished. Only choice 0's first output carries the prompt's counts (`num_prompt_tokens`,
`num_cached_tokens`) and its logprobs: the others' cache hits are choice 0's own prompt. Closing the merged
stream closes every child stream (each aborts its engine request); a child that fails
fails the request, and the others are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable

import msgspec

from app.protocol import EngineOutput, PreprocessedRequest

Generate = Callable[[PreprocessedRequest], AsyncGenerator[EngineOutput, None]]


def child_request(request: PreprocessedRequest, index: int) -> PreprocessedRequest:
    """Choice `index` of `request` as an engine request of its own (n=1)."""
    sampling = request.sampling
    if sampling.seed is not None:
        sampling = msgspec.structs.replace(sampling, seed=sampling.seed + index)
    if index and sampling.prompt_logprobs is not None:
        # The prompt is every choice's: choice 0 computes its logprobs once.
        sampling = msgspec.structs.replace(sampling, prompt_logprobs=None)
    return msgspec.structs.replace(
        request,
        request_id=f"{index}_{request.request_id}",
        sampling=sampling,
        n=1,
        # Only choice 0 takes the KV a PrefillWorker computed: the others find it cached.
        kv_transfer_params=request.kv_transfer_params if index == 0 else None,
    )


class _Ended:
    """A child stream's end in the merge queue: it finished, or failed with `error`."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


async def _pump(
    index: int, outputs: AsyncGenerator[EngineOutput, None], queue: asyncio.Queue[EngineOutput | _Ended]
) -> None:
    """Moves one child's outputs into the merge queue, tagged with its index."""
    async with contextlib.aclosing(outputs):
        try:
            async for output in outputs:
                output.index = index
                if index:
                    output.num_prompt_tokens = output.num_cached_tokens = None
                queue.put_nowait(output)
        except Exception as exc:
            queue.put_nowait(_Ended(exc))
            return
    queue.put_nowait(_Ended())


async def generate_choices(generate: Generate, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
    """The outputs of `request`'s n choices, each on its own engine request from `generate`."""
    queue: asyncio.Queue[EngineOutput | _Ended] = asyncio.Queue()
    children = [generate(child_request(request, 0))]
    pumps: list[asyncio.Task[None]] = []
    try:
        first = await anext(children[0], None)
        children += [generate(child_request(request, index)) for index in range(1, request.n)]
        # The rest of choice 0's stream, and the other choices from their start.
        pumps = [asyncio.create_task(_pump(index, child, queue)) for index, child in enumerate(children)]
        if first is not None:
            yield first
        running = len(pumps)
        while running:
            item = await queue.get()
            if isinstance(item, _Ended):
                if item.error is not None:
                    raise item.error
                running -= 1
                continue
            yield item
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        # A pump cancelled before it ran never closed its child: each child's close (its
        # engine abort) completes here, before the request ends.
        for child in children:
            await child.aclose()
