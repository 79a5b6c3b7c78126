"""`POST /v1/responses` on the chat path: a Responses request becomes a chat request (the
same preprocessing, engine and postprocessing as /v1/chat/completions), and the chat
path's StreamItems become a Response object or its stream of events, shaped as vLLM's
server shapes them for a text model (vllm/entrypoints/openai/responses/: serving.py for
the body, streaming_events.py for the events).

What a Response holds: the request's settings echoed (sampling, tools, text format,
metadata, user), `output` items (one assistant "message" with an "output_text" part when
the model wrote text, a "function_call" item per tool call, nothing for an empty answer),
`status` ("incomplete" with `incomplete_details` when max_output_tokens ended it) and
`usage`. A stream is response.created, response.in_progress, each output item's events
(added, its content part or arguments opened, deltas, done) and response.completed with
the whole Response, every event numbered by `sequence_number` from 0.
"""

from __future__ import annotations

from typing import Any

import msgspec

from app.errors import InvalidRequestError
from app.openai.errors import ClientError
from app.openai.render import ChoiceParts
from app.openai.responses_schema import (
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    NamedFunctionChoice,
    ResponsesRequest,
    TextFormatJsonObject,
    TextFormatJsonSchema,
)
from app.openai.schema import (
    ChatCompletionRequest,
    ChatMessage,
    ChatTool,
    FunctionDefinition,
    FunctionName,
    JsonSchemaFormat,
    NamedToolChoice,
    ResponseFormat,
    TextPart,
)
from app.protocol import StreamItem, TokenLogprobs, ToolCallDelta

_json = msgspec.json.Encoder()

# OpenAI's defaults for the sampling fields a Response echoes when the request leaves them
# out (vLLM's too, for a model whose generation config sets none).
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0


def response_not_found(response_id: str) -> InvalidRequestError:
    """vLLM's answer (status and words) to any stored-response id: its store is off by default, as Tandem's is."""
    return InvalidRequestError(f"Response with id '{response_id}' not found.", param="response_id", status=404)


# --- request -> chat request ----------------------------------------------------------------------


def _message(role: str, content: str | list[TextPart] | None, **fields: Any) -> dict[str, Any]:
    return {"role": role, "content": content, **fields}


