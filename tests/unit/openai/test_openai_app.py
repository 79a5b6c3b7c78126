import asyncio
import json

import httpx
import pytest

from app.errors import OverloadedError, UnavailableError
from app.openai import WORKER_HEADER, create_app
from app.openai.schema import ChatCompletionRequest, parse_request
from tests.unit.openai.scripted_backend import MODEL, REPLY

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 100}


def _events(response: httpx.Response) -> list:
    """SSE frames, checking the framing itself: `data: ...` lines separated by blank lines."""
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = response.text.split("\n\n")
    assert frames[-1] == ""
    assert all(frame.startswith("data: ") and "\n" not in frame for frame in frames[:-1])
    payloads = [frame.removeprefix("data: ") for frame in frames[:-1]]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def _assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    return error


async def test_chat_non_stream(client, backend) -> None:
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert response.headers[WORKER_HEADER] == "worker-1"
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": REPLY},
        "logprobs": None,
        "finish_reason": "stop",
    }
    prompt_len = len(backend.preprocessor.chat(parse_request(ChatCompletionRequest, CHAT), "x").token_ids)
    assert body["usage"] == {
        "prompt_tokens": prompt_len,
        "completion_tokens": len(backend.reply_ids),
        "total_tokens": prompt_len + len(backend.reply_ids),
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_chat_stream_chunk_by_chunk(client, backend) -> None:
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status_code == 200 and response.headers[WORKER_HEADER] == "worker-1"
    chunks = _events(response)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all("usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = chunks[1:-1]
    assert all(c["choices"][0]["finish_reason"] is None and c["choices"][0]["delta"]["content"] for c in content)
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == REPLY
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]


async def test_stream_include_usage(client, backend) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "max_completion_tokens": 3}
    chunks = _events(await client.post("/v1/chat/completions", json=body))
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-1]["usage"]["total_tokens"] == chunks[-1]["usage"]["prompt_tokens"] + 3


async def test_completion_stream_and_non_stream_agree(client) -> None:
    whole = (await client.post("/v1/completions", json=COMPLETION)).json()
    assert whole["object"] == "text_completion" and whole["id"].startswith("cmpl-")
    assert whole["choices"][0]["text"] == REPLY and whole["choices"][0]["finish_reason"] == "stop"
    chunks = _events(await client.post("/v1/completions", json={**COMPLETION, "stream": True}))
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == REPLY
    assert chunks[-1]["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}


async def test_stop_string_across_tokens(client) -> None:
    body = (await client.post("/v1/chat/completions", json={**CHAT, "stop": ["本語 🙂"]})).json()
    assert body["choices"][0]["message"]["content"] == "Hello there! 日"
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_logprobs_shapes(client, backend) -> None:
    chat = (await client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2})).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == len(backend.reply_ids)
    assert set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert len(content[0]["top_logprobs"]) == 2 and content[0]["logprob"] == -0.25
    # The stopping EOS token has its logprob too (as in vLLM), not its text.
    eos_text = backend.preprocessor.tokenizer.decode(backend.reply_ids[-1:])
    assert bytes(b for entry in content for b in entry["bytes"]).decode() == REPLY + eos_text
    completion = (await client.post("/v1/completions", json={**COMPLETION, "logprobs": 1})).json()
    logprobs = completion["choices"][0]["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(logprobs["tokens"]) == len(logprobs["text_offset"]) == len(backend.reply_ids)
    assert all(len(top) == 1 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])


async def test_completion_top_logprobs_hold_the_chosen_token(client) -> None:
    # OpenAI's (and vLLM's): up to logprobs + 1 entries, the chosen token's among them.
    body = {**COMPLETION, "logprobs": 0}
    logprobs = (await client.post("/v1/completions", json=body)).json()["choices"][0]["logprobs"]
    chosen = zip(logprobs["tokens"], logprobs["token_logprobs"], strict=True)
    assert logprobs["top_logprobs"] == [{token: logprob} for token, logprob in chosen]


