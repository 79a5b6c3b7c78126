"""The front door under a real uvicorn on a loopback port: sockets and disconnects."""

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import pytest

from app.launch.ports import free_port
from app.openai import FrontendMetrics, create_app, make_server
from tests.unit.openai.scripted_backend import MODEL


@pytest.fixture
async def served(make_backend) -> AsyncIterator[tuple]:
    backend = make_backend(token_delay_s=0.01, repeat=True)
    metrics = FrontendMetrics()
    port = free_port()
    server = make_server(create_app(backend, metrics=metrics), "127.0.0.1", port)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "uvicorn failed to start"
            await asyncio.sleep(0.01)
        yield backend, metrics, port, server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def _request(port: int, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def test_accepted_sockets_have_tcp_nodelay(served) -> None:
    _, _, port, server = served
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(100):
            if server.server_state.connections:
                break
            await asyncio.sleep(0.01)
        (connection,) = server.server_state.connections
        sock = connection.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        writer.close()


async def test_client_disconnect_cancels_the_backend_stream(served) -> None:
    backend, metrics, port, _ = served
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 2000}
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_request(port, body))
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"x-tandem-worker: worker-1" in head.lower()
    received = b""
    while received.count(b"data: ") < 5:
        received += await reader.read(4096)
    writer.close()
    await asyncio.wait_for(backend.engine_closed.wait(), 5)
    sent_at_close = backend.engine_tokens_sent
    assert sent_at_close < 200  # 2000 tokens at 10 ms each would take 20 s
    await asyncio.sleep(0.1)
    assert backend.engine_tokens_sent == sent_at_close
    assert metrics.inflight._value.get() == 0
    assert metrics.requests.labels("/v1/chat/completions", "200")._value.get() == 1