def _chat_messages(request: ResponsesRequest) -> list[dict[str, Any]]:
    """The conversation as vLLM builds it (construct_input_messages): the instructions as a
    system message, then each item; a function call joins the assistant message before it,
    an assistant's text fills one that holds only calls."""
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append(_message("system", request.instructions))
    if isinstance(request.input, str):
        messages.append(_message("user", request.input))
        return messages
    for item in request.input:
        previous = messages[-1] if messages and messages[-1]["role"] == "assistant" else None
        if isinstance(item, FunctionCallItem):
            function = {"name": item.name, "arguments": item.arguments}
            call = {"id": item.call_id, "type": "function", "function": function}
            if previous is not None:
                previous.setdefault("tool_calls", []).append(call)
            else:
                messages.append(_message("assistant", None, tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            messages.append(_message("tool", item.text(), tool_call_id=item.call_id))
        elif item.role == "assistant":
            # vLLM takes an assistant message's first part only.
            text = item.parts_text()[0] if item.parts_text() else ""
            if previous is not None and previous["content"] is None:
                previous["content"] = text
            else:
                messages.append(_message("assistant", text))
        elif isinstance(item.content, str):
            messages.append(_message(item.role, item.content))
        else:
            messages.append(_message(item.role, [TextPart(type="text", text=text) for text in item.parts_text()]))
    if any(message["role"] == "developer" for message in messages):
        messages = _developer_as_system(messages)
    return messages


def _developer_as_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """vLLM's rendering of the developer role for a chat template that does not name it
    (vllm/renderers/hf.py): developer messages become system ones, and the system messages
    are merged into one, first, when there is more than one or one comes later."""
    messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
    systems = [i for i, m in enumerate(messages) if m["role"] == "system"]
    if systems == [0] or not systems:
        return messages
    texts = [ChatMessage.model_validate(messages[i]).text() for i in systems]
    merged = _message("system", "\n\n".join(text for text in texts if text))
    return [merged, *(m for m in messages if m["role"] != "system")]


def _continues_last_message(request: ResponsesRequest) -> bool:
    """vLLM's partial completion: a last message still "in_progress" or "incomplete" is continued."""
    if isinstance(request.input, str) or not request.input:
        return False
    last = request.input[-1]
    return isinstance(last, MessageItem) and last.status in ("in_progress", "incomplete")


def _response_format(request: ResponsesRequest) -> ResponseFormat | None:
    text_format = request.text.format if request.text is not None else None
    if isinstance(text_format, TextFormatJsonObject):
        return ResponseFormat(type="json_object")
    if isinstance(text_format, TextFormatJsonSchema):
        schema = JsonSchemaFormat.model_validate(
            {
                "name": text_format.name,
                "description": text_format.description,
                "schema": text_format.schema_,
                "strict": text_format.strict,
            }
        )
        return ResponseFormat(type="json_schema", json_schema=schema)
    return None  # "text", or no format: no constraint


def chat_request(request: ResponsesRequest, model: str, max_model_len: int) -> ChatCompletionRequest:
    """The chat request that serves `request`; `model` is the served model it names."""
    if request.previous_response_id is not None:
        raise response_not_found(request.previous_response_id)
    if request.max_output_tokens is not None and request.max_output_tokens > max_model_len:
        # vLLM's words.
        raise InvalidRequestError(
            f"max_output_tokens={request.max_output_tokens} cannot be greater than max_model_len={max_model_len}. "
            "Please request fewer output tokens.",
            param="max_output_tokens",
        )
    messages = _chat_messages(request)
    if not messages:
        # vLLM's words.
        raise InvalidRequestError(
            "Cannot apply chat template to an empty conversation. Provide at least one message.", param="input"
        )
    continues = _continues_last_message(request)
    tool_choice = request.effective_tool_choice()
    fields: dict[str, Any] = {
        "model": model,
        "messages": [ChatMessage.model_validate(message) for message in messages],
        "stream": request.stream,
        "max_completion_tokens": request.max_output_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "seed": request.seed,
        "presence_penalty": request.presence_penalty or 0.0,
        "frequency_penalty": request.frequency_penalty or 0.0,
        "repetition_penalty": request.repetition_penalty,
        "logit_bias": request.logit_bias,
        "stop": request.stop,
        "stop_token_ids": request.stop_token_ids,
        "ignore_eos": request.ignore_eos,
        "skip_special_tokens": request.skip_special_tokens,
        "include_stop_str_in_output": request.include_stop_str_in_output,
        "structured_outputs": request.structured_outputs,
        "response_format": _response_format(request),
        # vLLM's Responses path tokenizes the rendered conversation with the tokenizer's
        # special tokens added (its TokenizeParams' default), unlike its chat path: a template
        # that writes BOS itself gets a second one. The same prompt ids, the same answer.
        "add_special_tokens": True,
        "add_generation_prompt": not continues,
        "continue_final_message": continues,
        "chat_template_kwargs": request.chat_template_kwargs,
        "reasoning_effort": request.reasoning.effort if request.reasoning is not None else None,
        "user": request.user,
        "metadata": request.metadata,
    }
    if request.wants_logprobs():
        fields.update(logprobs=True, top_logprobs=request.top_logprobs)
    if request.tools:
        fields["tools"] = [
            ChatTool(
                function=FunctionDefinition(
                    name=tool.name, description=tool.description, parameters=tool.parameters, strict=tool.strict
                )
            )
            for tool in request.tools
        ]
        fields["tool_choice"] = (
            NamedToolChoice(function=FunctionName(name=tool_choice.name))
            if isinstance(tool_choice, NamedFunctionChoice)
            else tool_choice
        )
        fields["parallel_tool_calls"] = request.parallel_tool_calls
    return ChatCompletionRequest.model_validate(fields)


# --- StreamItems -> a Response ------------------------------------------------------------------


def _logprobs(entries: list[TokenLogprobs]) -> list[dict[str, Any]]:
    """An output_text part's logprobs: each token with its bytes and its top alternatives'."""
    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": e.bytes,
            "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in e.top],
        }
        for e in entries
    ]


def _delta_logprobs(entries: list[TokenLogprobs] | None) -> list[dict[str, Any]]:
    """A text delta event's logprobs: OpenAI's shape there has no bytes."""
    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "top_logprobs": [{"token": t.token, "logprob": t.logprob} for t in e.top],
        }
        for e in entries or ()
    ]


def _text_part(text: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}


