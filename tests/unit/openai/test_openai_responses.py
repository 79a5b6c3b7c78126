"""/v1/responses: a Responses request translated into the chat request that serves it, and the
chat path's items rendered as a Response and its event stream, checked against the official
client's own models (openai.types.responses)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import httpx2
import openai
import pytest
from openai.types.responses import Response as OpenAIResponse
from pydantic import ValidationError

from app.errors import InvalidRequestError, WorkerUnavailableError
from app.openai import create_app
from app.openai.responses import chat_request
from app.openai.responses_schema import ResponsesRequest
from app.openai.schema import NamedToolChoice, parse_request
from tests.unit.openai.scripted_backend import MODEL, REPLY

MAX_MODEL_LEN = 4096
WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
TIME = {"type": "function", "name": "get_time", "description": "The time"}
REQUIRED_REPLY = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]'


def _translate(**fields: Any) -> Any:
    request = parse_request(ResponsesRequest, {"model": MODEL, **fields})
    return chat_request(request, MODEL, MAX_MODEL_LEN)


def _messages(**fields: Any) -> list[dict[str, Any]]:
    return [message.model_dump(exclude_none=True) for message in _translate(**fields).messages]


# --- translation -------------------------------------------------------------------------------


def test_a_string_input_is_a_user_message_after_the_instructions() -> None:
    assert _messages(input="hi", instructions="Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]


def test_items_passed_back_become_the_chat_turns_they_were() -> None:
    messages = _messages(
        input=[
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}]},
            # A previous response's output, as the client hands it back.
            {
                "type": "message",
                "id": "msg_1",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": "calling", "annotations": [], "logprobs": None}],
            },
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}", "status": "completed"},
            {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
            {"role": "user", "content": "thanks"},
        ]
    )
    assert messages == [
        {"role": "user", "content": [{"type": "text", "text": "a"}]},
        {
            "role": "assistant",
            "content": "calling",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}],
        },
        {"role": "tool", "content": "Sunny", "tool_call_id": "c1"},
        {"role": "user", "content": "thanks"},
    ]


def test_a_call_without_an_assistant_message_before_it_gets_one_and_its_text_joins_it() -> None:
    messages = _messages(
        input=[
            {"role": "user", "content": "hi"},
            {"type": "function_call", "call_id": "c1", "name": "get_time", "arguments": "{}"},
            {"role": "assistant", "content": "it is noon"},
        ]
    )
    assert messages[1]["content"] == "it is noon" and messages[1]["tool_calls"][0]["id"] == "c1"
    assert len(messages) == 2


def test_developer_messages_are_system_ones_merged_first_as_vllm_renders_them() -> None:
    messages = _messages(
        instructions="Be brief.",
        input=[{"role": "user", "content": "hi"}, {"role": "developer", "content": "Be kind."}],
    )
    assert messages == [{"role": "system", "content": "Be brief.\n\nBe kind."}, {"role": "user", "content": "hi"}]


def test_an_incomplete_last_message_is_continued() -> None:
    request = _translate(
        input=[
            {"role": "user", "content": "hi"},
            {"type": "message", "role": "assistant", "status": "incomplete", "content": "Once upon a"},
        ]
    )
    assert request.continue_final_message and not request.add_generation_prompt
    assert _translate(input="hi").add_generation_prompt


def test_sampling_fields_and_vllms_extras_reach_the_chat_request() -> None:
    request = _translate(
        input="hi",
        max_output_tokens=7,
        temperature=0.5,
        top_p=0.9,
        top_k=3,
        min_p=0.1,
        seed=1,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        repetition_penalty=1.1,
        stop=["x"],
        stop_token_ids=[5],
        ignore_eos=True,
        logit_bias={"5": 1.0},
        user="u",
        metadata={"k": "v"},
    )
    assert request.max_output_tokens() == 7
    assert (request.temperature, request.top_p, request.top_k, request.min_p, request.seed) == (0.5, 0.9, 3, 0.1, 1)
    assert (request.presence_penalty, request.frequency_penalty, request.repetition_penalty) == (0.5, 0.25, 1.1)
    assert request.stop_list() == ["x"] and request.stop_token_ids == [5] and request.ignore_eos
    assert request.logit_bias_by_id() == {5: 1.0} and request.user == "u" and request.metadata == {"k": "v"}


def test_text_format_is_the_chat_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    as_schema = _translate(input="hi", text={"format": {"type": "json_schema", "name": "a", "schema": schema}})
    assert as_schema.response_format is not None and as_schema.response_format.type == "json_schema"
    assert as_schema.response_format.json_schema is not None
    assert as_schema.response_format.json_schema.json_schema == schema
    as_object = _translate(input="hi", text={"format": {"type": "json_object"}})
    assert as_object.response_format is not None and as_object.response_format.type == "json_object"
    assert _translate(input="hi", text={"format": {"type": "text"}}).response_format is None


def test_function_tools_become_chat_tools_and_a_named_choice_names_one() -> None:
    request = _translate(input="hi", tools=[WEATHER, TIME], tool_choice={"type": "function", "name": "get_time"})
    assert request.tools is not None
    assert [(tool.function.name, tool.function.description) for tool in request.tools] == [
        ("get_weather", None),
        ("get_time", "The time"),
    ]
    assert isinstance(request.tool_choice, NamedToolChoice) and request.tool_choice.function.name == "get_time"
    assert _translate(input="hi", tools=[WEATHER]).effective_tool_choice() == "auto"
    # Without tools, vLLM's "auto" is "none" and nothing about tools reaches the chat request.
    plain = _translate(input="hi")
    assert plain.tools is None and plain.effective_tool_choice() == "none"


def test_logprobs_are_asked_for_through_include() -> None:
    asked = _translate(input="hi", include=["message.output_text.logprobs"], top_logprobs=3)
    assert asked.num_top_logprobs() == 3
    # top_logprobs alone asks for nothing (as in vLLM).
    assert _translate(input="hi", top_logprobs=3).num_top_logprobs() is None


def test_a_reasoning_effort_reaches_the_chat_template() -> None:
    kwargs = _translate(input="hi", reasoning={"effort": "low"}).template_variables()
    assert kwargs == {"reasoning_effort": "low", "enable_thinking": True}
    own = _translate(input="hi", reasoning={"effort": "none"}, chat_template_kwargs={"enable_thinking": True})
    assert own.template_variables() == {"reasoning_effort": "none", "enable_thinking": True}


def test_a_previous_response_is_never_found() -> None:
    with pytest.raises(InvalidRequestError) as raised:
        _translate(input="hi", previous_response_id="resp_1")
    assert raised.value.status == 404 and raised.value.param == "response_id"
    assert raised.value.message == "Response with id 'resp_1' not found."


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"input": []}, "input"),
        ({"input": "hi", "max_output_tokens": MAX_MODEL_LEN + 1}, "max_output_tokens"),
    ],
)
def test_what_only_the_translation_can_refuse(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        _translate(**fields)
    assert raised.value.status == 400 and raised.value.param == param


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"background": True}, "background"),
        ({"background": True, "store": False}, "background"),
        ({"truncation": "auto"}, "truncation"),
        ({"text": {"format": {"type": "json_object"}}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"tools": [{"type": "web_search_preview"}]}, "tools[0].type"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"temperature": -1}, "temperature"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"n": 2}, "n"),
    ],
)
def test_bad_requests_name_their_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        parse_request(ResponsesRequest, {"model": MODEL, "input": "hi", **fields})
    assert raised.value.status == 400 and raised.value.param == param, raised.value.message


# --- rendering, through the app ----------------------------------------------------------------


def _sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    """The stream's events, checking the framing: `event: TYPE` then `data: {...}` whose type is TYPE."""
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = response.text.split("\n\n")
    assert frames[-1] == ""
    events = []
    for frame in frames[:-1]:
        event_line, data_line = frame.split("\n")
        event = json.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {event['type']}"
        events.append(event)
    return events


