"""vLLM's /tokenize, /detokenize and /version routes, the OpenAPI document, and which model a
request names, on the real Preprocessor (the scripted backend's).

The token ids are checked against the model's own Hugging Face tokenizer and chat template.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from app.openai.schema import ChatCompletionRequest, parse_request
from app.preprocess import Preprocessor
from tests.unit.openai.scripted_backend import MODEL, ScriptedBackend

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 日本語? 🙂"},
]


def _hf_chat_ids(preprocessor: Preprocessor, messages: list[dict[str, Any]], **template: Any) -> list[int]:
    rendered: Any = preprocessor.tokenizer.apply_chat_template(messages, tokenize=True, **template)
    return list(rendered["input_ids"] if not isinstance(rendered, list) else rendered)


def _assert_error(response: httpx.Response, status: int, param: str | None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    return str(error["message"])


async def test_tokenize_a_prompt_as_the_hf_tokenizer_does(client: httpx.AsyncClient, backend: ScriptedBackend) -> None:
    tokenizer = backend.preprocessor.tokenizer
    prompt = "Hello there! 日本語 🙂"
    body = (await client.post("/tokenize", json={"model": MODEL, "prompt": prompt})).json()
    expected = tokenizer(prompt).input_ids
    assert body == {
        "count": len(expected),
        "max_model_len": backend.models[0].max_model_len,
        "tokens": expected,
        "token_strs": None,
    }
    without = (await client.post("/tokenize", json={"prompt": prompt, "add_special_tokens": False})).json()
    assert without["tokens"] == tokenizer(prompt, add_special_tokens=False).input_ids == expected[1:]
    strs = (await client.post("/tokenize", json={"prompt": prompt, "return_token_strs": True})).json()
    assert strs["token_strs"] == tokenizer.convert_ids_to_tokens(expected)


async def test_tokenize_chat_messages_as_the_chat_template_does(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    preprocessor = backend.preprocessor

    async def tokenize(**fields: Any) -> list[int]:
        response = await client.post("/tokenize", json={"model": MODEL, "messages": CHAT, **fields})
        assert response.status_code == 200, response.text
        return list(response.json()["tokens"])

    with_prompt = await tokenize()
    assert with_prompt == _hf_chat_ids(preprocessor, CHAT, add_generation_prompt=True)
    # What a chat completion of the same messages sends the engine.
    chat = parse_request(ChatCompletionRequest, {"model": MODEL, "messages": CHAT})
    assert with_prompt == preprocessor.chat(chat, "r").token_ids
    without_prompt = await tokenize(add_generation_prompt=False)
    assert without_prompt == _hf_chat_ids(preprocessor, CHAT, add_generation_prompt=False)
    assert with_prompt[: len(without_prompt)] == without_prompt and len(with_prompt) > len(without_prompt)
    # The template holds BOS; add_special_tokens adds the tokenizer's on top.
    assert await tokenize(add_special_tokens=True) == [preprocessor.tokenizer.bos_token_id, *with_prompt]
    open_ended = [*CHAT, {"role": "assistant", "content": "It is"}]
    continued = await tokenize(messages=open_ended, add_generation_prompt=False, continue_final_message=True)
    assert continued == _hf_chat_ids(preprocessor, open_ended, continue_final_message=True)
    assert str(preprocessor.tokenizer.decode(continued)).endswith("It is")


async def test_detokenize_gives_the_hf_tokenizers_text(client: httpx.AsyncClient, backend: ScriptedBackend) -> None:
    tokenizer = backend.preprocessor.tokenizer
    ids = tokenizer("Hello there! 日本語 🙂").input_ids
    response = await client.post("/detokenize", json={"model": MODEL, "tokens": ids})
    assert response.status_code == 200, response.text
    # Special tokens included, as vLLM's server answers.
    assert response.json() == {"prompt": tokenizer.decode(ids)}
    assert response.json()["prompt"].startswith(tokenizer.bos_token)
    assert (await client.post("/detokenize", json={"tokens": []})).json() == {"prompt": ""}


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "hi", "echo": True}, "echo"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"messages": [{"role": "user"}]}, "messages[0]"),
        ("/tokenize", {"messages": CHAT, "continue_final_message": True}, "continue_final_message"),
        ("/tokenize", {"messages": CHAT, "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
        ("/detokenize", {"tokens": [1, -1]}, "tokens[1]"),
        ("/detokenize", {"tokens": [1, 10**6]}, "tokens"),
        ("/detokenize", {"tokens": "1 2"}, "tokens"),
    ],
)
async def test_bad_tokenizer_requests_are_400s_naming_the_field(
    client: httpx.AsyncClient, route: str, body: dict[str, Any], param: str
) -> None:
    _assert_error(await client.post(route, json=body), 400, param)


async def test_bodies_that_are_not_json_objects_are_400s(client: httpx.AsyncClient) -> None:
    for route in ("/tokenize", "/detokenize"):
        assert "JSON" in _assert_error(await client.post(route, content=b"{nope"), 400, None)
        assert "JSON object" in _assert_error(await client.post(route, content=b"[1]"), 400, None)


async def test_an_unknown_model_is_a_404_listing_the_served_ones(client: httpx.AsyncClient) -> None:
    requests = [
        ("/v1/chat/completions", {"model": "gpt-9", "messages": CHAT}),
        ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}),
        ("/tokenize", {"model": "gpt-9", "prompt": "hi"}),
        ("/detokenize", {"model": "gpt-9", "tokens": [1]}),
    ]
    for route, body in requests:
        response = await client.post(route, json=body)
        message = _assert_error(response, 404, "model")
        assert message == f"The model `gpt-9` does not exist. Valid aliases: {MODEL}.", route
        assert response.json()["error"]["code"] == "model_not_found"


async def test_without_a_model_tokenize_needs_exactly_one_served(
    client: httpx.AsyncClient, backend: ScriptedBackend
) -> None:
    backend.models = [*backend.models, backend.models[0].__class__(id="other", max_model_len=8)]
    message = _assert_error(await client.post("/tokenize", json={"prompt": "hi"}), 400, "model")
    assert MODEL in message and "other" in message
    named = (await client.post("/tokenize", json={"model": "other", "prompt": "hi"})).json()
    assert named["max_model_len"] == 8
    backend.models = []
    response = await client.post("/detokenize", json={"tokens": [1]})
    assert response.status_code == 503 and response.headers["retry-after"]


async def test_tokenizer_routes_count_in_the_request_metrics(client: httpx.AsyncClient) -> None:
    await client.post("/tokenize", json={"prompt": "hi"})
    await client.post("/detokenize", json={"tokens": [-1]})
    text = (await client.get("/metrics")).text
    assert 'tandem_frontend_requests_total{route="/tokenize",status="200"} 1.0' in text
    assert 'tandem_frontend_requests_total{route="/detokenize",status="400"} 1.0' in text


async def test_version_names_tandem_and_its_vllm(client: httpx.AsyncClient) -> None:
    body = (await client.get("/version")).json()
    assert set(body) == {"version", "vllm_version"}
    assert body["version"] and body["version"][0].isdigit()


async def test_models_list_has_vllms_fields(client: httpx.AsyncClient, backend: ScriptedBackend) -> None:
    (card,) = (await client.get("/v1/models")).json()["data"]
    assert card == {
        "object": "model",
        "id": MODEL,
        "max_model_len": backend.preprocessor.max_model_len,
        "created": 1,
        "owned_by": "tandem",
        "root": "/models/tiny",
        "parent": None,
    }


def _resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    assert ref.startswith("#/components/schemas/"), ref
    resolved: dict[str, Any] = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return resolved


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [ref for key, value in node.items() for ref in ([value] if key == "$ref" else _refs(value))]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


async def test_the_openapi_document_lists_the_routes_and_their_bodies(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    paths = document["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"):
        assert set(paths[path]) == {"post"}, path
    for path in ("/v1/models", "/version", "/health", "/live", "/metrics"):
        assert set(paths[path]) == {"get"}, path

    def body_fields(path: str) -> list[set[str]]:
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        branches = schema.get("anyOf", [schema])
        return [set(_resolve(document, branch)["properties"]) for branch in branches]

    (chat,) = body_fields("/v1/chat/completions")
    assert {"model", "messages", "max_completion_tokens", "stream"} <= chat
    (completion,) = body_fields("/v1/completions")
    assert {"model", "prompt", "max_tokens"} <= completion
    prompt_body, chat_body = body_fields("/tokenize")
    assert {"prompt", "add_special_tokens", "return_token_strs"} <= prompt_body
    assert {"messages", "add_generation_prompt", "add_special_tokens", "return_token_strs"} <= chat_body
    assert body_fields("/detokenize") == [{"model", "tokens"}]
    tokenized = paths["/tokenize"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(_resolve(document, tokenized)["properties"]) == {"count", "max_model_len", "tokens", "token_strs"}
    assert "404" in paths["/tokenize"]["post"]["responses"]
    # Every reference resolves.
    for ref in _refs(document):
        _resolve(document, {"$ref": ref})

    docs = await client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
