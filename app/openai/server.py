"""Running the front door under uvicorn: uvloop, httptools, no access log, TCP_NODELAY, and
the bounds that keep slow or stuck clients from holding the Frontend (`ConnectionLimits`)."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from dataclasses import dataclass
from typing import Any

import msgspec
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.logs import Throttled

logger = logging.getLogger(__name__)
# Slow clients come by the hundred in a slowloris attack: a sample of them.
_slow_client_log = Throttled(logger, logging.INFO)


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client connection may hold, and for how long it may hold it idle.

    uvicorn bounds none of these: a client that opens connections and sends nothing, or
    sends its headers a byte a minute (slowloris), holds a socket forever; a streaming
    client that stops reading leaves its request generating into memory until
    `max_tokens`. Past a bound the connection is closed; a request it carried is cancelled
    (its engine work stops) as when the client disconnects.
    """

    # Open connections past this get 503 with Retry-After and are closed (None: no cap).
    max_connections: int | None = 4096
    # From the connection's start, or a request's first byte, to the end of its headers.
    header_timeout_s: float = 30.0
    # From the end of the headers to the end of the body: 32 MiB at 1 MB/s fits.
    body_timeout_s: float = 60.0
    # A response the client reads none of for this long (the socket's buffers stay full).
    write_stall_timeout_s: float = 60.0


def _raw_response(status: str, message: str, kind: str, code: str, retry_after_s: int | None = None) -> bytes:
    """A whole HTTP/1.1 response with OpenAI's error body, for the protocol to write itself
    (no ASGI cycle exists yet), closing the connection."""
    body = msgspec.json.encode({"error": {"message": message, "type": kind, "param": None, "code": code}})
    head = [f"HTTP/1.1 {status}", "content-type: application/json", f"content-length: {len(body)}"]
    if retry_after_s is not None:
        head.append(f"retry-after: {retry_after_s}")
    head.append("connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_TOO_MANY_CONNECTIONS = _raw_response(
    "503 Service Unavailable",
    "the server has too many open connections; retry shortly",
    "service_unavailable",
    "too_many_connections",
    retry_after_s=1,
)


class FrontDoorProtocol(HttpToolsProtocol):
    """httptools with Nagle off and `ConnectionLimits` applied.

    Nagle off: otherwise each small SSE chunk can wait ~40 ms for the client's delayed ACK
    (docs/benchmarks.md, "Load generator"; tests/unit/openai/test_openai_server.py checks
    the option). asyncio's and uvloop's TCP transports set TCP_NODELAY themselves today;
    streaming latency hinges on it, so it is set here explicitly rather than left to that
    detail.

    The bounds are timers on the event loop, armed and cancelled by the parser's and the
    transport's callbacks: nothing runs per byte or per chunk.
    """

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits
        self._read_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        cap = self._limits.max_connections
        if cap is not None and len(self.connections) > cap:
            logger.warning("%d connections open (max-connections %d): refusing one", len(self.connections) - 1, cap)
            transport.write(_TOO_MANY_CONNECTIONS)
            transport.close()
            return
        self._arm_read(self._limits.header_timeout_s, "its request headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read()
        self._cancel_stall()
        super().connection_lost(exc)

    # --- reading: headers, then the body, each within its time -------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_read(self._limits.header_timeout_s, "its request headers")

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm_read(self._limits.body_timeout_s, "its request body")

    def on_message_complete(self) -> None:
        # Idle from here until the next request's first byte: uvicorn's keep-alive timer
        # bounds that (it is armed once the response is complete).
        self._cancel_read()
        super().on_message_complete()

    def _arm_read(self, seconds: float, awaited: str) -> None:
        self._cancel_read()
        self._read_timer = self.loop.call_later(seconds, self._read_timed_out, seconds, awaited)

    def _cancel_read(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self, seconds: float, awaited: str) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        _slow_client_log.log(
            "closing a connection from %s: %s did not arrive within %g s", _peer(self.client), awaited, seconds
        )
        if self.cycle is None or self.cycle.response_complete:
            # No request is being answered: the client may still read why.
            self.transport.write(
                _raw_response(
                    "408 Request Timeout",
                    f"{awaited} did not arrive within {seconds:g} s",
                    "invalid_request_error",
                    "request_timeout",
                )
            )
        self.transport.close()

    # --- writing: a client that reads nothing is dropped ------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self._limits.write_stall_timeout_s, self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_stall()

    def _cancel_stall(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _write_stalled(self) -> None:
        self._stall_timer = None
        logger.warning(
            "dropping a connection from %s: it read nothing of its response for %g s (its request is cancelled)",
            _peer(self.client),
            self._limits.write_stall_timeout_s,
        )
        # abort, not close: close would wait for the unread buffer to drain, forever.
        # connection_lost then tells the request's ASGI cycle the client is gone.
        self.transport.abort()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "an unknown peer"


def make_server(
    app: FastAPI,
    host: str,
    port: int,
    *,
    log_level: str = "warning",
    graceful_shutdown_s: int | None = None,
    limits: ConnectionLimits | None = None,
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
        http=functools.partial(FrontDoorProtocol, limits=limits or ConnectionLimits()),  # type: ignore[arg-type]
        access_log=False,
        log_level=log_level,
        # Streams can be long; a slow client must not be cut off by a keep-alive timer.
        timeout_keep_alive=30,
        timeout_graceful_shutdown=graceful_shutdown_s,
    )
    return uvicorn.Server(config)
