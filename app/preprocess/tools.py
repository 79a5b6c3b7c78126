"""Tool calls with `tool_choice` "required" or a named function: the constraint that makes
the model call a tool, and the calls read back out of its text.

Both are enforced by structured outputs, as vLLM enforces them (the JSON schemas of its
tool_parsers/utils.py `get_json_schema_from_tools`), so they work on any model and need no
model-specific parser: the model can only write JSON of a known shape.
- A named function: the output is that function's arguments object.
- "required": the output is a JSON array of `{"name": ..., "parameters": {...}}`, one
  element per call (at most one when `parallel_tool_calls` is false).
"auto" leaves the model free, and a parser of its own format finds the calls
(app/preprocess/tool_parsers.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
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
    # vLLM's form (make_tool_call_id): clients only need it unique, to answer the call.
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


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
    """The output is a JSON array of calls: each call goes out whole once its element is
    complete (its name and arguments in one piece), in the array's order."""

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


ToolCallReader = NamedCallReader | RequiredCallsReader | AutoCallReader


def tool_call_reader(
    request: ChatCompletionRequest, auto_parser: Any | None = None, tokenizer: Any = None
) -> ToolCallReader | None:
    """What reads the request's tool calls out of the model's text; None when its text is all
    content. `auto_parser`: the vLLM tool parser class for tool_choice "auto", if configured."""
    choice = request.effective_tool_choice()
    if isinstance(choice, NamedToolChoice):
        return NamedCallReader(choice.function.name)
    if choice == "required":
        return RequiredCallsReader()
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
