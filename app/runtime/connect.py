"""Opening the NATS and etcd connections, retried until `connect_timeout_s`."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import Callable
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
_MAX_BACKOFF_S = 5.0
# An unreachable server is logged at the first failure, then at most this often.
RETRY_LOG_INTERVAL_S = 10.0

S = TypeVar("S")


def etcd_service(service: S | None) -> S:
    """One of an etcd3aio client's services (kv, lease, watch): None before `connect()` and after `close()`."""
    if service is None:
        raise RuntimeError("the etcd client is not connected")
    return service


class RetryLog:
    """'Cannot reach X at ADDRESS' once, then at most every RETRY_LOG_INTERVAL_S with the
    number of attempts: a service waiting for a server must not flood its log."""

    def __init__(self, server: str, address: str) -> None:
        self._server, self._address = server, address
        self._attempts = 0
        self._logged_at: float | None = None

    def failed(self, exc: BaseException) -> None:
        self._attempts += 1
        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= RETRY_LOG_INTERVAL_S:
            self._logged_at = now
            log.warning(
                "cannot reach %s at %s (%s; %d attempt(s) so far): retrying",
                self._server,
                self._address,
                _reason(exc),
                self._attempts,
            )

    def reset(self) -> None:
        self._attempts, self._logged_at = 0, None


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _Backoff:
    """Attempts at reaching a server until `connect_timeout_s` from now, waiting twice as
    long after each failed one (at most _MAX_BACKOFF_S)."""

    def __init__(self, settings: RuntimeSettings, server: str, address: str, variable: str) -> None:
        self.deadline = time.monotonic() + settings.connect_timeout_s
        self._delay = _FIRST_BACKOFF_S
        self._unreachable = (
            f"cannot reach {server} at {address} within {settings.connect_timeout_s:g}s (set {variable})"
        )

    async def wait(self, last_error: BaseException) -> None:
        """Until the next attempt; past the deadline, ConnectError saying why the last one failed."""
        if time.monotonic() >= self.deadline:
            raise ConnectError(f"{self._unreachable}: {_reason(last_error)}") from last_error
        await asyncio.sleep(min(self._delay, max(self.deadline - time.monotonic(), 0)))
        self._delay = min(self._delay * 2, _MAX_BACKOFF_S)


class NatsLink:
    """The NATS connection's state, for callers that ride out an outage: whether it is up,
    when it last came back, and whom to tell the moment it drops (a call waiting for reply
    frames that the callee may publish while this side is away: those are lost)."""

    def __init__(self) -> None:
        self._up = asyncio.Event()
        self._up.set()
        self.restored_at = -math.inf
        self._on_lost: list[Callable[[], None]] = []

    @property
    def up(self) -> bool:
        return self._up.is_set()

    def on_lost(self, callback: Callable[[], None]) -> None:
        self._on_lost.append(callback)

    def lost(self) -> None:
        self._up.clear()
        for callback in self._on_lost:
            callback()

    def restored(self) -> None:
        self.restored_at = time.monotonic()
        self._up.set()

    async def wait_up(self, timeout: float) -> bool:
        """True once the connection is up (at once if it is), False after `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                await self._up.wait()
        except TimeoutError:
            return False
        return True

    def restored_within(self, seconds: float) -> bool:
        """Whether the connection came back less than `seconds` ago: the other processes may
        not have subscribed again yet (nats-py restores subscriptions as each reconnects)."""
        return time.monotonic() - self.restored_at < seconds


async def connect_nats(settings: RuntimeSettings, link: NatsLink | None = None) -> NatsClient:
    """Connect, retrying with exponential backoff until `connect_timeout_s`; once connected,
    nats-py reconnects by itself forever (subscriptions are restored), and `link` follows
    the connection's state."""
    servers = settings.nats_urls()
    connected: list[NatsClient] = []
    retry_log = RetryLog("NATS", settings.nats_server)

    # The first connect's errors reach on_error before it raises NoServersError.
    attempt_errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        if connected:
            retry_log.failed(exc)
        else:  # logged where the first connect is retried
            attempt_errors.append(exc)

    async def on_disconnected() -> None:
        if connected and (connected[0].is_draining or connected[0].is_closed):
            return  # our own close
        log.warning("nats: disconnected from %s", ",".join(servers))
        if link is not None:
            link.lost()

    async def on_reconnected() -> None:
        retry_log.reset()
        log.info("nats: reconnected")
        if link is not None:
            link.restored()

    backoff = _Backoff(settings, "NATS", settings.nats_server, "NATS_SERVER")
    while True:
        try:
            # The first connect is ours to retry (nats-py's own retries come at a fixed
            # pace and report every attempt); reconnects after it are nats-py's.
            nc = NatsClient()
            await nc.connect(
                servers=servers,
                # One attempt at each server, then NoServersError (its own retries
                # would wait reconnect_time_wait between them, 60 times by default).
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                connect_timeout=2,
                # A link that went dead (a node cut off) is noticed within ~10 s, and the
                # connection made anew as soon as it is back, not after TCP's retransmission
                # backoff (12-16 s after a 15 s cut, measured; nats-py pings every 120 s).
                ping_interval=3,
                max_outstanding_pings=3,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
            )
            break
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            # NoServersError says only that every server failed: say why.
            last_error: BaseException = attempt_errors[-1] if attempt_errors else exc
            attempt_errors.clear()
            retry_log.failed(last_error)
        await backoff.wait(last_error)
    # nats-py reads these when the connection drops: from now on it reconnects forever.
    nc.options["allow_reconnect"] = True
    nc.options["max_reconnect_attempts"] = -1
    nc.options["reconnect_time_wait"] = 0.25
    retry_log.reset()
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


# gRPC backs off up to 120 s between attempts at a server that went away, so after an
# etcd outage of a minute the channel could stay down half a minute longer, past every
# lease. etcd3aio has no parameter for it: its channel options are extended in place.
_ETCD_RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


async def connect_etcd(settings: RuntimeSettings) -> etcd3aio.Etcd3Client:
    """Connect and prove it with a read, retrying with exponential backoff until the deadline."""
    backoff = _Backoff(settings, "etcd", settings.etcd_endpoints, "ETCD_ENDPOINTS")
    retry_log = RetryLog("etcd", settings.etcd_endpoints)
    while True:
        remaining = backoff.deadline - time.monotonic()
        client: etcd3aio.Etcd3Client | None = None
        try:
            endpoints = [await _resolve_ipv4(url) for url in settings.etcd_urls()]
            client = etcd3aio.Etcd3Client(endpoints)
            client._manager.grpc_options += _ETCD_RECONNECT_OPTIONS
            await client.connect()
            await etcd_service(client.kv).get(ETCD_ROOT.encode(), timeout=min(2.0, max(remaining, 0.1)), max_attempts=1)
            return client
        except (TimeoutError, OSError, etcd3aio.EtcdError, grpc.aio.AioRpcError) as exc:
            last_error: BaseException = exc
            retry_log.failed(exc)
            if client is not None:
                await client.close()
        await backoff.wait(last_error)


async def check_reachable(settings: RuntimeSettings) -> None:
    """Connect to NATS and etcd as a service would (the same retries and deadline), then
    close: ConnectError naming the server that cannot be reached."""
    nc, etcd = await asyncio.gather(connect_nats(settings), connect_etcd(settings))
    await nc.close()
    await etcd.close()
