"""A completions request with several prompts: one request per prompt, their items merged.

As vLLM's server, each prompt is a completion of its own (here: preprocessed, routed and
generated on its own, so each goes to the worker that holds its prefix), and the choices
of prompt p are numbered p * n .. p * n + n - 1. Sub-request p's id is `{request_id}-{p}`.
The merged stream ends when every prompt's has; a prompt that fails fails the request, and
closing the merged stream closes every prompt's (each aborts its engine request).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

from app.openai.backend import Backend, RequestKind
from app.openai.schema import CompletionRequest, OpenAIRequest
from app.protocol import StreamItem


def generate(backend: Backend, kind: RequestKind, request: OpenAIRequest, request_id: str) -> AsyncIterator[StreamItem]:
    """The request's items: the backend's own for one prompt, merged for several."""
    if not isinstance(request, CompletionRequest) or len(prompts := request.prompts()) == 1:
        return backend.generate(kind, request, request_id)
    streams = [
        backend.generate(kind, request.for_prompt(prompt), f"{request_id}-{p}") for p, prompt in enumerate(prompts)
    ]
    return _merged(streams, request.num_choices())


class _Ended:
    """A prompt's stream ended: finished, or failed with `error`."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


async def _pump(
    prompt: int, n: int, items: AsyncIterator[StreamItem], queue: asyncio.Queue[StreamItem | _Ended]
) -> None:
    try:
        async for item in items:
            item.index += prompt * n
            queue.put_nowait(item)
    except Exception as exc:
        queue.put_nowait(_Ended(exc))
        return
    finally:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()
    queue.put_nowait(_Ended())


async def _merged(streams: list[AsyncIterator[StreamItem]], n: int) -> AsyncGenerator[StreamItem, None]:
    queue: asyncio.Queue[StreamItem | _Ended] = asyncio.Queue()
    pumps = [asyncio.create_task(_pump(p, n, items, queue)) for p, items in enumerate(streams)]
    try:
        running = len(pumps)
        while running:
            got = await queue.get()
            if isinstance(got, _Ended):
                if got.error is not None:
                    raise got.error
                running -= 1
                continue
            yield got
    finally:
        for pump in pumps:
            pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pumps, return_exceptions=True)
