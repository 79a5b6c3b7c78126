"""Structured outputs and tool choices through the text pipeline: onto the wire as the one
constraint the engine enforces (vLLM's precedence), and tool calls read back out of the text."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.errors import InvalidRequestError
from app.openai.schema import ChatCompletionRequest, CompletionRequest, parse_request
from app.preprocess import Preprocessor
from app.preprocess.tools import RequiredCallsReader
from app.protocol import EngineOutput, StructuredOutputs, ToolCallDelta

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
# vLLM's two structural-tag forms: structures entered at a trigger, and an xgrammar format.
LEGACY_TAG: dict[str, Any] = {
    "structures": [{"begin": "<f>", "schema": {"type": "object"}, "end": "</f>"}],
    "triggers": ["<f>"],
}
TAG_FORMAT = json.dumps({"type": "structural_tag", "format": {"type": "regex", "pattern": "(sunny|rainy)"}})


def _chat(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_request(ChatCompletionRequest, body)


def _structured(preprocessor: Preprocessor, request: ChatCompletionRequest | CompletionRequest) -> Any:
    return preprocessor.preprocess(request, "r1").sampling.structured


def test_response_format_json_schema_becomes_the_engines_json_constraint(preprocessor: Preprocessor) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    request = _chat(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert _structured(preprocessor, request) == StructuredOutputs(json=json.dumps(schema), param="response_format")


def test_response_format_replaces_structured_outputs_and_keeps_its_options(preprocessor: Preprocessor) -> None:
    request = parse_request(
        CompletionRequest,
        {
            "model": "tiny",
            "prompt": "x",
            "response_format": {"type": "json_object"},
            "structured_outputs": {"regex": "[0-9]+", "disable_any_whitespace": True},
        },
    )
    assert _structured(preprocessor, request) == StructuredOutputs(
        json_object=True, disable_any_whitespace=True, param="response_format"
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"regex": "[a-z]+"}, StructuredOutputs(regex="[a-z]+")),
        ({"choice": ["yes", "no"]}, StructuredOutputs(choice=["yes", "no"])),
        ({"grammar": 'root ::= "a"'}, StructuredOutputs(grammar='root ::= "a"')),
        ({"json": {"type": "string"}}, StructuredOutputs(json='{"type": "string"}')),
        ({"json": '{"type": "string"}'}, StructuredOutputs(json='{"type": "string"}')),
        ({"structural_tag": TAG_FORMAT}, StructuredOutputs(structural_tag=TAG_FORMAT)),
    ],
)
def test_each_structured_outputs_constraint_goes_on_the_wire(preprocessor: Preprocessor, given, expected) -> None:
    assert _structured(preprocessor, _chat(structured_outputs=given)) == expected


def test_a_structural_tag_response_format_reaches_the_engine_as_vllms_server_sends_it(
    preprocessor: Preprocessor,
) -> None:
    # The JSON vLLM's server hands its engine (structured_outputs_from_response_format):
    # `type` kept, a structure's schema under `schema`; xgrammar compiles and checks it there.
    legacy = _structured(preprocessor, _chat(response_format={"type": "structural_tag", **LEGACY_TAG}))
    assert legacy == StructuredOutputs(
        structural_tag=json.dumps({"type": "structural_tag", **LEGACY_TAG}), param="response_format"
    )
    tag_format = json.loads(TAG_FORMAT)["format"]
    current = _structured(preprocessor, _chat(response_format={"type": "structural_tag", "format": tag_format}))
    assert current == StructuredOutputs(structural_tag=TAG_FORMAT, param="response_format")


def test_text_response_format_and_no_constraint_leave_the_wire_unconstrained(preprocessor: Preprocessor) -> None:
    assert _structured(preprocessor, _chat(response_format={"type": "text"})) is None
    assert _structured(preprocessor, _chat()) is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "structural_tag"}}, "response_format"),
        ({"response_format": {"type": "structural_tag", "triggers": ["<f>"]}}, "response_format"),
        ({"response_format": {"type": "structural_tag", "format": {}, **LEGACY_TAG}}, "response_format"),
        ({"structured_outputs": {"structural_tag": TAG_FORMAT, "regex": "a"}}, "structured_outputs"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                "structured_outputs": {"regex": "a"},
            },
            "structured_outputs",
        ),
    ],
)
def test_contradictory_constraints_are_400s_naming_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        _chat(**fields)
    assert caught.value.param == param


def test_auto_tool_choice_without_a_parser_is_refused_as_vllm_refuses_it(preprocessor: Preprocessor) -> None:
    for request in (_chat(tools=[WEATHER]), _chat(tools=[WEATHER], tool_choice="auto")):
        with pytest.raises(InvalidRequestError, match="auto") as caught:
            preprocessor.preprocess(request, "r1")
        assert caught.value.param == "tool_choice"


def test_a_named_tool_choice_constrains_the_output_to_its_arguments(preprocessor: Preprocessor) -> None:
    request = _chat(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    structured = _structured(preprocessor, request)
    assert structured.param == "tool_choice"
    assert json.loads(structured.json) == WEATHER["function"]["parameters"]


def test_required_constrains_the_output_to_an_array_of_calls(preprocessor: Preprocessor) -> None:
    defs = {"Unit": {"enum": ["C", "F"]}}
    with_defs = {"type": "function", "function": {"name": "t", "parameters": {"$defs": defs, "type": "object"}}}
    request = _chat(tools=[WEATHER, TIME, with_defs], tool_choice="required", parallel_tool_calls=False)
    schema = json.loads(_structured(preprocessor, request).json)
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    names = [call["properties"]["name"]["enum"] for call in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"], ["t"]]
    # A tool without parameters still takes an object; $defs move to the root, where $refs look.
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    assert schema["$defs"] == defs and "$defs" not in schema["items"]["anyOf"][2]["properties"]["parameters"]
    assert "maxItems" not in json.loads(_structured(preprocessor, _chat(tools=[WEATHER], tool_choice="required")).json)


def test_tool_choice_none_leaves_the_text_as_content(preprocessor: Preprocessor) -> None:
    request = _chat(tools=[WEATHER], tool_choice="none")
    assert _structured(preprocessor, request) is None
    post = preprocessor.postprocessor(request, preprocessor.preprocess(request, "r1"))
    ids = preprocessor.tokenizer.encode("hello", add_special_tokens=False)
    item = post.process(EngineOutput(token_ids=ids, finish_reason="length"))
    assert item.text == "hello" and item.tool_calls is None


def _stream_text(preprocessor: Preprocessor, request: ChatCompletionRequest, text: str) -> list[Any]:
    """The items of `text` streamed a token an output, ending with EOS (finish "stop")."""
    post = preprocessor.postprocessor(request, preprocessor.preprocess(request, "r1"))
    ids = [*preprocessor.tokenizer.encode(text, add_special_tokens=False), preprocessor.eos_token_ids[0]]
    return [
        post.process(EngineOutput(token_ids=[token], finish_reason="stop" if i == len(ids) - 1 else None))
        for i, token in enumerate(ids)
    ]


def _assembled(items: list[Any]) -> list[dict[str, Any]]:
    calls: dict[int, dict[str, Any]] = {}
    for item in items:
        assert item.text == ""  # the whole text is calls, not content
        for delta in item.tool_calls or ():
            call = calls.setdefault(delta.index, {"id": delta.id, "name": delta.name, "arguments": ""})
            if delta.id is not None:
                assert call["id"] == delta.id and delta.id.startswith("chatcmpl-tool-")
            call["arguments"] += delta.arguments
    return [calls[index] for index in sorted(calls)]


def test_a_named_call_streams_its_arguments_and_ends_with_stop(preprocessor: Preprocessor) -> None:
    request = _chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    items = _stream_text(preprocessor, request, '{"city": "Paris"}')
    calls = _assembled(items)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris"})]
    # The arguments arrive piece by piece, not at the end.
    assert sum(1 for item in items if item.tool_calls) > 2
    assert items[-1].finish_reason == "stop"


def test_required_calls_come_out_whole_in_order_and_end_with_tool_calls(preprocessor: Preprocessor) -> None:
    request = _chat(tools=[WEATHER, TIME], tool_choice="required")
    text = '[{"name": "get_weather", "parameters": {"city": "Été"}}, {"name": "get_time", "parameters": {}}]'
    items = _stream_text(preprocessor, request, text)
    calls = _assembled(items)
    assert [(c["name"], c["arguments"]) for c in calls] == [
        ("get_weather", '{"city": "Été"}'),
        ("get_time", "{}"),
    ]
    assert calls[0]["id"] != calls[1]["id"]
    assert items[-1].finish_reason == "tool_calls"


def test_required_text_cut_off_mid_call_yields_the_complete_calls_only() -> None:
    reader = RequiredCallsReader()
    text = '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {"y": '
    deltas = [delta for piece in (text[:7], text[7:40], text[40:]) for delta in reader.feed(piece)[1]]
    assert [(d.index, d.name, d.arguments) for d in deltas] == [(0, "a", '{"x": 1}')]
    assert reader.called
    assert RequiredCallsReader().feed("not json") == ("", []) and not RequiredCallsReader().called


@pytest.fixture(scope="module")
def hermes_preprocessor(tiny_model) -> Preprocessor:
    # Loads vLLM's parsers (an import of vLLM and torch: seconds), as a Processor configured so.
    return Preprocessor(tiny_model, tool_call_parser="hermes")


def test_auto_tool_choice_finds_hermes_calls_with_vllms_parser(hermes_preprocessor: Preprocessor) -> None:
    request = _chat(tools=[WEATHER])  # no tool_choice: "auto"
    assert _structured(hermes_preprocessor, request) is None  # auto leaves the model free
    text = 'Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    items = _stream_text(hermes_preprocessor, request, text)
    content = "".join(item.text for item in items)
    calls: dict[int, dict[str, Any]] = {}
    for item in items:
        for delta in item.tool_calls or ():
            call = calls.setdefault(delta.index, {"name": delta.name, "arguments": ""})
            call["arguments"] += delta.arguments
    assert content.strip() == "Let me look."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "Oslo"})]
    assert items[-1].finish_reason == "tool_calls"


def test_auto_tool_choice_without_calls_is_plain_content(hermes_preprocessor: Preprocessor) -> None:
    items = _stream_text(hermes_preprocessor, _chat(tools=[WEATHER], tool_choice="auto"), "just words")
    assert "".join(item.text for item in items) == "just words"
    assert not any(item.tool_calls for item in items) and items[-1].finish_reason == "stop"


def test_an_unknown_tool_parser_is_refused_naming_the_known_ones(tiny_model) -> None:
    with pytest.raises(ValueError, match="hermes"):
        Preprocessor(tiny_model, tool_call_parser="no-such-parser")


def test_a_tool_call_delta_is_small_on_the_wire() -> None:
    import msgspec

    assert msgspec.json.encode(ToolCallDelta(index=0, arguments="{")) == b'{"index":0,"arguments":"{"}'
