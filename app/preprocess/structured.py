"""A request's constraints on its output (vLLM's structured outputs), in the wire's form.

`response_format` and `structured_outputs` say the same thing in OpenAI's and in vLLM's
words; as in vLLM (`structured_outputs_from_response_format`), a `response_format` other
than text replaces the constraint of `structured_outputs` and keeps its options. A
`tool_choice` of "required" or a named function replaces both (app/preprocess/tools.py).
"""

from __future__ import annotations

import json
from typing import Any

from app.errors import InvalidRequestError
from app.openai.schema import ChatCompletionRequest, OpenAIRequest, StructuredOutputsRequest
from app.preprocess.tools import tool_call_schema
from app.protocol import StructuredOutputs


def _schema_text(schema: str | dict[str, Any]) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)


def _options(given: StructuredOutputsRequest | None) -> dict[str, Any]:
    if given is None:
        return {}
    return {
        "disable_any_whitespace": given.disable_any_whitespace,
        "disable_additional_properties": given.disable_additional_properties,
        "whitespace_pattern": given.whitespace_pattern,
    }


def structured_outputs_for(request: OpenAIRequest) -> StructuredOutputs | None:
    """The constraint the engine must enforce for `request`, or None."""
    given, response_format = request.structured_outputs, request.response_format
    # As vLLM: a required or named tool choice replaces any other constraint.
    tool_schema = tool_call_schema(request) if isinstance(request, ChatCompletionRequest) else None
    if tool_schema is not None:
        return StructuredOutputs(json=_schema_text(tool_schema), param="tool_choice", **_options(given))
    if response_format is not None and response_format.type != "text":
        options = _options(given)
        if response_format.type == "json_object":
            return StructuredOutputs(json_object=True, param="response_format", **options)
        if response_format.type == "structural_tag":
            return StructuredOutputs(
                structural_tag=response_format.structural_tag(), param="response_format", **options
            )
        assert response_format.json_schema is not None, "checked by ResponseFormat"
        schema = response_format.json_schema.json_schema
        if schema is None:
            raise InvalidRequestError(
                "response_format.json_schema needs a 'schema' to constrain the output to",
                param="response_format.json_schema.schema",
            )
        return StructuredOutputs(json=_schema_text(schema), param="response_format", **options)
    if given is None:
        return None
    return StructuredOutputs(
        json=_schema_text(given.json_) if given.json_ is not None else None,
        regex=given.regex,
        choice=given.choice,
        grammar=given.grammar,
        json_object=given.json_object,
        structural_tag=given.structural_tag,
        **_options(given),
    )
