"""The Frontend's request timeout: no generation request is open for ever, whatever a hop
below it fails to notice (a worker that never answers, a stream that stalls)."""

import asyncio
import json

import httpx

from app.openai import create_app
from tests.unit.openai.scripted_backend import MODEL

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}


def _client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tandem")  # type: ignore[arg-type]


def _inflight(metrics: str) -> float:
    line = next(line for line in metrics.splitlines() if line.startswith("tandem_frontend_inflight_requests "))
    return float(line.split()[1])


async def test_a_request_with_no_output_by_its_timeout_gets_504_and_its_engine_work_stops(make_backend) -> None:
    backend = make_backend(token_delay_s=30)  # the first token would take 30 s
    app = create_app(backend, max_inflight=1, request_timeout_s=0.3)
    async with _client(app) as client:
        started = asyncio.get_running_loop().time()
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert asyncio.get_running_loop().time() - started < 2
        assert response.status_code == 504, response.text
        assert response.json()["error"]["type"] == "timeout_error"
        assert response.json()["error"]["code"] == "request_timeout"
        assert "0.3 s" in response.json()["error"]["message"]
        assert backend.engine_closed.is_set()  # cancelled, not left generating
        # Its admission slot is free again (the cap is 1): the next request is admitted, not a 429.
        backend.token_delay_s = 0
        assert (await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert _inflight(metrics) == 0
        assert 'tandem_frontend_requests_total{route="/v1/chat/completions",status="504"} 1.0' in metrics


async def test_a_stream_past_its_timeout_ends_with_an_error_event_and_its_engine_work_stops(make_backend) -> None:
    backend = make_backend(token_delay_s=0.02, repeat=True)  # 1000 tokens: 20 s
    app = create_app(backend, request_timeout_s=0.5)
    async with _client(app) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert response.status_code == 200  # the stream had begun
        payloads = [frame.removeprefix("data: ") for frame in response.text.split("\n\n") if frame]
        assert payloads[-1] == "[DONE]"
        chunks = [json.loads(payload) for payload in payloads[:-1]]
        assert chunks[-1]["error"]["code"] == "request_timeout"
        # Tokens came before it, and no chunk says the reply finished.
        assert any(chunk.get("choices") and chunk["choices"][0]["delta"].get("content") for chunk in chunks[:-1])
        assert all(choice["finish_reason"] is None for chunk in chunks[:-1] for choice in chunk.get("choices", []))
        assert backend.engine_closed.is_set()
        assert 5 < backend.engine_tokens_sent < 100
        assert _inflight((await client.get("/metrics")).text) == 0


async def test_a_responses_stream_past_its_timeout_ends_with_openais_error_event(make_backend) -> None:
    backend = make_backend(token_delay_s=0.02, repeat=True)
    app = create_app(backend, request_timeout_s=0.5)
    async with _client(app) as client:
        body = {"model": MODEL, "input": "hi", "max_output_tokens": 1000, "stream": True}
        response = await client.post("/v1/responses", json=body)
        assert response.status_code == 200
        last = response.text.strip().split("\n\n")[-1]
        assert last.startswith("event: error\n")
        assert json.loads(last.split("\n", 1)[1].removeprefix("data: "))["code"] == "request_timeout"
        assert backend.engine_closed.is_set()
