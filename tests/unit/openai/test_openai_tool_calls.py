"""Tool calls over HTTP: OpenAI's shapes for the calls the Postprocessor reads out of the
model's text, in a whole message and as streamed pieces, parsed by the official client."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import openai
import pytest

from app.openai import create_app
from tests.unit.openai.scripted_backend import MODEL

WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
TIME = {"type": "function", "function": {"name": "get_time"}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
REQUIRED_REPLY = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]'


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER, TIME], **fields}


async def _client(make_backend, reply: str) -> openai.AsyncOpenAI:
    app = create_app(make_backend(reply=reply))
    # The official client's own HTTP library (a fork of httpx), over the app in this process.
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://tandem/v1")
    return openai.AsyncOpenAI(api_key="none", base_url="http://tandem/v1", http_client=http)


async def test_required_calls_parse_into_the_clients_tool_call_objects(make_backend) -> None:
    client = await _client(make_backend, REQUIRED_REPLY)
    response = await client.chat.completions.create(**_body(tool_choice="required"))
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == ""  # vLLM's, for calls the request forced
    calls = choice.message.tool_calls or []
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", "get_weather", {"city": "Oslo"}),
        ("function", "get_time", {}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("chatcmpl-tool-") for c in calls)


async def test_a_named_call_streams_as_pieces_the_client_reassembles(make_backend) -> None:
    client = await _client(make_backend, '{"city": "Oslo"}')
    stream = await client.chat.completions.create(**_body(tool_choice=NAMED), stream=True)
    pieces: list[Any] = []
    finish, content = None, ""
    async for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        pieces += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop" and content == ""  # OpenAI's for a named function
    first, rest = pieces[0], pieces[1:]
    assert (first.index, first.type, first.function.name) == (0, "function", "get_weather") and first.id
    assert rest and all(p.id is None and p.function.name is None for p in rest)  # arguments piece by piece
    arguments = "".join(p.function.arguments or "" for p in pieces)
    assert json.loads(arguments) == {"city": "Oslo"}


async def test_a_named_calls_later_pieces_leave_the_name_out(make_backend) -> None:
    """As vLLM's server's named stream (`extract_named_tool_call_streaming`: no name set);
    only its "required" stream's later pieces say "name": null."""
    app = create_app(make_backend(reply='{"city": "Oslo"}'))
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://tandem") as http:
        response = await http.post("/v1/chat/completions", json=_body(tool_choice=NAMED, stream=True))
    chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    pieces = [piece for chunk in chunks for piece in chunk["choices"][0]["delta"].get("tool_calls", [])]
    later = pieces[1:]
    assert later and all(
        piece == {"index": 0, "function": {"arguments": piece["function"]["arguments"]}} for piece in later
    )


async def test_streamed_and_whole_calls_are_the_same_calls(make_backend) -> None:
    client = await _client(make_backend, REQUIRED_REPLY)
    whole = (await client.chat.completions.create(**_body(tool_choice="required"))).choices[0].message.tool_calls
    streamed: dict[int, dict[str, str]] = {}
    async for chunk in await client.chat.completions.create(**_body(tool_choice="required"), stream=True):
        for piece in chunk.choices[0].delta.tool_calls or []:
            call = streamed.setdefault(piece.index, {"name": "", "arguments": ""})
            call["name"] += (piece.function.name or "") if piece.function else ""
            call["arguments"] += (piece.function.arguments or "") if piece.function else ""
    assert [(c.function.name, c.function.arguments) for c in whole or []] == [
        (c["name"], c["arguments"]) for c in streamed.values()
    ]


@pytest.mark.parametrize("tool_choice", ["none", None])
async def test_without_forced_calls_the_text_is_content(make_backend, tool_choice) -> None:
    client = await _client(make_backend, REQUIRED_REPLY)
    fields = {"tool_choice": tool_choice} if tool_choice else {"tools": None}
    message = (await client.chat.completions.create(**{**_body(), **fields})).choices[0].message
    assert message.content == REQUIRED_REPLY and not message.tool_calls


async def test_a_required_stream_sends_each_call_head_first_then_its_arguments_piece_by_piece(make_backend) -> None:
    """vLLM's server's chunks for a "required" call: the call's id, type and name with the
    arguments written so far, then chunks that add to its arguments as they are written."""
    app = create_app(make_backend(reply=REQUIRED_REPLY))
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://tandem") as http:
        response = await http.post("/v1/chat/completions", json=_body(tool_choice="required", stream=True))
    chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    pieces = [piece for chunk in chunks for piece in chunk["choices"][0]["delta"].get("tool_calls", [])]
    heads = [piece for piece in pieces if "id" in piece]
    assert [(head.keys(), head["index"], head["type"], head["function"]["name"]) for head in heads] == [
        ({"index", "id", "type", "function"}, 0, "function", "get_weather"),
        ({"index", "id", "type", "function"}, 1, "function", "get_time"),
    ]
    # Later pieces as vLLM's server sends them: "name": null (its `DeltaFunctionCall(name=None)`).
    later = [piece for piece in pieces if "id" not in piece]
    assert later and all(
        piece.keys() == {"index", "function"} and piece["function"].keys() == {"name", "arguments"} for piece in later
    )
    assert all(piece["function"]["name"] is None for piece in later)
    assert sum(piece["index"] == 0 for piece in later) > 2  # the first call's arguments, token by token
    arguments = ["".join(p["function"]["arguments"] for p in pieces if p["index"] == index) for index in (0, 1)]
    assert arguments == ['{"city": "Oslo"}', "{}"]
    # A head holds the arguments written when the call's parameters began.
    assert all(arguments[head["index"]].startswith(head["function"]["arguments"] or "-") for head in heads)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