def _as_openai(body: dict[str, Any]) -> OpenAIResponse:
    """The body as the official client's Response model, checked field by field. One field
    it requires is missing on purpose: usage's cache_write_tokens, which Tandem does not
    count (README, "OpenAI compatibility")."""
    try:
        return OpenAIResponse.model_validate(body)
    except ValidationError as exc:
        errors = [(error["type"], error["loc"]) for error in exc.errors()]
        assert errors == [("missing", ("usage", "input_tokens_details", "cache_write_tokens"))], errors
        details = {**body["usage"]["input_tokens_details"], "cache_write_tokens": 0}
        return OpenAIResponse.model_validate({**body, "usage": {**body["usage"], "input_tokens_details": details}})


def _without_ids(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_ids(v) for k, v in value.items() if k not in ("id", "created_at", "item_id", "call_id")}
    if isinstance(value, list):
        return [_without_ids(v) for v in value]
    return value


async def test_a_whole_response_is_openais_response_object(client, backend) -> None:
    response = await client.post("/v1/responses", json={"model": MODEL, "input": "hi", "metadata": {"k": "v"}})
    assert response.status_code == 200, response.text
    body = response.json()
    parsed = _as_openai(body)
    assert parsed.output_text == REPLY and parsed.status == "completed" and parsed.incomplete_details is None
    assert body["id"].startswith("resp_") and body["object"] == "response" and body["metadata"] == {"k": "v"}
    (message,) = body["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["id"].startswith("msg_")
    assert message["content"] == [{"annotations": [], "text": REPLY, "type": "output_text", "logprobs": None}]
    prompt_tokens = len(
        backend.preprocessor.chat(
            chat_request(parse_request(ResponsesRequest, {"input": "hi"}), MODEL, MAX_MODEL_LEN), "x"
        ).token_ids
    )
    assert body["usage"] == {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": len(backend.reply_ids),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + len(backend.reply_ids),
    }
    # Echoed as vLLM echoes them: the room the prompt leaves, OpenAI's sampling defaults.
    assert body["max_output_tokens"] == MAX_MODEL_LEN - prompt_tokens
    assert (body["temperature"], body["top_p"], body["tool_choice"], body["tools"]) == (1.0, 1.0, "none", [])


async def test_max_output_tokens_ends_an_incomplete_response(client) -> None:
    body = (await client.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 3})).json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["max_output_tokens"] == 3 and body["usage"]["output_tokens"] == 3


