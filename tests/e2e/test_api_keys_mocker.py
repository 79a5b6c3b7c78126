"""API keys and per-key limits end to end (docs/security.md), through the official `openai` client.

Real NATS and etcd, `tandem serve graphs.agg:Frontend` (Processor and a mocker VllmWorker)
under supervisord, one graph for the module. The Frontend's keys come from each source an
operator has: its section's `api-keys` (LIMITED, a mapping with `max-inflight: 1`), the
TANDEM_API_KEYS_FILE a container would mount (FREE) and TANDEM_API_KEYS (FROM_ENV). The
mocker decodes a token each 20 ms, so a stream of 1500 tokens holds a slot for 30 s unless
its client goes away first.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.infra import EtcdServer, NatsServer
from testbed.graphs import ServedGraph
from tests.e2e.graph_helpers import mocker_agg_config

pytestmark = pytest.mark.e2e

MODEL = "tiny-llama"
LIMITED = "sk-e2e-limited-7f3a91"
FREE = "sk-e2e-from-file-c42d07"
FROM_ENV = "sk-e2e-from-env-9b1e55"
KEYS = (LIMITED, FREE, FROM_ENV)
MESSAGES: list[Any] = [{"role": "user", "content": "Tell me a long story."}]
HOLD_TOKENS = 1500


def _key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def _config(tiny_model: Path) -> dict[str, Any]:
    return mocker_agg_config(
        tiny_model,
        MODEL,
        frontend={"api-keys": [{"key": LIMITED, "max-inflight": 1}]},
        worker={"decode-base-ms": 20},
    )


@pytest.fixture(scope="module")
async def graph(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, nats_server: NatsServer, etcd_server: EtcdServer
) -> AsyncIterator[ServedGraph]:
    workdir = tmp_path_factory.mktemp("api-keys")
    key_file = workdir / "api-keys"
    key_file.write_text(f"# mounted secret\n{FREE}\n")
    environ = {**os.environ, "TANDEM_API_KEYS_FILE": str(key_file), "TANDEM_API_KEYS": FROM_ENV}
    async with ServedGraph(
        "graphs.agg:Frontend", _config(tiny_model), workdir, nats_server.url, etcd_server.url, env=environ
    ) as served:
        await served.wait_ready(1, processors=1, timeout=120)
        yield served


def _client(graph: ServedGraph, key: str) -> openai.AsyncOpenAI:
    # No retries: a 429 must reach the test, not be retried after its Retry-After.
    return openai.AsyncOpenAI(base_url=f"{graph.base_url}/v1", api_key=key, max_retries=0, timeout=60)


def _metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def test_each_sources_key_streams_a_chat_completion_through_the_official_client(graph: ServedGraph) -> None:
    for key in KEYS:
        async with _client(graph, key) as client:
            stream = await client.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=8, stream=True, extra_body={"ignore_eos": True}
            )
            chunks = [chunk async for chunk in stream]
        assert chunks[-1].choices[-1].finish_reason == "length", key
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), key


async def test_a_wrong_key_or_none_is_401_and_the_probes_stay_open(graph: ServedGraph) -> None:
    async with _client(graph, "sk-not-a-key") as client:
        with pytest.raises(openai.AuthenticationError) as raised:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert raised.value.status_code == 401
    assert raised.value.code == "invalid_api_key" and raised.value.type == "invalid_request_error"
    async with httpx.AsyncClient(base_url=graph.base_url, timeout=30) as http:
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/tokenize")):
            refused = await http.request(method, path, json={"model": MODEL, "messages": MESSAGES})
            assert refused.status_code == 401, path
            error = refused.json()["error"]
            assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/live")).status_code == 200
        scraped = await http.get("/metrics")  # open: `metrics-auth` is not set
    assert scraped.status_code == 200
    assert _metric(scraped.text, "tandem_frontend_errors_total", kind="invalid_api_key") >= 4
    for key in KEYS:
        assert key not in scraped.text


async def test_a_key_past_its_in_flight_limit_gets_429_while_another_key_is_served(graph: ServedGraph) -> None:
    async with _client(graph, LIMITED) as limited, _client(graph, FREE) as free:
        held = await limited.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=HOLD_TOKENS, stream=True, extra_body={"ignore_eos": True}
        )
        first = await anext(aiter(held))  # the stream is under way: LIMITED's one slot is taken
        assert first.choices
        with pytest.raises(openai.RateLimitError) as raised:
            await limited.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
        assert raised.value.status_code == 429
        assert raised.value.response.headers["retry-after"] == "1"
        assert raised.value.code == "rate_limit_exceeded"
        served = await free.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
        assert served.choices[0].message.content
        # The client goes away mid-stream: the Frontend gives the slot back.
        await held.close()
        async with httpx.AsyncClient(base_url=graph.base_url, timeout=30) as http:
            deadline = time.monotonic() + 10
            while True:
                scraped = (await http.get("/metrics")).text
                if _metric(scraped, "tandem_frontend_inflight_requests") == 0:
                    break
                assert time.monotonic() < deadline, "the held stream's slot was not given back"
                await asyncio.sleep(0.05)
        again = await limited.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
        assert again.choices[0].message.content
    limited_id = _key_id(LIMITED)
    refused = _metric(scraped, "tandem_frontend_api_key_rate_limited_total", key=limited_id, limit="max-inflight")
    assert refused == 1
    assert _metric(scraped, "tandem_frontend_api_key_rate_limited_total", key=_key_id(FREE)) == 0


async def test_the_log_names_keys_by_id_only(graph: ServedGraph) -> None:
    # supervisord relays the Frontend's output a moment later (it polls the pipes).
    deadline = time.monotonic() + 10
    while " API keys: " not in (log := graph.log_path.read_text(errors="replace")):
        assert time.monotonic() < deadline, graph.log_tail()
        await asyncio.sleep(0.1)
    for key in KEYS:
        assert _key_id(key) in log
        assert key not in log