def _message_item(item_id: str, parts: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {"id": item_id, "content": parts, "role": "assistant", "status": status, "type": "message"}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "arguments": arguments,
        "call_id": call_id,
        "name": name,
        "type": "function_call",
        "id": item_id,
        "status": status,
    }


def usage(input_tokens: int, output_tokens: int, cached_tokens: int | None) -> dict[str, Any]:
    """A Response's usage. OpenAI's `cache_write_tokens` (prompt tokens newly written to the
    prefix cache, which vLLM counts) is left out: no engine hands Tandem that count."""
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens or 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


class ResponseRenderer:
    """One request's Response: `body` for a whole one, `start`/`events`/`finish` for its stream."""

    def __init__(
        self, request: ResponsesRequest, *, request_id: str, model: str, created_at: int, max_model_len: int
    ) -> None:
        self._request = request
        self._request_id = request_id
        self._max_model_len = max_model_len
        self.response_id = f"resp_{request_id}"
        self._head = self._echo(request, model, created_at)
        # The stream's state (vLLM's SimpleStreamingEventProcessor): the open output item,
        # its accumulated text or arguments, the items already done.
        self._sequence = 0
        self._output: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None  # a message's or a call's state
        self._text: list[str] = []
        self._logprobs: list[TokenLogprobs] = []

    def _echo(self, request: ResponsesRequest, model: str, created_at: int) -> dict[str, Any]:
        """What a Response repeats of its request, in vLLM's order."""
        tool_choice = request.effective_tool_choice()
        return {
            "id": self.response_id,
            "created_at": created_at,
            "incomplete_details": None,
            "instructions": request.instructions,
            "metadata": request.metadata,
            "model": model,
            "object": "response",
            "output": [],
            "parallel_tool_calls": True if request.parallel_tool_calls is None else request.parallel_tool_calls,
            "temperature": float(DEFAULT_TEMPERATURE if request.temperature is None else request.temperature),
            "tool_choice": tool_choice.model_dump() if isinstance(tool_choice, NamedFunctionChoice) else tool_choice,
            "tools": [tool.model_dump() for tool in request.tools],
            "top_p": float(DEFAULT_TOP_P if request.top_p is None else request.top_p),
            "background": False,
            "max_output_tokens": request.max_output_tokens,
            "max_tool_calls": request.max_tool_calls,
            "previous_response_id": None,
            "prompt": None,
            "reasoning": None if request.reasoning is None else request.reasoning.model_dump(),
            "service_tier": request.service_tier,
            "status": "in_progress",
            "text": None if request.text is None else request.text.model_dump(mode="json", by_alias=True),
            "top_logprobs": request.top_logprobs if request.wants_logprobs() else None,
            "truncation": request.truncation,
            "usage": None,
            "user": request.user,
            "presence_penalty": float(request.presence_penalty or 0.0),
            "frequency_penalty": float(request.frequency_penalty or 0.0),
        }

    def _max_output_tokens(self, prompt_tokens: int) -> int:
        """As vLLM echoes it: what the request asked for, clipped to the room the prompt leaves."""
        room = self._max_model_len - prompt_tokens
        asked = self._request.max_output_tokens
        return room if asked is None else min(asked, room)

    def _response(
        self, output: list[dict[str, Any]], finish_reason: str | None, prompt_tokens: int, usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        response = {**self._head, "output": output, "max_output_tokens": self._max_output_tokens(prompt_tokens)}
        if finish_reason is not None:
            incomplete = finish_reason == "length"
            response["status"] = "incomplete" if incomplete else "completed"
            response["incomplete_details"] = {"reason": "max_output_tokens"} if incomplete else None
            response["usage"] = usage
        return response

    def _item_id(self, prefix: str, output_index: int) -> str:
        return f"{prefix}_{self._request_id}{output_index:02x}"

    # --- a whole response

    def body(self, parts: ChoiceParts, prompt_tokens: int, usage: dict[str, Any]) -> dict[str, Any]:
        """The Response of a whole (non-streamed) answer: the text's message, then each call."""
        output: list[dict[str, Any]] = []
        text = parts.text()
        if text:
            logprobs = _logprobs(parts.logprobs or []) if self._request.wants_logprobs() else None
            output.append(_message_item(self._item_id("msg", 0), [_text_part(text, logprobs)], "completed"))
        for call in parts.calls() or ():
            function = call["function"]
            item_id = self._item_id("fc", len(output))
            output.append(_call_item(item_id, call["id"], function["name"], function["arguments"], "completed"))
        return self._response(output, parts.finish_reason, prompt_tokens, usage)

    # --- a stream

    def _event(self, event_type: str, **fields: Any) -> bytes:
        payload = {**fields, "sequence_number": self._sequence, "type": event_type}
        self._sequence += 1
        return b"event: " + event_type.encode() + b"\ndata: " + _json.encode(payload) + b"\n\n"

    def start(self, prompt_tokens: int) -> bytes:
        """response.created and response.in_progress, both with the response so far."""
        response = self._response([], None, prompt_tokens, None)
        return self._event("response.created", response=response) + self._event(
            "response.in_progress", response=response
        )

    def events(self, item: StreamItem) -> bytes:
        """The events of one item: its text goes to an open message, its tool call pieces to
        their calls' items; an item of another kind (or call) than the open one closes it first."""
        events = []
        if item.text:
            if self._open is None or self._open["type"] != "message":
                events += [self._close(), self._open_message()]
            events.append(self._text_delta(item.text, item.logprobs))
        for piece in item.tool_calls or ():
            if self._open is None or self._open.get("index") != piece.index:
                events += [self._close(), self._open_call(piece)]
            if piece.arguments:
                assert self._open is not None
                self._text.append(piece.arguments)
                delta = {"delta": piece.arguments, "item_id": self._open["id"], "output_index": len(self._output)}
                events.append(self._event("response.function_call_arguments.delta", **delta))
        return b"".join(events)

    def finish(self, finish_reason: str, prompt_tokens: int, usage: dict[str, Any]) -> bytes:
        """The open item's done events, then response.completed with the whole response."""
        done = self._close()
        response = self._response(self._output, finish_reason, prompt_tokens, usage)
        return done + self._event("response.completed", response=response)

    def error(self, error: ClientError) -> bytes:
        """OpenAI's error event, for a failure after the stream began."""
        return self._event("error", code=error.code, message=error.message, param=error.param)

    def _open_message(self) -> bytes:
        item_id = self._item_id("msg", len(self._output))
        self._open, self._text, self._logprobs = {"type": "message", "id": item_id}, [], []
        index = {"output_index": len(self._output)}
        return self._event(
            "response.output_item.added", item=_message_item(item_id, [], "in_progress"), **index
        ) + self._event(
            "response.content_part.added", content_index=0, item_id=item_id, part=_text_part("", []), **index
        )

    def _text_delta(self, text: str, logprobs: list[TokenLogprobs] | None) -> bytes:
        assert self._open is not None
        self._text.append(text)
        if logprobs:
            self._logprobs += logprobs
        return self._event(
            "response.output_text.delta",
            content_index=0,
            delta=text,
            item_id=self._open["id"],
            logprobs=_delta_logprobs(logprobs),
            output_index=len(self._output),
        )

    def _open_call(self, piece: ToolCallDelta) -> bytes:
        item_id = self._item_id("fc", len(self._output))
        call_id = piece.id or f"call_{self._request_id}{piece.index:02x}"
        self._open = {"type": "function_call", "id": item_id, "index": piece.index, "call_id": call_id}
        self._open["name"], self._text = piece.name or "", []
        item = _call_item(item_id, call_id, self._open["name"], "", "in_progress")
        return self._event("response.output_item.added", item=item, output_index=len(self._output))

    def _close(self) -> bytes:
        """The open item's done events; it joins the output."""
        state, self._open = self._open, None
        if state is None:
            return b""
        text, index, item_id = "".join(self._text), {"output_index": len(self._output)}, state["id"]
        if state["type"] == "message":
            part = _text_part(text, _logprobs(self._logprobs) if self._logprobs else None)
            item = _message_item(item_id, [part], "completed")
            events = self._event(
                "response.output_text.done", content_index=0, item_id=item_id, logprobs=[], text=text, **index
            ) + self._event("response.content_part.done", content_index=0, item_id=item_id, part=part, **index)
        else:
            item = _call_item(item_id, state["call_id"], state["name"], text, "completed")
            events = self._event(
                "response.function_call_arguments.done", arguments=text, item_id=item_id, name=state["name"], **index
            )
        self._output.append(item)
        return events + self._event("response.output_item.done", item=item, **index)
