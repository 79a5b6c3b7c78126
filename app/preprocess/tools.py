"""Tool calls with `tool_choice` "required" or a named function: the constraint that makes
the model call a tool, and the calls read back out of its text.

Both are enforced by structured outputs, as vLLM enforces them (the JSON schemas of its
tool_parsers/utils.py `get_json_schema_from_tools`), so they work on any model and need no
model-specific parser: the model can only write JSON of a known shape.
- A named function: the output is that function's arguments object.
- "required": the output is a JSON array of `{"name": ..., "parameters": {...}}`, one
  element per call (at most one when `parallel_tool_calls` is false). As vLLM's server, a
  stream sends each call as it is written (its arguments as the model writes them), a whole
  answer each complete call (its arguments re-serialized).
"auto" leaves the model free, and a parser of its own format finds the calls
(app/preprocess/tool_parsers.py).
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.errors import InvalidRequestError
from app.openai.schema import ChatCompletionRequest, ChatTool, NamedToolChoice
from app.preprocess.tool_parsers import AutoCallReader
from app.protocol import ToolCallDelta

# Empty or missing parameters still make the arguments a JSON object (vLLM's rule).
_ANY_OBJECT: dict[str, Any] = {"type": "object", "properties": {}}
_JSON = json.JSONDecoder()


def _parameters(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters or _ANY_OBJECT


def _required_schema(tools: list[ChatTool], parallel_tool_calls: bool | None) -> dict[str, Any]:
    """vLLM's `_get_json_schema_from_tools`: an array of calls of the given tools, where each
    tool's `$defs` move to the array's (the schema's root, where `$ref`s look for them)."""
    defs: dict[str, Any] = {}
    calls = []
    for tool in tools:
        parameters = dict(_parameters(tool))
        defs.update(parameters.pop("$defs", None) or {})
        calls.append(
            {
                "properties": {"name": {"type": "string", "enum": [tool.function.name]}, "parameters": parameters},
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": calls}}
    # Only an explicit false limits the calls to one; None is OpenAI's default, true.
    if parallel_tool_calls is False:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def tool_call_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema the output must follow for the request's tool choice, or None."""
    choice = request.effective_tool_choice()
    if isinstance(choice, NamedToolChoice):
        tools = request.tools or []
        return next(_parameters(tool) for tool in tools if tool.function.name == choice.function.name)
    if choice == "required":
        return _required_schema(request.tools or [], request.parallel_tool_calls)
    return None


def new_tool_call_id() -> str:
    # vLLM's form (make_tool_call_id, random_uuid: 64 random bits in 16 hex digits); clients
    # only need it unique, to answer the call.
    return f"chatcmpl-tool-{uuid.uuid4().int & 0xFFFF_FFFF_FFFF_FFFF:016x}"


class NamedCallReader:
    """The output is one call's arguments: stream them as they come."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.called = False

    def feed(self, text: str, token_ids: Sequence[int] = ()) -> tuple[str, list[ToolCallDelta]]:
        """No content, and the call's next piece."""
        if not text:
            return "", []
        if self.called:
            return "", [ToolCallDelta(index=0, arguments=text)]
        self.called = True
        return "", [ToolCallDelta(index=0, id=new_tool_call_id(), name=self._name, arguments=text)]


class RequiredCallsReader:
    """The output is a JSON array of calls, for a whole answer: each call goes out whole once
    its element is complete (its name and arguments in one piece), in the array's order."""

    def __init__(self) -> None:
        self._text = ""
        self._position = 0  # where the next element (or the array's start) is looked for
        self._opened = False
        self._calls = 0

    @property
    def called(self) -> bool:
        return self._calls > 0

    def feed(self, text: str, token_ids: Sequence[int] = ()) -> tuple[str, list[ToolCallDelta]]:
        """No content, and the calls completed by `text`."""
        self._text += text
        deltas = []
        while (call := self._next_call()) is not None:
            name, arguments = call
            deltas.append(ToolCallDelta(index=self._calls, id=new_tool_call_id(), name=name, arguments=arguments))
            self._calls += 1
        return "", deltas

    def _next_call(self) -> tuple[str, str] | None:
        text, position = self._text, self._position
        while position < len(text) and (text[position].isspace() or text[position] in "[,"):
            if text[position] == "[":
                if self._opened:
                    return None  # not the array of calls the schema makes
                self._opened = True
            position += 1
        self._position = position
        if not self._opened or position >= len(text):
            return None
        try:
            element, end = _JSON.raw_decode(text, position)
        except json.JSONDecodeError:
            return None  # not complete yet (or never: then the calls end here)
        self._position = end
        if not isinstance(element, dict) or not isinstance(element.get("name"), str):
            return None
        # As vLLM: the arguments re-serialized, non-ASCII kept.
        return element["name"], json.dumps(element.get("parameters", {}), ensure_ascii=False)


class _At(enum.Enum):
    """Where the scan is in one element object of the "required" array (vLLM's states)."""

    EXPECT_KEY = enum.auto()
    EXPECT_COLON = enum.auto()
    EXPECT_VALUE = enum.auto()
    IN_STRING_VALUE = enum.auto()
    IN_CONTAINER_VALUE = enum.auto()
    IN_SCALAR_VALUE = enum.auto()
    AFTER_VALUE = enum.auto()


@dataclass
class _CallSpan:
    """Where one element of the array sits in the text: its name once that string is closed,
    the offsets of its `parameters` value (`args_end` None while it is being written), and
    how much of the arguments has been sent (None: the call is not announced yet)."""

    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    sent: int | None = None


class _RequiredArrayScanner:
    """vLLM's scan of a (partial) "required" array (vllm/tool_parsers/streaming.py,
    `_scan_required_tool_calls`), string- and nesting-aware, kept across feeds: vLLM scans
    the whole text again at each step, this one only the new characters. Only the element
    level is read, so brackets and quotes inside values cannot confuse it; the scan ends at
    the array's `]` (or at text that is no such array)."""

    def __init__(self) -> None:
        self.spans: list[_CallSpan] = []
        self._ended = False
        self._depth = 0  # of {} and []: the elements' keys sit at 2
        self._in_string = False
        self._escaped = False
        self._string_start = 0
        self._current: _CallSpan | None = None
        self._expect = _At.EXPECT_KEY
        self._key: str | None = None
        self._value_start = 0

    def scan(self, text: str, start: int) -> None:
        """Read `text[start:]`; `text[:start]` was read before."""
        for position in range(start, len(text)):
            if self._ended:
                return
            self._step(text, position)

    def _step(self, text: str, i: int) -> None:
        ch = text[i]
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == '"':
                self._in_string = False
                if self._depth == 2 and self._current is not None:
                    if self._expect == _At.EXPECT_KEY:
                        self._key, self._expect = text[self._string_start + 1 : i], _At.EXPECT_COLON
                    elif self._expect == _At.IN_STRING_VALUE:
                        self._end_value(text, i + 1)
            return
        if ch == '"':
            self._in_string, self._string_start = True, i
            if self._depth == 2 and self._current is not None and self._expect == _At.EXPECT_VALUE:
                self._start_value(i, _At.IN_STRING_VALUE)
            return
        if ch in "{[":
            if (self._depth == 0 and ch != "[") or (self._depth == 1 and ch != "{"):
                self._ended = True  # not an array of objects
                return
            if self._depth == 1:
                self._current = _CallSpan()
                self.spans.append(self._current)
                self._expect, self._key = _At.EXPECT_KEY, None
            elif self._depth == 2 and self._current is not None and self._expect == _At.EXPECT_VALUE:
                self._start_value(i, _At.IN_CONTAINER_VALUE)
            self._depth += 1
            return
        if ch in "}]":
            if self._depth == 2 and self._current is not None and self._expect == _At.IN_SCALAR_VALUE:
                self._end_value(text, i)
            self._depth -= 1
            if self._depth == 2 and self._current is not None and self._expect == _At.IN_CONTAINER_VALUE:
                self._end_value(text, i + 1)
            elif self._depth == 1:
                self._current = None
            elif self._depth <= 0:
                self._ended = True  # the array's end: what follows is not read
            return
        if self._depth != 2 or self._current is None:
            return
        if ch == ":":
            if self._expect == _At.EXPECT_COLON:
                self._expect = _At.EXPECT_VALUE
        elif ch == ",":
            if self._expect == _At.IN_SCALAR_VALUE:
                self._end_value(text, i)
            self._expect, self._key = _At.EXPECT_KEY, None
        elif ch.isspace():
            if self._expect == _At.IN_SCALAR_VALUE:
                self._end_value(text, i)
        elif self._expect == _At.EXPECT_VALUE:
            self._start_value(i, _At.IN_SCALAR_VALUE)

    def _start_value(self, i: int, state: _At) -> None:
        assert self._current is not None
        self._value_start, self._expect = i, state
        if self._key == "parameters":
            self._current.args_start = i

    def _end_value(self, text: str, end: int) -> None:
        assert self._current is not None
        if self._key == "parameters":
            self._current.args_end = end
        elif self._key == "name" and self._expect == _At.IN_STRING_VALUE:
            try:
                self._current.name = json.loads(text[self._value_start : end])
            except json.JSONDecodeError:
                # Never a call, as a whole answer rejects the array.
                self._current.name = None
        self._expect = _At.AFTER_VALUE


class StreamedRequiredCallsReader:
    """The output is a JSON array of calls, for a stream: vLLM's server's deltas
    (`extract_required_tool_call_streaming`). A call is announced, with its id, name and
    the arguments written so far, once its name is complete and its `parameters` value has
    begun; each later delta adds the new text of its arguments, as the model wrote it. The
    pieces of a call put together are its `parameters` text; the calls go out in the array's
    order, a later one not before every earlier one has been announced."""

    def __init__(self) -> None:
        self._text = ""
        self._scanner = _RequiredArrayScanner()
        self._next = 0  # the first call with arguments still to send
        self._announced = 0

    @property
    def called(self) -> bool:
        return self._announced > 0

    def feed(self, text: str, token_ids: Sequence[int] = ()) -> tuple[str, list[ToolCallDelta]]:
        """No content, and the calls' new pieces."""
        start = len(self._text)
        self._text += text
        self._scanner.scan(self._text, start)
        deltas = []
        spans = self._scanner.spans
        for index in range(self._next, len(spans)):
            span = spans[index]
            if span.name is None or span.args_start is None:
                break  # the calls are written in order: no later one is ready either
            end = len(self._text) if span.args_end is None else span.args_end
            if span.sent is None:
                arguments = self._text[span.args_start : end]
                deltas.append(ToolCallDelta(index=index, id=new_tool_call_id(), name=span.name, arguments=arguments))
                self._announced += 1
            elif end > span.sent:
                deltas.append(ToolCallDelta(index=index, arguments=self._text[span.sent : end]))
            span.sent = end
            if span.args_end is not None and index == self._next:
                self._next = index + 1
        return "", deltas


ToolCallReader = NamedCallReader | RequiredCallsReader | StreamedRequiredCallsReader | AutoCallReader


def tool_call_reader(
    request: ChatCompletionRequest, auto_parser: Any | None = None, tokenizer: Any = None
) -> ToolCallReader | None:
    """What reads the request's tool calls out of the model's text; None when its text is all
    content. `auto_parser`: the vLLM tool parser class for tool_choice "auto", if configured."""
    choice = request.effective_tool_choice()
    if isinstance(choice, NamedToolChoice):
        return NamedCallReader(choice.function.name)
    if choice == "required":
        return StreamedRequiredCallsReader() if request.stream else RequiredCallsReader()
    if choice == "auto":
        if auto_parser is None:
            # vLLM's condition: only a parser for the model's own format finds calls in free text.
            raise InvalidRequestError(
                '"auto" tool choice requires enable-auto-tool-choice and tool-call-parser in the '
                'Processor config; tool_choice "required" or a named function works on any model',
                param="tool_choice",
            )
        return AutoCallReader(auto_parser, tokenizer, request)
    return None
