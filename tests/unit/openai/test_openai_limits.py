"""Admission (app/openai/limits.py): each API key's in-flight and per-minute limits, beside the
Frontend's own cap; slots given back when a stream ends and when its client goes away."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from app.openai import FrontendMetrics, create_app
from app.openai.auth import ApiKeys, KeyLimits, api_key
from app.openai.limits import AllOf, InflightCap, KeyLimiter
from tests.unit.openai.scripted_backend import MODEL


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _limiter(max_inflight: int | None = None, per_minute: int | None = None, **kwargs: Any) -> KeyLimiter:
    key = api_key("sk-limited", KeyLimits(max_inflight=max_inflight, requests_per_minute=per_minute))
    return KeyLimiter(key, kwargs.pop("metrics", FrontendMetrics()), **kwargs)


def test_in_flight_limit_refuses_past_it_and_admits_again_once_one_leaves() -> None:
    limiter = _limiter(max_inflight=2)
    assert limiter.try_enter() is None and limiter.try_enter() is None
    refusal = limiter.try_enter()
    assert refusal is not None and refusal.status == 429 and refusal.retry_after_s == 1
    assert "2 requests in flight" in refusal.message
    limiter.leave()
    assert limiter.try_enter() is None
    assert limiter.inflight == 2


def test_per_minute_window_slides_and_retry_after_says_when_a_place_frees() -> None:
    clock = _Clock()
    limiter = _limiter(per_minute=3, clock=clock)
    for at in (0.0, 10.0, 20.0):
        clock.now = 1000.0 + at
        assert limiter.try_enter() is None
        limiter.leave()  # the minute counts requests, not requests in flight
    clock.now = 1030.0
    refusal = limiter.try_enter()
    assert refusal is not None and refusal.status == 429 and refusal.retry_after_s == 30  # the first leaves at 1060
    assert "3 requests per minute" in refusal.message
    clock.now = 1059.5
    refusal = limiter.try_enter()
    assert refusal is not None and refusal.retry_after_s == 1  # never 0: half a second rounds up
    clock.now = 1060.0
    assert limiter.try_enter() is None  # the request of 1000 has left the window; refusals took no place
    refusal = limiter.try_enter()
    assert refusal is not None and refusal.retry_after_s == 10  # the one of 1010 leaves next
    clock.now = 1200.0
    for _ in range(3):
        assert limiter.try_enter() is None


def test_a_key_at_its_in_flight_limit_takes_no_place_in_its_minute() -> None:
    clock = _Clock()
    limiter = _limiter(max_inflight=1, per_minute=2, clock=clock)
    assert limiter.try_enter() is None
    for _ in range(5):
        assert limiter.try_enter() is not None
    limiter.leave()
    assert limiter.try_enter() is None  # the second of the minute
    limiter.leave()
    refusal = limiter.try_enter()
    assert refusal is not None and "per minute" in refusal.message


def test_all_of_enters_every_admission_or_none() -> None:
    cap = InflightCap(1)
    key = _limiter(max_inflight=1)
    both = AllOf(cap, key)
    assert both.try_enter() is None
    assert (cap.inflight, key.inflight) == (1, 1)
    refusal = both.try_enter()
    assert refusal is not None and "1 requests are in flight" in refusal.message  # the cap's, first
    assert (cap.inflight, key.inflight) == (1, 1)
    both.leave()
    assert (cap.inflight, key.inflight) == (0, 0)
    # The key refuses: the cap's slot it took first is given back.
    other = AllOf(cap, key)
    assert key.try_enter() is None
    assert other.try_enter() is not None
    assert (cap.inflight, key.inflight) == (0, 1)


def test_refusals_are_counted_by_key_id_and_limit() -> None:
    metrics = FrontendMetrics()
    clock = _Clock()
    limiter = _limiter(max_inflight=1, per_minute=1, metrics=metrics, clock=clock)
    assert limiter.try_enter() is None
    assert limiter.try_enter() is not None
    limiter.leave()
    assert limiter.try_enter() is not None
    key_id = limiter.key_id
    assert metrics.api_key_limited.labels(key_id, "max-inflight")._value.get() == 1
    assert metrics.api_key_limited.labels(key_id, "requests-per-minute")._value.get() == 1
    assert metrics.api_key_requests.labels(key_id)._value.get() == 1


# --- through the app --------------------------------------------------------------------------

KEY_A, KEY_B = "sk-alpha-limited", "sk-bravo-free"
STREAM = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 2000}
SHORT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class _HeldStream:
    """A streamed chat request driven through the ASGI app itself: its stream holds until
    `disconnect()`, which is what the server tells the app of a client gone away."""

    def __init__(self, app: Any, key: str) -> None:
        payload = json.dumps(STREAM).encode()
        self._scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"authorization", f"Bearer {key}".encode()),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
            "client": ("127.0.0.1", 40000),
            "server": ("tandem", 80),
        }
        self._payload: bytes | None = payload
        self._gone = asyncio.Event()
        self.streaming = asyncio.Event()
        self.status: int | None = None
        self.task = asyncio.create_task(app(self._scope, self._receive, self._send))

    async def _receive(self) -> dict[str, Any]:
        if self._payload is not None:
            body, self._payload = self._payload, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message.get("body"):
            self.streaming.set()

    async def disconnect(self) -> None:
        self._gone.set()
        await asyncio.wait_for(self.task, 5)


@pytest.fixture
def keyed_app(make_backend) -> tuple[Any, Any, FrontendMetrics]:
    backend = make_backend(token_delay_s=0.01, repeat=True)
    keys = ApiKeys([api_key(KEY_A, KeyLimits(max_inflight=1)), api_key(KEY_B)])
    metrics = FrontendMetrics()
    return create_app(backend, metrics=metrics, api_keys=keys), backend, metrics


async def test_a_key_past_its_in_flight_limit_gets_429_while_another_key_is_served(keyed_app) -> None:
    app, backend, metrics = keyed_app
    held = _HeldStream(app, KEY_A)
    await asyncio.wait_for(held.streaming.wait(), 5)
    assert held.status == 200
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tandem") as client:
        refused = await client.post("/v1/chat/completions", json=SHORT, headers=_bearer(KEY_A))
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert backend.generate_calls == 1  # refused before reaching the backend
        served = await client.post("/v1/chat/completions", json=SHORT, headers=_bearer(KEY_B))
        assert served.status_code == 200, served.text
        # The client goes away: its slot is given back, and the key is served again.
        await held.disconnect()
        assert metrics.inflight._value.get() == 0
        again = await client.post("/v1/chat/completions", json=SHORT, headers=_bearer(KEY_A))
        assert again.status_code == 200, again.text
        # And a stream that ends gives it back too.
        for _ in range(2):
            streamed = await client.post("/v1/chat/completions", json={**SHORT, "stream": True}, headers=_bearer(KEY_A))
            assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
        scraped = (await client.get("/metrics")).text
    key_id = api_key(KEY_A).key_id
    assert f'tandem_frontend_api_key_rate_limited_total{{key="{key_id}",limit="max-inflight"}} 1.0' in scraped
    assert f'tandem_frontend_api_key_requests_total{{key="{key_id}"}} 4.0' in scraped
    assert KEY_A not in scraped


async def test_a_key_past_its_requests_per_minute_gets_429_with_retry_after(make_backend) -> None:
    keys = ApiKeys([api_key(KEY_A, KeyLimits(requests_per_minute=2)), api_key(KEY_B)])
    app = create_app(make_backend(), api_keys=keys)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tandem") as client:
        for _ in range(2):
            assert (await client.post("/v1/chat/completions", json=SHORT, headers=_bearer(KEY_A))).status_code == 200
        refused = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3}, headers=_bearer(KEY_A)
        )
        assert refused.status_code == 429
        assert 55 <= int(refused.headers["retry-after"]) <= 60
        assert "2 requests per minute" in refused.json()["error"]["message"]
        # Another key's minute is its own.
        for _ in range(5):
            assert (await client.post("/v1/chat/completions", json=SHORT, headers=_bearer(KEY_B))).status_code == 200


async def test_the_frontends_cap_still_holds_across_keys(make_backend) -> None:
    app = create_app(
        make_backend(token_delay_s=0.01, repeat=True),
        max_inflight=1,
        api_keys=ApiKeys([api_key(KEY_A), api_key(KEY_B)]),
    )
    held = _HeldStream(app, KEY_A)
    await asyncio.wait_for(held.streaming.wait(), 5)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tandem") as client:
        refused = await client.post("/v1/chat/completions", json=SHORT, headers=_bearer(KEY_B))
        assert refused.status_code == 429 and "1 requests are in flight" in refused.json()["error"]["message"]
        await held.disconnect()
        assert (await client.post("/v1/chat/completions", json=SHORT, headers=_bearer(KEY_B))).status_code == 200
