"""A reasoning model's answers over HTTP (vLLM's deepseek_r1 parser in the Processor): the
reasoning as vLLM 0.32's `reasoning` and DeepSeek's `reasoning_content`, out of `content`, in
a whole message and in deltas, and the reasoning tokens in usage."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.openai import create_app
from app.preprocess import Preprocessor
from tests.unit.openai.scripted_backend import MODEL, ScriptedBackend

THOUGHT = "Sunny in July, I think."
REPLY = f"<think>{THOUGHT}</think>It is sunny."


@pytest.fixture(scope="module")
def r1(tiny_model: Path) -> Preprocessor:
    return Preprocessor(tiny_model, reasoning_parser="deepseek_r1")


async def _client(preprocessor: Preprocessor, reply: str = REPLY) -> httpx.AsyncClient:
    app = create_app(ScriptedBackend(preprocessor, reply=reply))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tandem")


@pytest.fixture
async def client(r1: Preprocessor) -> AsyncIterator[httpx.AsyncClient]:
    async with await _client(r1) as http:
        yield http


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "weather?"}], "max_tokens": 100, **fields}


def _chunks(response: httpx.Response) -> list[dict[str, Any]]:
    lines = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


async def test_the_message_has_the_reasoning_apart_under_both_names(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/chat/completions", json=_body())).json()
    message = body["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": "It is sunny.",
        "reasoning": THOUGHT,
        "reasoning_content": THOUGHT,
    }
    details = body["usage"]["completion_tokens_details"]
    assert 0 < details["reasoning_tokens"] < body["usage"]["completion_tokens"]


async def test_the_deltas_carry_the_reasoning_then_the_content(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/chat/completions", json=_body(stream=True, stream_options={"include_usage": True})
    )
    chunks = _chunks(response)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    reasoning = [delta for delta in deltas if "reasoning" in delta]
    assert all(delta["reasoning"] == delta["reasoning_content"] and "content" not in delta for delta in reasoning)
    assert "".join(delta["reasoning"] for delta in reasoning) == THOUGHT
    assert "".join(delta.get("content") or "" for delta in deltas) == "It is sunny."
    # The reasoning comes first, whole, and no delta spells a marker.
    first_content = next(i for i, delta in enumerate(deltas) if delta.get("content"))
    assert all("reasoning" not in delta for delta in deltas[first_content:])
    assert "think>" not in json.dumps(deltas)
    whole = (await client.post("/v1/chat/completions", json=_body())).json()["usage"]
    assert chunks[-1]["usage"]["completion_tokens_details"] == whole["completion_tokens_details"]


async def test_continuous_usage_counts_the_reasoning_so_far(client: httpx.AsyncClient) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = _chunks(await client.post("/v1/chat/completions", json=_body(stream=True, stream_options=options)))
    counts = [chunk["usage"]["completion_tokens_details"]["reasoning_tokens"] for chunk in chunks]
    assert counts[0] == 0  # the role chunk, as vLLM's
    assert counts == sorted(counts) and counts[-1] > 0


async def test_an_answer_that_never_ends_its_reasoning_has_no_content(r1: Preprocessor) -> None:
    async with await _client(r1, reply=f"<think>{THOUGHT}") as http:
        message = (await http.post("/v1/chat/completions", json=_body())).json()["choices"][0]["message"]
    assert message["content"] is None and message["reasoning"] == THOUGHT  # vLLM's null


async def test_include_reasoning_false_leaves_it_out(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/chat/completions", json=_body(include_reasoning=False, logprobs=True))).json()
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "It is sunny."}
    assert choice["logprobs"] is None  # its tokens would spell the reasoning
    streamed = _chunks(await client.post("/v1/chat/completions", json=_body(include_reasoning=False, stream=True)))
    assert not any("reasoning" in chunk["choices"][0]["delta"] for chunk in streamed)


async def test_completions_keep_the_whole_text(client: httpx.AsyncClient) -> None:
    body = (await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 100})).json()
    assert body["choices"][0]["text"] == REPLY
    assert "completion_tokens_details" not in body["usage"]


async def test_without_a_reasoning_parser_the_markers_are_content(preprocessor: Preprocessor) -> None:
    async with await _client(preprocessor) as http:
        body = (await http.post("/v1/chat/completions", json=_body())).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": REPLY}
    assert "completion_tokens_details" not in body["usage"]


async def test_an_earlier_answers_reasoning_in_the_history_is_accepted(client: httpx.AsyncClient) -> None:
    history = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Sunny.", "reasoning_content": THOUGHT},
        {"role": "user", "content": "tomorrow?"},
    ]
    response = await client.post("/v1/chat/completions", json=_body(messages=history))
    assert response.status_code == 200, response.text


async def test_a_body_vllms_parser_cannot_read_is_its_400_naming_the_field(client: httpx.AsyncClient) -> None:
    # vLLM's own check, which its parsers' request model makes: no empty `tools`.
    response = await client.post("/v1/chat/completions", json=_body(tools=[]))
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools", response.text
