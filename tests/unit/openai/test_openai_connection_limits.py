"""The front door's bounds on slow and stuck clients (app/openai/server.py ConnectionLimits),
under a real uvicorn on a loopback port: each test is a client that misbehaves one way."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from app.launch.ports import free_port
from app.openai import FrontendMetrics, create_app, make_server
from app.openai.server import ConnectionLimits
from tests.unit.openai.scripted_backend import MODEL, ScriptedBackend

SHORT = 0.3  # seconds: each test's bound
LONG = 30.0


@asynccontextmanager
async def serving(backend: ScriptedBackend, **limits: Any) -> AsyncIterator[tuple[int, FrontendMetrics, Any]]:
    metrics = FrontendMetrics()
    port = free_port()
    bounds = {"header_timeout_s": LONG, "body_timeout_s": LONG, "write_stall_timeout_s": LONG, **limits}
    server = make_server(create_app(backend, metrics=metrics), "127.0.0.1", port, limits=ConnectionLimits(**bounds))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "uvicorn failed to start"
            await asyncio.sleep(0.01)
        yield port, metrics, server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def _chat(port: int, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def _read_all(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything until the server closes the connection (fails if it does not in time)."""
    async with asyncio.timeout(timeout):
        return await reader.read()


def _error_of(response: bytes) -> tuple[str, dict[str, Any]]:
    head, _, body = response.partition(b"\r\n\r\n")
    return head.decode(), json.loads(body)["error"]


@pytest.mark.parametrize(
    "sent", [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty"], ids=["nothing", "slowloris"]
)
async def test_headers_that_do_not_arrive_in_time_get_408_and_the_connection_closed(
    make_backend: Callable[..., ScriptedBackend], sent: bytes
) -> None:
    async with serving(make_backend(), header_timeout_s=SHORT) as (port, _, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(sent)
        response = await _read_all(reader)
        writer.close()
    assert SHORT <= time.monotonic() - started < SHORT + 2
    head, error = _error_of(response)
    assert head.startswith("HTTP/1.1 408") and "connection: close" in head
    assert error["code"] == "request_timeout" and "headers" in error["message"]


async def test_a_body_that_does_not_arrive_in_time_closes_the_connection_and_is_no_internal_error(
    make_backend: Callable[..., ScriptedBackend],
) -> None:
    backend = make_backend()
    async with serving(backend, body_timeout_s=SHORT) as (port, metrics, _):
        whole = _chat(port, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(whole[:-5])  # the headers and all but the body's last bytes
        started = time.monotonic()
        response = await _read_all(reader)
        writer.close()
        assert SHORT <= time.monotonic() - started < SHORT + 2
        assert response == b""  # closed: the request was being read, nothing was answered
        await asyncio.sleep(0.1)
        assert metrics.errors.labels("internal_error")._value.get() == 0
    assert backend.engine_tokens_sent == 0


async def test_a_request_that_arrives_in_time_is_not_cut_by_the_bounds(
    make_backend: Callable[..., ScriptedBackend],
) -> None:
    async with serving(make_backend(token_delay_s=0.01), header_timeout_s=SHORT, body_timeout_s=SHORT) as (port, _, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # A stream that lasts well past both bounds once its request is whole.
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 60}
        writer.write(_chat(port, body))
        received = b""
        async with asyncio.timeout(10):
            while b"data: [DONE]" not in received:
                received += await reader.read(65536)
        writer.close()
    assert received.startswith(b"HTTP/1.1 200")


async def test_connections_past_the_cap_get_503_with_retry_after(make_backend: Callable[..., ScriptedBackend]) -> None:
    async with serving(make_backend(), max_connections=2) as (port, _, server):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        async with asyncio.timeout(5):
            while len(server.server_state.connections) < 2:
                await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head, error = _error_of(await _read_all(reader))
        writer.close()
        assert head.startswith("HTTP/1.1 503") and "retry-after: 1" in head
        assert error["code"] == "too_many_connections"
        # One of the held connections closes: the next one is served.
        held[0][1].close()
        async with asyncio.timeout(5):
            while len(server.server_state.connections) > 1:
                await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_chat(port, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        async with asyncio.timeout(5):
            head_line = await reader.readline()
        writer.close()
        for _, other in held[1:]:
            other.close()
    assert head_line.startswith(b"HTTP/1.1 200")


async def test_a_client_that_stops_reading_is_dropped_and_its_request_cancelled(
    make_backend: Callable[..., ScriptedBackend],
) -> None:
    backend = make_backend(token_delay_s=0.002, repeat=True)
    async with serving(backend, write_stall_timeout_s=SHORT) as (port, metrics, server):
        client = socket.socket()
        # Small buffers on both ends, so that a client that reads nothing fills them in
        # well under a second instead of after megabytes.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.setblocking(False)
        await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", port))
        async with asyncio.timeout(5):
            while not server.server_state.connections:
                await asyncio.sleep(0.01)
        (connection,) = server.server_state.connections
        connection.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        connection.transport.set_write_buffer_limits(high=4096)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4000}
        await asyncio.get_running_loop().sock_sendall(client, _chat(port, body))
        # Never read: the server's writes stall, and after the bound it drops the client.
        await asyncio.wait_for(backend.engine_closed.wait(), 10)
        sent_when_dropped = backend.engine_tokens_sent
        await asyncio.sleep(0.2)
        client.close()
        assert backend.engine_tokens_sent == sent_when_dropped < 4000
        assert metrics.inflight._value.get() == 0
        assert not server.server_state.connections