async def test_the_stream_is_vllms_event_sequence_ending_in_the_whole_response(client) -> None:
    request = {"model": MODEL, "input": "hi", "temperature": 0}
    events = _sse_events(await client.post("/v1/responses", json={**request, "stream": True}))
    types = [event["type"] for event in events]
    deltas = [event for event in events if event["type"] == "response.output_text.delta"]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    assert "".join(delta["delta"] for delta in deltas) == REPLY and len(deltas) > 1
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    item_id = events[2]["item"]["id"]
    assert all(event["item_id"] == item_id for event in events[3:-2] if "item_id" in event)
    done = events[-1]["response"]
    assert done["output"][0] == events[-2]["item"] and done["output"][0]["id"] == item_id
    whole = (await client.post("/v1/responses", json=request)).json()
    assert _without_ids(done) == _without_ids(whole)


async def test_an_empty_answer_has_no_output_items(make_backend) -> None:
    app = create_app(make_backend(reply=""))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tandem") as client:
        whole = (await client.post("/v1/responses", json={"model": MODEL, "input": "hi"})).json()
        streamed = _sse_events(await client.post("/v1/responses", json={"model": MODEL, "input": "hi", "stream": True}))
    assert whole["output"] == [] and whole["status"] == "completed"
    assert [event["type"] for event in streamed] == ["response.created", "response.in_progress", "response.completed"]


async def test_logprobs_come_with_the_text_when_included(client, backend) -> None:
    request = {"model": MODEL, "input": "hi", "include": ["message.output_text.logprobs"], "top_logprobs": 2}
    whole = (await client.post("/v1/responses", json=request)).json()
    logprobs = whole["output"][0]["content"][0]["logprobs"]
    # A token each, the EOS that ended the text too (as chat's logprobs).
    assert whole["top_logprobs"] == 2 and len(logprobs) == len(backend.reply_ids)
    assert logprobs[0]["token"] == "H" and logprobs[0]["bytes"] == [ord("H")]
    assert set(logprobs[0]) == {"token", "logprob", "bytes", "top_logprobs"} and len(logprobs[0]["top_logprobs"]) == 2
    events = _sse_events(await client.post("/v1/responses", json={**request, "stream": True}))
    streamed = [lp for event in events if event["type"] == "response.output_text.delta" for lp in event["logprobs"]]
    # A delta's logprobs: OpenAI's shape there has no bytes. As in vLLM's stream they come
    # with text: a token that adds none (a character's first bytes, the EOS) has none there.
    assert set(streamed[0]) == {"token", "logprob", "top_logprobs"}
    deltas = [event for event in events if event["type"] == "response.output_text.delta"]
    assert len(streamed) == len(deltas) < len(logprobs)  # the scripted engine: a token per item
    remaining = iter(logprobs)
    assert all(any(entry["token"] == whole["token"] for whole in remaining) for entry in streamed)  # in order
    part = events[-1]["response"]["output"][0]["content"][0]
    assert [(entry["token"], entry["logprob"]) for entry in part["logprobs"]] == [
        (entry["token"], entry["logprob"]) for entry in streamed
    ]


