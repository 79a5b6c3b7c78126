"""Running the front door under uvicorn: uvloop, httptools, no access log, TCP_NODELAY."""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class NoDelayHttpToolsProtocol(HttpToolsProtocol):
    """httptools with Nagle off: otherwise each small SSE chunk can wait ~40 ms for
    the client's delayed ACK (docs/benchmarks.md, "Load generator";
    tests/unit/openai/test_openai_server.py checks the option).

    asyncio's and uvloop's TCP transports set TCP_NODELAY themselves today; streaming
    latency hinges on it, so it is set here explicitly rather than left to that detail.
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


def make_server(
    app: FastAPI, host: str, port: int, *, log_level: str = "warning", graceful_shutdown_s: int | None = None
) -> uvicorn.Server:
    """A uvicorn server to run inside an existing event loop (`await server.serve()`).
    Once told to exit it stops accepting and lets the requests it has finish, for at most
    `graceful_shutdown_s` (None: as long as they take).

    `loop="uvloop"` takes effect only through `server.run()`; a caller that awaits
    `serve()` has already chosen its loop (Tandem processes install uvloop at start).
    """
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=NoDelayHttpToolsProtocol,
        access_log=False,
        log_level=log_level,
        # Streams can be long; a slow client must not be cut off by a keep-alive timer.
        timeout_keep_alive=30,
        timeout_graceful_shutdown=graceful_shutdown_s,
    )
    return uvicorn.Server(config)
