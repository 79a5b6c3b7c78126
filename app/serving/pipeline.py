"""The request pipeline: preprocess -> pick a worker -> stream from it -> postprocess.

The Processor service serves it over NATS; the Frontend runs it in its own process by
default (one process and one hop fewer per token). How a worker is picked is the
`WorkerPicker` the pipeline was built with (app.serving.pickers), decided once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator

from app.errors import WorkerUnavailableError
from app.openai.backend import Tokenized
from app.openai.schema import (
    CompletionRequest,
    DetokenizeRequest,
    OpenAIRequest,
    TokenizeCompletionRequest,
    TokenizeRequest,
)
from app.preprocess import Postprocessor, Preprocessor, postprocess_stream
from app.protocol import EngineOutput, PreprocessedRequest, StreamItem
from app.runtime import EndpointClient
from app.serving.config import PipelineConfig
from app.serving.pickers import START_WAIT_S, Placement, WorkerPicker

log = logging.getLogger(__name__)

# How many other workers a request that failed before its first token is offered to.
MAX_REROUTES = 3
# Prompts up to this many characters (or token ids, to decode) are tokenized on the event
# loop: that takes tens of microseconds, less than handing the work to a thread and back.
# Longer ones (a long prompt takes up to a second) go off the loop.
INLINE_PREPROCESS_CHARS = 4096


def _prompt_chars(request: OpenAIRequest | TokenizeRequest) -> int:
    """The prompt's size in characters (token ids count as one each), before templating."""
    if isinstance(request, TokenizeCompletionRequest):
        return len(request.prompt)
    if isinstance(request, CompletionRequest):
        text = request.prompt_text()
        return len(text) if text is not None else len(request.prompt_token_ids() or ())
    return sum(len(message.text() or "") for message in request.messages)


class RequestPipeline:
    def __init__(self, config: PipelineConfig, picker: WorkerPicker, workers: EndpointClient) -> None:
        self._config = config
        self._picker = picker
        self._workers = workers
        self._preprocessor: Preprocessor | None = None

    async def start(self) -> None:
        # Loading transformers and the tokenizer takes seconds: off the event loop, which
        # must keep the process's etcd lease alive meanwhile.
        config = self._config
        self._preprocessor = await asyncio.to_thread(
            Preprocessor,
            config.model,
            max_model_len=config.max_model_len,
            tool_call_parser=config.auto_tool_parser(),
            tool_parser_plugin=config.tool_parser_plugin,
        )
        await self._workers.watch()
        await self._picker.start()

    async def close(self) -> None:
        await self._picker.close()

    async def tokenize(self, request: TokenizeRequest) -> Tokenized:
        assert self._preprocessor is not None, "request before start()"
        if _prompt_chars(request) <= INLINE_PREPROCESS_CHARS:
            return self._preprocessor.tokenize(request)
        return await asyncio.to_thread(self._preprocessor.tokenize, request)

    async def detokenize(self, request: DetokenizeRequest) -> str:
        assert self._preprocessor is not None, "request before start()"
        if len(request.tokens) <= INLINE_PREPROCESS_CHARS:
            return self._preprocessor.detokenize(request)
        return await asyncio.to_thread(self._preprocessor.detokenize, request)

    async def generate(self, request: OpenAIRequest, request_id: str) -> AsyncGenerator[StreamItem, None]:
        assert self._preprocessor is not None, "request before start()"
        if _prompt_chars(request) <= INLINE_PREPROCESS_CHARS:
            preprocessed = self._preprocessor.preprocess(request, request_id)
        else:
            preprocessed = await asyncio.to_thread(self._preprocessor.preprocess, request, request_id)
        placement, outputs = await self._stream_from_a_worker(preprocessed)
        postprocessors: Postprocessor | list[Postprocessor]
        if preprocessed.n == 1:
            postprocessors = self._preprocessor.postprocessor(request, preprocessed)
        else:
            # Each choice is its own text: its own detokenizer and stop-string matcher.
            postprocessors = [self._preprocessor.postprocessor(request, preprocessed) for _ in range(preprocessed.n)]
        first = True
        try:
            async with contextlib.aclosing(postprocess_stream(postprocessors, outputs)) as items:
                async for item in items:
                    if first:
                        first = False
                        placement.prefill_done()
                        # The Frontend's response headers name the workers from the first item.
                        item.worker_id = item.worker_id or placement.worker_id
                    yield item
        finally:
            placement.finished()

    async def _stream_from_a_worker(
        self, request: PreprocessedRequest
    ) -> tuple[Placement, AsyncGenerator[EngineOutput, None]]:
        """A worker's output stream that has produced its first output.

        A worker that fails the request before that (its engine died, it left discovery
        between the pick and the call) is replaced by another: nothing reached the client
        yet, so the request simply starts elsewhere.
        """
        if not self._workers.instance_ids():
            await self._workers.wait_for_instances(timeout=START_WAIT_S)
        failed: list[str] = []
        while True:
            placement = await self._picker.pick(request, failed)
            outputs = self._workers.stream(
                request, target=placement.worker_id, response_type=EngineOutput, request_id=request.request_id
            )
            try:
                first = await anext(outputs)
            except StopAsyncIteration:
                return placement, outputs
            except Exception as exc:
                await outputs.aclose()
                placement.finished()
                if not isinstance(exc, WorkerUnavailableError) or len(failed) >= MAX_REROUTES:
                    raise
                log.warning(
                    "%s: worker %s failed before the first token (%s); re-routing",
                    request.request_id,
                    placement.worker_id,
                    exc,
                )
                failed.append(placement.worker_id)
                continue
            return placement, _starting_with(first, outputs)


async def _starting_with(
    first: EngineOutput, rest: AsyncGenerator[EngineOutput, None]
) -> AsyncGenerator[EngineOutput, None]:
    async with contextlib.aclosing(rest):
        yield first
        async for output in rest:
            yield output
