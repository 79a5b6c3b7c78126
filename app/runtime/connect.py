"""Opening the NATS and etcd connections, retried until `connect_timeout_s`."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TypeVar

import etcd3aio
import grpc.aio
import nats
from nats.aio.client import Client as NatsClient

from app.protocol.names import ETCD_ROOT
from app.runtime.errors import ConnectError
from app.settings import RuntimeSettings

log = logging.getLogger(__name__)

_FIRST_BACKOFF_S = 0.1
_MAX_BACKOFF_S = 2.0

S = TypeVar("S")


def etcd_service(service: S | None) -> S:
    """One of an etcd3aio client's services (kv, lease, watch): None before `connect()` and after `close()`."""
    if service is None:
        raise RuntimeError("the etcd client is not connected")
    return service


async def connect_nats(settings: RuntimeSettings) -> NatsClient:
    """Connect and keep reconnecting forever afterwards (subscriptions are restored by nats-py)."""
    servers = settings.nats_urls()
    connected: list[NatsClient] = []

    async def on_error(exc: Exception) -> None:
        log.warning("nats: %s: %s", type(exc).__name__, exc)

    async def on_disconnected() -> None:
        if connected and (connected[0].is_draining or connected[0].is_closed):
            return  # our own close
        log.warning("nats: disconnected from %s", ",".join(servers))

    async def on_reconnected() -> None:
        log.info("nats: reconnected")

    try:
        # With max_reconnect_attempts=-1 nats-py retries the first connect too, every
        # reconnect_time_wait; the overall deadline is ours.
        nc = await asyncio.wait_for(
            nats.connect(
                servers=servers,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.25,
                connect_timeout=2,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
            ),
            timeout=settings.connect_timeout_s,
        )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise ConnectError(
            f"cannot reach NATS at {settings.nats_server} within {settings.connect_timeout_s:g}s "
            f"(set NATS_SERVER): {type(exc).__name__}"
        ) from exc
    connected.append(nc)
    return nc


async def confirm_subscriptions(nc: NatsClient) -> None:
    """Return once the server knows every subscription made so far.

    nats-py's flush() writes its PING ahead of commands still queued for its flusher task
    (a new SUB among them), so one PONG proves nothing; by the second round trip the
    queued SUB has gone out before the PING.
    """
    await nc.flush()
    await nc.flush()


async def _resolve_ipv4(host_port: str) -> str:
    """etcd3aio dials an `ipv4:` gRPC target, so host names must become addresses first."""
    host, _, port = host_port.rpartition(":")
    infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), family=socket.AF_INET)
    return f"{infos[0][4][0]}:{port}"


async def connect_etcd(settings: RuntimeSettings) -> etcd3aio.Etcd3Client:
    """Connect and prove it with a read, retrying with exponential backoff until the deadline."""
    deadline = time.monotonic() + settings.connect_timeout_s
    backoff = _FIRST_BACKOFF_S
    last_error: BaseException | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ConnectError(
                f"cannot reach etcd at {settings.etcd_endpoints} within {settings.connect_timeout_s:g}s "
                f"(set ETCD_ENDPOINTS): {last_error!r}"
            ) from last_error
        client: etcd3aio.Etcd3Client | None = None
        try:
            endpoints = [await _resolve_ipv4(url) for url in settings.etcd_urls()]
            client = etcd3aio.Etcd3Client(endpoints)
            await client.connect()
            await etcd_service(client.kv).get(ETCD_ROOT.encode(), timeout=min(2.0, max(remaining, 0.1)), max_attempts=1)
            return client
        except (TimeoutError, OSError, etcd3aio.EtcdError, grpc.aio.AioRpcError) as exc:
            last_error = exc
            if client is not None:
                await client.close()
        await asyncio.sleep(min(backoff, max(deadline - time.monotonic(), 0)))
        backoff = min(backoff * 2, _MAX_BACKOFF_S)
