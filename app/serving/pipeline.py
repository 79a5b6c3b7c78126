"""The request pipeline: preprocess -> pick a worker -> stream from it -> postprocess.

The Processor service serves it over NATS; the Frontend runs it in its own process by
default (one process and one hop fewer per token). How a worker is picked is the
`WorkerPicker` the pipeline was built with (app.serving.pickers), decided once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncGenerator, Sequence

from prometheus_client import CollectorRegistry

from app.errors import NoWorkerError, WorkerUnavailableError
from app.logs import Throttled
from app.metrics import CounterView
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
from app.serving import migration
from app.serving.config import PipelineConfig
from app.serving.pickers import START_WAIT_S, Placement, WorkerPicker

log = logging.getLogger(__name__)
# A worker that dies under a thousand streams moves a thousand requests: one line for them
# all (the migrations are counted by kind in the pipeline's metrics).
_migrating_log = Throttled(log)
_rerouting_log = Throttled(log)

# How many other workers a request that failed before its first token is offered to.
MAX_REROUTES = 3
# A pick that finds no worker of the model looks again, this often, for up to START_WAIT_S:
# when etcd comes back from a freeze longer than the lease TTL it drops every worker's
# records at once, and each worker puts them back within a second; a router's view may lag
# the workers' re-registration as briefly. A request arriving then waits, not fails.
NO_WORKER_LOOK_S = 0.2
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
    def __init__(
        self,
        config: PipelineConfig,
        picker: WorkerPicker,
        workers: EndpointClient,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """`registry`: where the migration counter is exported (the Frontend's /metrics)."""
        self._config = config
        self._picker = picker
        self._workers = workers
        self._preprocessor: Preprocessor | None = None
        # Requests moved to another worker mid-stream, by what ended the first one's stream.
        self.migrations: Counter[str] = Counter()
        if registry is not None:
            registry.register(
                CounterView(
                    "tandem_request_migrations", "requests continued on another worker", "cause", self.migrations
                )
            )

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
            reasoning_parser=config.reasoning_parser,
            reasoning_parser_plugin=config.reasoning_parser_plugin,
        )
        await self._workers.watch()
        await self._picker.start()

    async def close(self) -> None:
        await self._picker.close()

    def is_ready(self) -> bool:
        """Whether it can route requests now (an embedded router replica may still start)."""
        return self._picker.is_ready()

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
        postprocessors: Postprocessor | list[Postprocessor]
        if preprocessed.n == 1:
            postprocessors = self._preprocessor.postprocessor(request, preprocessed)
        else:
            # Each choice is its own text: its own detokenizer and stop-string matcher.
            postprocessors = [self._preprocessor.postprocessor(request, preprocessed) for _ in range(preprocessed.n)]
        first = True
        async with contextlib.aclosing(postprocess_stream(postprocessors, self._outputs(preprocessed))) as items:
            async for item in items:
                if first:
                    first = False
                    if isinstance(request, CompletionRequest) and request.echo:
                        item.echo = self._preprocessor.echoed_prompt(request, preprocessed.token_ids)
                yield item

    async def _outputs(self, request: PreprocessedRequest) -> AsyncGenerator[EngineOutput, None]:
        """The request's engine outputs from the worker picked for it and, should that one
        fail mid-stream, from the next one (app.serving.migration).

        The one generator between the worker's stream and the Postprocessor: each output
        passes through it on the way to the client, so it does no more per output than it must.
        """
        placement: Placement | None
        placement, output, outputs = await self._stream_from_a_worker(request)
        placement.prefill_done()
        if output is not None:
            # The Frontend's response headers name the worker from the first item.
            output.worker_id = output.worker_id or placement.worker_id
        generated: list[int] = []
        moves = 0
        failed: list[str] = []  # the workers not to move to: those that failed it
        try:
            while True:
                try:
                    while output is not None:
                        generated += output.token_ids
                        if output.finish_reason == "abort":
                            output.finish_reason = None
                            yield output
                            raise migration.WorkerAbortedError(f"worker {placement.worker_id} aborted the request")
                        yield output
                        output = await anext(outputs, None)
                    return
                except WorkerUnavailableError as exc:
                    self._may_migrate(request, moves, exc)
                    moves += 1
                    left = placement.worker_id
                    if exc.worker_at_fault:
                        failed.append(left)
                    placement.finished()
                    placement = None
                    await outputs.aclose()
                    self.migrations[type(exc).__name__] += 1
                    _migrating_log.log(
                        "%s: worker %s failed after %d tokens (%s); migrating it (%d of at most %d)",
                        request.request_id,
                        left,
                        len(generated),
                        exc,
                        moves,
                        self._config.migration_limit,
                    )
                    rest = migration.continuation(request, generated, moves)
                    if rest is None:
                        yield EngineOutput(finish_reason="length")
                        return
                    placement, output, outputs = await self._stream_from_a_worker(rest, exclude=failed)
                    placement.prefill_done()
                    if output is not None:
                        migration.as_continued(output)
        finally:
            await outputs.aclose()
            if placement is not None:
                placement.finished()

    def _may_migrate(self, request: PreprocessedRequest, moves: int, error: WorkerUnavailableError) -> None:
        """Re-raises `error` unless the request may move to another worker once more."""
        if moves >= self._config.migration_limit:
            raise error
        if (reason := migration.not_migratable(request)) is not None:
            log.debug("%s: not migrated (%s)", request.request_id, reason)
            raise error

    async def _pick_waiting_for_a_worker(
        self, request: PreprocessedRequest, failed: list[str], give_up_at: float
    ) -> Placement:
        """`_pick_avoiding_suspects`, looking again until `give_up_at` (loop time) when no
        worker is there at all (see NO_WORKER_LOOK_S); when every worker but those that
        failed the request is gone, it answers at once."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return await self._pick_avoiding_suspects(request, failed)
            except NoWorkerError:
                if failed or loop.time() >= give_up_at:
                    raise
            await asyncio.sleep(NO_WORKER_LOOK_S)

    async def _pick_avoiding_suspects(self, request: PreprocessedRequest, failed: list[str]) -> Placement:
        """A worker for the request, none of `failed`, and none of the workers that did not
        answer a call lately (a crashed one whose record outlives it by up to the lease TTL)
        while another can take it: a router would otherwise keep picking a dead worker that
        holds the request's prefix, each time costing the request a failed try."""
        suspects = self._workers.suspects()
        if not suspects:
            return await self._picker.pick(request, failed)
        try:
            return await self._picker.pick(request, [*failed, *suspects])
        except NoWorkerError:
            return await self._picker.pick(request, failed)  # only suspects are left: try them

    async def _stream_from_a_worker(
        self, request: PreprocessedRequest, exclude: Sequence[str] = ()
    ) -> tuple[Placement, EngineOutput | None, AsyncGenerator[EngineOutput, None]]:
        """A worker (none of `exclude`), its first output (None: its stream ended without
        one), and the rest of its stream.

        A worker that fails the request before that (its engine died, it left discovery
        between the pick and the call) is replaced by another: nothing reached the client
        yet, so the request simply starts elsewhere.
        """
        # One wait for a worker per request: for the first instance, then for a router's view.
        give_up_at = asyncio.get_running_loop().time() + START_WAIT_S
        if not self._workers.instance_ids():
            await self._workers.wait_for_instances(timeout=START_WAIT_S)
        failed: list[str] = list(exclude)
        while True:
            placement = await self._pick_waiting_for_a_worker(request, failed, give_up_at)
            outputs = self._workers.stream(
                request, target=placement.worker_id, response_type=EngineOutput, request_id=request.request_id
            )
            try:
                first = await anext(outputs)
            except StopAsyncIteration:
                return placement, None, outputs
            except Exception as exc:
                await outputs.aclose()
                placement.finished()
                if not isinstance(exc, WorkerUnavailableError) or len(failed) >= len(exclude) + MAX_REROUTES:
                    raise
                _rerouting_log.log(
                    "%s: worker %s failed before the first token (%s); re-routing",
                    request.request_id,
                    placement.worker_id,
                    exc,
                )
                failed.append(placement.worker_id)
                continue
            return placement, first, outputs