async def test_tool_calls_are_function_call_items_whole_and_streamed(make_backend) -> None:
    app = create_app(make_backend(reply=REQUIRED_REPLY))
    request = {"model": MODEL, "input": "weather?", "tools": [WEATHER, TIME], "tool_choice": "required"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tandem") as client:
        whole = (await client.post("/v1/responses", json=request)).json()
        events = _sse_events(await client.post("/v1/responses", json={**request, "stream": True}))
    calls = [(item["type"], item["name"], json.loads(item["arguments"])) for item in whole["output"]]
    assert calls == [("function_call", "get_weather", {"city": "Oslo"}), ("function_call", "get_time", {})]
    assert all(item["call_id"] and item["status"] == "completed" for item in whole["output"])
    assert whole["tool_choice"] == "required" and [tool["name"] for tool in whole["tools"]] == [
        "get_weather",
        "get_time",
    ]
    _as_openai(whole)
    added = [event["item"] for event in events if event["type"] == "response.output_item.added"]
    assert [(item["type"], item["name"], item["status"]) for item in added] == [
        ("function_call", "get_weather", "in_progress"),
        ("function_call", "get_time", "in_progress"),
    ]
    for index, item in enumerate(added):
        pieces = [
            e["delta"]
            for e in events
            if e["type"] == "response.function_call_arguments.delta" and e["output_index"] == index
        ]
        (done,) = [
            e for e in events if e["type"] == "response.function_call_arguments.done" and e["output_index"] == index
        ]
        assert "".join(pieces) == done["arguments"] and done["item_id"] == item["id"]
    assert _without_ids(events[-1]["response"]["output"]) == _without_ids(whole["output"])


async def test_a_failure_mid_stream_is_openais_error_event(backend, client) -> None:
    backend.fail_after_tokens = WorkerUnavailableError("the worker went away")
    events = _sse_events(await client.post("/v1/responses", json={"model": MODEL, "input": "hi", "stream": True}))
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "error"
    assert events[-1]["message"] == "the worker went away" and events[-1]["code"] == "service_unavailable"
    assert events[-1]["sequence_number"] == len(events) - 1


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/responses/resp_1"), ("POST", "/v1/responses/resp_1/cancel")])
async def test_stored_responses_are_never_found(client, method: str, path: str) -> None:
    response = await client.request(method, path)
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Response with id 'resp_1' not found."


async def test_an_unknown_model_is_a_404_and_a_bad_body_a_400(client, backend) -> None:
    unknown = await client.post("/v1/responses", json={"model": "nope", "input": "hi"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    bad = await client.post("/v1/responses", json={"model": MODEL, "input": "hi", "temperature": "hot"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
    assert backend.generate_calls == 0


async def test_the_openapi_document_declares_the_body(client) -> None:
    document = (await client.get("/openapi.json")).json()
    schema = document["paths"]["/v1/responses"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/ResponsesRequest"}
    assert "ResponsesRequest" in document["components"]["schemas"]
    assert "/v1/responses/{response_id}" in document["paths"]


# --- the official client ----------------------------------------------------------------------


def _openai_client(backend: Any) -> openai.AsyncOpenAI:
    # The official client's own HTTP library (a fork of httpx), over the app in this process.
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=create_app(backend)), base_url="http://tandem/v1")
    return openai.AsyncOpenAI(api_key="none", base_url="http://tandem/v1", http_client=http)


async def test_the_official_client_reads_a_response_and_its_stream(backend) -> None:
    client = _openai_client(backend)
    response = await client.responses.create(
        model=MODEL, input=[{"role": "user", "content": "hi"}], instructions="Be brief.", max_output_tokens=50
    )
    assert response.output_text == REPLY and response.status == "completed" and response.usage is not None
    assert response.instructions == "Be brief." and response.usage.output_tokens == len(backend.reply_ids)
    text, final = "", None
    async with client.responses.stream(model=MODEL, input="hi") as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                text += event.delta
        final = await stream.get_final_response()
    assert text == REPLY and final.output_text == REPLY and final.status == "completed"
    # A turn handed back: the previous output as input items, as the client's docs show.
    turns: Any = [{"role": "user", "content": "hi"}, *response.output, {"role": "user", "content": "more"}]
    follow_up = await client.responses.create(model=MODEL, input=turns)
    assert follow_up.output_text == REPLY
