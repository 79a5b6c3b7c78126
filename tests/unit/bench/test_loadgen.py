"""The load driver against a small in-test server that speaks OpenAI's streaming format."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bench.harness.load import (
    WORKER_HEADER,
    Connection,
    LoadConfig,
    RequestResult,
    drive,
    median,
    percentile,
    prompts,
    run_load,
    summarize,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
FIRST_TOKEN_DELAY_S = 0.03
TOKEN_GAP_S = 0.01


@dataclass
class FakeOpenAI:
    """Streams `max_tokens` one-word chunks. The i-th request (1-based) fails with 503
    when i is a multiple of 4 and otherwise names worker `w{i % 2}` in its header.
    Model "slow" never answers; model "broken" sends an error event mid-stream; model
    "truncated" ends its stream without [DONE], "unmetered" without the usage chunk."""

    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        index = len(self.bodies)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if body["model"] == "slow":
                await asyncio.sleep(30)
            if index % 4 == 0:
                return web.json_response({"error": {"message": "overloaded"}}, status=503)
            return await self._stream(request, body, {WORKER_HEADER: f"w{index % 2}"})
        finally:
            self.in_flight -= 1

    async def _stream(self, request: web.Request, body: dict[str, Any], headers: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await response.write(f"data: {data}\n\n".encode())

        def choice(text: str) -> dict[str, Any]:
            return {"index": 0, "delta": {"content": text}}

        await asyncio.sleep(FIRST_TOKEN_DELAY_S)
        # OpenAI opens a chat stream with a role-only chunk that carries no text.
        await send({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        for position in range(body["max_tokens"]):
            if position:
                await asyncio.sleep(TOKEN_GAP_S)
            if body["model"] == "broken" and position == 1:
                await send({"error": {"message": "engine died", "code": 500}})
                return response
            await send({"choices": [choice(" tok")]})
        await send({"choices": [{**choice(""), "finish_reason": "length"}]})
        if body["model"] == "truncated":
            return response
        if body.get("stream_options", {}).get("include_usage") and body["model"] != "unmetered":
            usage = {"prompt_tokens": 7, "completion_tokens": body["max_tokens"]}
            await send({"choices": [], "usage": usage})
        await send("[DONE]")
        return response


@pytest.fixture
async def fake_server() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        fake.url = f"http://127.0.0.1:{port}"
        yield fake
    finally:
        await runner.cleanup()


def test_percentile_interpolates_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([4.0], 99) == 4.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_median_leaves_out_runs_without_samples() -> None:
    assert median([3.0, math.nan, 1.0, 2.0]) == 2.0
    assert math.isnan(median([math.nan]))


def test_summarize_counts_only_successes_in_latency_and_throughput() -> None:
    results = [
        RequestResult(ok=True, e2e_s=1.0, ttft_s=0.1, itl_s=[0.01, 0.03], output_tokens=3, worker="a"),
        RequestResult(ok=True, e2e_s=2.0, ttft_s=0.3, itl_s=[0.02], output_tokens=2, worker="b"),
        RequestResult(ok=True, e2e_s=3.0, ttft_s=0.2, itl_s=[], output_tokens=1, worker="a"),
        RequestResult(ok=False, e2e_s=9.0, error_kind="http_503", error_message="busy", worker="b"),
        RequestResult(ok=False, e2e_s=9.0, error_kind="timeout", error_message="slow"),
        RequestResult(ok=False, e2e_s=9.0, error_kind="http_503", error_message="busy again"),
    ]
    summary = summarize(results, duration_s=2.0)
    assert (summary.requests, summary.completed, summary.failed) == (6, 3, 3)
    assert summary.request_throughput == pytest.approx(1.5)
    assert summary.total_output_tokens == 6
    assert summary.output_token_throughput == pytest.approx(3.0)
    assert summary.ttft_p50_s == pytest.approx(0.2)
    assert summary.ttft_p99_s == pytest.approx(0.298)
    assert summary.itl_p50_s == pytest.approx(0.02)
    assert summary.e2e_p50_s == pytest.approx(2.0)
    assert summary.errors == {"http_503": 2, "timeout": 1}
    assert summary.error_examples == {"http_503": "busy", "timeout": "slow"}
    assert summary.workers == {"a": 2, "b": 1}


def test_prompts_share_the_requested_prefix_per_group() -> None:
    words = [p.split() for p in prompts(6, 100, shared_ratio=0.4, groups=2)]
    assert all(len(w) == 100 for w in words)
    assert words[0][:40] == words[2][:40] == words[4][:40]
    assert words[1][:40] == words[3][:40] == words[5][:40]
    assert words[0][:40] != words[1][:40]
    assert len({" ".join(w[40:]) for w in words}) == 6
    assert prompts(6, 100, shared_ratio=0.4, groups=2) == prompts(6, 100, shared_ratio=0.4, groups=2)
    assert prompts(2, 100) != prompts(2, 100, seed=1)


async def test_connections_disable_nagle(fake_server: FakeOpenAI) -> None:
    connection = await Connection.open("127.0.0.1", int(fake_server.url.rsplit(":", 1)[1]))
    try:
        sock = connection._writer.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        connection.close()


async def test_streaming_run_counts_tokens_errors_and_workers(fake_server: FakeOpenAI) -> None:
    config = LoadConfig(
        url=fake_server.url,
        model="tiny",
        concurrency=3,
        requests=12,
        prompt_tokens=50,
        shared_prefix_ratio=0.5,
        max_tokens=5,
        ignore_eos=True,
    )
    summary, results = await run_load(config)

    assert (summary.requests, summary.completed, summary.failed) == (12, 9, 3)
    assert summary.errors == {"http_503": 3}
    assert "overloaded" in summary.error_examples["http_503"]
    assert summary.total_output_tokens == 9 * 5
    assert summary.workers == {"w1": 6, "w0": 3}
    assert summary.mean_prompt_tokens == 7
    ok = [r for r in results if r.ok]
    assert all(len(r.itl_s) == 4 for r in ok)  # one gap between each pair of 5 content chunks
    assert summary.ttft_p50_s >= FIRST_TOKEN_DELAY_S
    assert TOKEN_GAP_S * 0.9 <= summary.itl_p50_s < FIRST_TOKEN_DELAY_S
    assert all(r.ttft_s is not None and r.e2e_s >= r.ttft_s + sum(r.itl_s) - 1e-6 for r in ok)
    assert 2 <= fake_server.max_in_flight <= 3

    body = fake_server.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == 5 and body["model"] == "tiny"
    prompts = [b["messages"][0]["content"].split() for b in fake_server.bodies]
    assert all(p[:25] == prompts[0][:25] for p in prompts)


async def test_warmup_is_not_measured(fake_server: FakeOpenAI) -> None:
    config = LoadConfig(url=fake_server.url + "/v1", model="tiny", requests=3, warmup=2, max_tokens=4)
    summary, _ = await run_load(config)

    assert len(fake_server.bodies) == 5
    # Requests 1-2 are the warm-up, 3 and 5 succeed, 4 fails with 503.
    assert (summary.requests, summary.completed, summary.failed) == (3, 2, 1)
    assert summary.total_output_tokens == 8
    assert summary.e2e_p50_s >= FIRST_TOKEN_DELAY_S


async def test_failures_are_counted_by_kind_without_stopping(fake_server: FakeOpenAI) -> None:
    broken, _ = await run_load(LoadConfig(url=fake_server.url, model="broken", requests=3, max_tokens=4))
    assert broken.errors == {"stream_error": 3}
    assert broken.error_examples["stream_error"] == "engine died"

    slow, _ = await run_load(LoadConfig(url=fake_server.url, model="slow", requests=2, concurrency=2, timeout_s=0.2))
    assert slow.errors == {"timeout": 2}

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    refused, _ = await run_load(LoadConfig(url=f"http://127.0.0.1:{closed_port}", model="m", requests=2))
    assert refused.failed == 2 and list(refused.errors) == ["ConnectionRefusedError"]


async def test_a_stream_without_done_or_usage_is_a_failure(fake_server: FakeOpenAI) -> None:
    truncated, _ = await run_load(LoadConfig(url=fake_server.url, model="truncated", requests=3, max_tokens=4))
    assert truncated.errors == {"truncated_stream": 3}
    unmetered, _ = await run_load(LoadConfig(url=fake_server.url, model="unmetered", requests=3, max_tokens=4))
    assert unmetered.errors == {"http_503": 1, "missing_usage": 2}  # the fourth request of the server is a 503


async def test_command_line_prints_json_summary(fake_server: FakeOpenAI) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.loadgen",
        "--url",
        fake_server.url,
        "--model",
        "tiny",
        "--requests",
        "4",
        "--max-tokens",
        "3",
        "--json",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    summary = json.loads(stdout)
    assert (summary["completed"], summary["failed"], summary["total_output_tokens"]) == (3, 1, 9)
    assert summary["errors"] == {"http_503": 1}
    assert summary["ttft_p50_s"] >= FIRST_TOKEN_DELAY_S


async def test_an_endless_load_stops_by_time_with_every_prompt_its_own(fake_server: FakeOpenAI) -> None:
    config = LoadConfig(url=fake_server.url, model="m", concurrency=4, max_tokens=2, max_duration_s=1.0)
    results, wall_s = await drive(config, config.endless_bodies(batch=3))
    assert 1.0 <= wall_s < 3.0
    # Past a few batches of 3, even on a loaded machine (4 in 0.5 s were seen in CI's).
    assert len(results) == len(fake_server.bodies) > 6
    prompts = [b["messages"][0]["content"] for b in fake_server.bodies]
    assert len(set(prompts)) == len(prompts)
    assert prompts[:5] == [b["messages"][0]["content"] for b in config.bodies(5)]


async def test_the_responses_being_read_are_counted_by_worker(fake_server: FakeOpenAI) -> None:
    config = LoadConfig(url=fake_server.url, model="m", concurrency=3, requests=6, max_tokens=5)
    reading: Counter[str] = Counter()
    seen: list[int] = []

    async def sample() -> None:
        while True:
            seen.append(reading.total())
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    results, _ = await drive(config, config.bodies(6), reading)
    sampler.cancel()
    assert max(seen) == 3  # the 503 of every fourth request names no worker and is never counted
    assert set(reading) == {"w0", "w1"} and reading.total() == 0
    assert sum(r.ok for r in results) == 5