async def test_without_a_generation_prompt_the_answer_takes_the_last_messages_role(client) -> None:
    # As vLLM's server: the model continues that turn.
    body = {**CHAT, "add_generation_prompt": False}
    whole = (await client.post("/v1/chat/completions", json=body)).json()
    assert whole["choices"][0]["message"]["role"] == "user"
    chunks = _events(await client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert chunks[0]["choices"][0]["delta"]["role"] == "user"


@pytest.mark.parametrize(
    ("route", "body", "status", "param"),
    [
        ("/v1/chat/completions", b"{not json", 400, None),
        (
            "/v1/chat/completions",
            b'{"model": "tiny", "messages": [{"role": "user", "content": "\xc3\x28"}]}',
            400,
            None,
        ),
        ("/v1/chat/completions", json.dumps({**CHAT, "bogus": 1}).encode(), 400, "bogus"),
        ("/v1/chat/completions", json.dumps({**CHAT, "n": 0}).encode(), 400, "n"),
        ("/v1/chat/completions", json.dumps({**CHAT, "n": 1000}).encode(), 400, "n"),
        # vLLM's rule, the Processor's to apply (the temperature may be the model's default).
        ("/v1/completions", json.dumps({**COMPLETION, "n": 2, "temperature": 0}).encode(), 400, "n"),
        ("/v1/chat/completions", json.dumps({**CHAT, "max_tokens": 10**6}).encode(), 400, "max_tokens"),
        ("/v1/completions", json.dumps({**COMPLETION, "suffix": "x"}).encode(), 400, "suffix"),
        ("/v1/completions", json.dumps({**COMPLETION, "prompt": "x" * 1_000_000}).encode(), 400, "prompt"),
        ("/v1/completions", json.dumps({**COMPLETION, "model": "gpt-9"}).encode(), 404, "model"),
    ],
)
async def test_client_errors(client, backend, route, body, status, param) -> None:
    error = _assert_error(await client.post(route, content=body), status, param)
    if status == 404:
        assert error["code"] == "model_not_found"
        assert backend.generate_calls == 0


async def test_backend_errors_map_to_statuses(client, backend) -> None:
    backend.fail_with = UnavailableError("no worker for tiny")
    response = await client.post("/v1/chat/completions", json=CHAT)
    assert _assert_error(response, 503)["code"] == "service_unavailable"
    assert response.headers["retry-after"] == "1"
    backend.fail_with = OverloadedError("queue full", retry_after_s=3)
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    _assert_error(response, 429)
    assert response.headers["retry-after"] == "3"
    backend.fail_with = ZeroDivisionError("a bug")
    error = _assert_error(await client.post("/v1/completions", json=COMPLETION), 500)
    assert "bug" not in error["message"]
    backend.fail_with = None
    assert (await client.post("/v1/completions", json=COMPLETION)).status_code == 200


async def test_error_after_streaming_started_is_an_sse_error_event(client, backend) -> None:
    backend.fail_after_tokens = UnavailableError("worker went away")
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status_code == 200
    chunks = _events(response)
    assert chunks[-1]["error"]["code"] == "service_unavailable"
    assert backend.engine_closed.is_set()


async def test_no_models_means_503_and_unhealthy(client, backend) -> None:
    assert (await client.get("/health")).status_code == 200
    backend.models = []
    assert (await client.get("/health")).status_code == 503
    _assert_error(await client.post("/v1/chat/completions", json=CHAT), 503)
    assert (await client.get("/live")).status_code == 200


async def test_models_route(client) -> None:
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"]) for m in body["data"]] == [(MODEL, "model")]
    assert body["data"][0]["max_model_len"] > 0


async def test_unknown_route_and_method_have_openai_bodies(client) -> None:
    _assert_error(await client.get("/v1/nothing"), 404)
    _assert_error(await client.get("/v1/chat/completions"), 405)


async def test_request_id_header_is_echoed(client) -> None:
    response = await client.post("/v1/completions", json=COMPLETION, headers={"X-Request-Id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert response.json()["id"] == "cmpl-abc-123"


async def test_metrics(backend) -> None:
    app = create_app(backend)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
        text = (await client.get("/metrics")).text
    assert 'tandem_frontend_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'tandem_frontend_requests_total{route="/v1/chat/completions",status="404"} 1.0' in text
    assert 'tandem_frontend_errors_total{kind="model_not_found"} 1.0' in text
    assert "tandem_frontend_time_to_first_token_seconds_count 1.0" in text
    assert f"tandem_frontend_inter_token_latency_seconds_count {len(backend.reply_ids) - 1}.0" in text
    assert f"tandem_frontend_output_tokens_total {len(backend.reply_ids)}.0" in text
    assert "tandem_frontend_inflight_requests 0.0" in text


async def test_requests_past_the_inflight_cap_get_429_then_serving_resumes(make_backend) -> None:
    backend = make_backend(token_delay_s=0.02, repeat=True)
    app = create_app(backend, max_inflight=2)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tandem") as client:
        holding = [asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(2)]
        while backend.generate_calls < 2:
            await asyncio.sleep(0.005)
        refused = await client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert backend.generate_calls == 2  # refused before reaching the backend
        assert [r.status_code for r in await asyncio.gather(*holding)] == [200, 200]
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
