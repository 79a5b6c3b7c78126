"""Opening the NATS and etcd connections, retried until `connect_timeout_s`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

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
    if isinstance(exc, grpc.aio.AioRpcError):  # its str() is a multi-line dump
        return f"gRPC {exc.code().name}: {exc.details()}"
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


def _read_file(server: str, variable: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConnectError(f"{server}: cannot read {variable}={path}: {exc.strerror or exc}") from exc


class SecretFile:
    """A secret kept in a file (a mounted secret), read again each time it is asked for: a
    rotated password is used from the next (re)connection or re-authentication on, without
    a restart. Unreadable later on: the last value read (a secret being replaced)."""

    def __init__(self, server: str, variable: str, path: str) -> None:
        self._path = path
        try:
            self._value = self._read()
        except OSError as exc:
            raise ConnectError(f"{server}: cannot read {variable}={path}: {exc.strerror or exc}") from exc

    def _read(self) -> str:
        return Path(self._path).read_text().strip()

    def __call__(self) -> str:
        with contextlib.suppress(OSError):
            self._value = self._read()
        return self._value


def _ssl_context(server: str, ca: str | None, cert: str | None, key: str | None, prefix: str) -> ssl.SSLContext:
    """A client context trusting `ca` (None: the system's CAs), presenting `cert` where given."""
    try:
        context = ssl.create_default_context(cafile=ca)
        if cert and key:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(f"{prefix}_{name}={value}" for name, value in (("CA", ca), ("CERT", cert)) if value)
        raise ConnectError(f"{server}: cannot load the TLS files ({files}): {_reason(exc)}") from exc
    return context


def _nats_security_options(settings: RuntimeSettings) -> dict[str, Any]:
    """nats-py's connect options for TLS and credentials (none where none are configured;
    a user:password in NATS_SERVER nats-py reads itself)."""
    options: dict[str, Any] = {}
    if settings.nats_tls_ca or settings.nats_tls_cert:
        options["tls"] = _ssl_context(
            "NATS", settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key, "NATS_TLS"
        )
    if settings.nats_password_file:
        options["user"] = urlsplit(settings.nats_urls()[0]).username
        options["password"] = SecretFile("NATS", "NATS_PASSWORD_FILE", settings.nats_password_file)
    if settings.nats_token_file:
        options["token"] = SecretFile("NATS", "NATS_TOKEN_FILE", settings.nats_token_file)
    if settings.nats_creds_file:
        SecretFile("NATS", "NATS_CREDS_FILE", settings.nats_creds_file)  # unreadable: said at once
        options["user_credentials"] = settings.nats_creds_file
    return options


def _nats_refusal(exc: BaseException) -> str | None:
    """Why the NATS server turned us away for good, where it did: retrying cannot help, so
    the process exits at once with the reason instead of retrying until connect_timeout_s."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"presented a certificate this process does not trust ({_reason(exc)}): NATS_TLS_CA must name the CA "
            "that signed it, for the address in NATS_SERVER"
        )
    if isinstance(exc, nats.errors.AuthorizationError) or (
        isinstance(exc, nats.errors.Error) and "authorization violation" in str(exc).lower()
    ):
        return (
            f"rejected the credentials ({_reason(exc)}): check the user and password in NATS_SERVER, "
            "NATS_PASSWORD_FILE, NATS_TOKEN_FILE or NATS_CREDS_FILE"
        )
    return None


async def connect_nats(settings: RuntimeSettings, link: NatsLink | None = None) -> NatsClient:
    """Connect, retrying with exponential backoff until `connect_timeout_s`; once connected,
    nats-py reconnects by itself forever (subscriptions are restored), and `link` follows
    the connection's state."""
    servers = settings.nats_urls()
    shown = settings.nats_server_redacted()
    security = _nats_security_options(settings)
    connected: list[NatsClient] = []
    retry_log = RetryLog("NATS", shown)

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
        log.warning("nats: disconnected from %s", shown)
        if link is not None:
            link.lost()

    async def on_reconnected() -> None:
        retry_log.reset()
        log.info("nats: reconnected")
        if link is not None:
            link.restored()

    backoff = _Backoff(settings, "NATS", shown, "NATS_SERVER")
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
                **security,
            )
            break
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            # NoServersError says only that every server failed: say why.
            last_error: BaseException = attempt_errors[-1] if attempt_errors else exc
            attempt_errors.clear()
            refusal = _nats_refusal(last_error)
            if refusal is not None:
                raise ConnectError(f"NATS at {shown} {refusal}") from last_error
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


# etcd's auth tokens expire (simple tokens after 5 idle minutes, the JWTs of `infra up
# --secure` after 10): each client authenticates again this often. Each authentication
# costs etcd one bcrypt check, so not much more often.
ETCD_TOKEN_REFRESH_S = 60.0
# A token also goes stale at once when anyone changes etcd's users or roles (etcd refuses
# tokens of an older auth revision), and a simple token with an etcd restart: each client
# checks its token this often with a one-key read and authenticates again when it is refused.
ETCD_TOKEN_CHECK_S = 2.0
_STALE_TOKEN = ("invalid auth token", "revision in header is old", "revision of auth store is old")


def _token_refused(exc: BaseException) -> bool:
    details = (exc.details() or "") if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
    return any(reason in details for reason in _STALE_TOKEN)


class EtcdClient(etcd3aio.Etcd3Client):
    """etcd3aio's client that, given `credentials` (a user, and its password as read anew
    each time), authenticates at `connect()` and keeps its token fresh until `close()` (every
    call, stream reconnects included, carries the newest)."""

    def __init__(
        self, endpoints: list[str], credentials: tuple[str, Callable[[], str]] | None = None, **tls: Any
    ) -> None:
        super().__init__(endpoints, **tls)
        self._credentials = credentials
        self._refresh: asyncio.Task[None] | None = None

    async def connect(self, timeout: float = 2.0) -> None:
        await super().connect()
        if self._credentials is None:
            return
        await self._authenticate(timeout)
        self._refresh = asyncio.create_task(self._keep_token_fresh(), name="etcd-token-refresh")

    async def _authenticate(self, timeout: float) -> None:
        assert self._credentials is not None
        user, password = self._credentials
        response = await etcd_service(self.auth).authenticate(user, password(), timeout=timeout, max_attempts=1)
        self.set_token(response.token)

    async def _token_stale(self) -> bool:
        try:
            await etcd_service(self.kv).get(ETCD_ROOT.encode(), timeout=ETCD_TOKEN_CHECK_S, max_attempts=1)
        except (TimeoutError, OSError, etcd3aio.EtcdError, grpc.aio.AioRpcError) as exc:
            return _token_refused(exc)  # etcd away: the token may well be good when it is back
        return False

    async def _keep_token_fresh(self) -> None:
        authenticated_at = time.monotonic()
        failures = 0
        while True:
            await asyncio.sleep(ETCD_TOKEN_CHECK_S)
            if time.monotonic() - authenticated_at < ETCD_TOKEN_REFRESH_S and not await self._token_stale():
                continue
            try:
                await self._authenticate(timeout=5.0)
            except (TimeoutError, OSError, etcd3aio.EtcdError, grpc.aio.AioRpcError) as exc:
                # The old token stays in use (etcd may just be away): said once, retried quietly.
                failures += 1
                if failures == 1:
                    log.warning("etcd: re-authentication failed (%s); retrying", _reason(exc))
                continue
            if failures:
                log.info("etcd: re-authenticated after %d failed attempt(s)", failures)
            authenticated_at, failures = time.monotonic(), 0

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
            self._refresh = None
        await super().close()


def _etcd_tls_options(settings: RuntimeSettings) -> dict[str, Any]:
    """etcd3aio's TLS arguments: the CA and client certificate as PEM bytes, and the server
    name to verify: the first endpoint's host as given (the endpoints are dialled by address)."""
    if not settings.etcd_tls() or settings.etcd_tls_ca is None:
        return {}
    options: dict[str, Any] = {
        "tls_server_name": settings.etcd_urls()[0].rpartition(":")[0],
        "ca_cert": _read_file("etcd", "ETCD_TLS_CA", settings.etcd_tls_ca),
    }
    if settings.etcd_tls_cert and settings.etcd_tls_key:
        options["cert_chain"] = _read_file("etcd", "ETCD_TLS_CERT", settings.etcd_tls_cert)
        options["cert_key"] = _read_file("etcd", "ETCD_TLS_KEY", settings.etcd_tls_key)
    return options


def _etcd_refusal(exc: BaseException) -> str | None:
    """Why etcd turned us away for good, where it did (see `_nats_refusal`)."""
    # etcd answers a wrong password and a missing user with INVALID_ARGUMENT, which etcd3aio
    # passes on as the gRPC error.
    details = (exc.details() or "") if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
    if isinstance(exc, etcd3aio.EtcdUnauthenticatedError) or "authentication failed" in details:
        return f"rejected the credentials ({_reason(exc)}): check ETCD_USER and ETCD_PASSWORD_FILE"
    if "user name is empty" in details:
        return f"requires authentication ({_reason(exc)}): set ETCD_USER and ETCD_PASSWORD_FILE"
    if isinstance(exc, etcd3aio.EtcdPermissionDeniedError):
        return f"denied ETCD_USER access to {ETCD_ROOT} ({_reason(exc)}): grant its role that prefix"
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return (
            f"presented a certificate this process does not trust ({details}): ETCD_TLS_CA must name the CA "
            "that signed it, for the first address in ETCD_ENDPOINTS"
        )
    return None


async def connect_etcd(settings: RuntimeSettings) -> etcd3aio.Etcd3Client:
    """Connect (authenticated where ETCD_USER is set) and prove it with a read, retrying with
    exponential backoff until the deadline; credentials or a certificate refused: at once."""
    backoff = _Backoff(settings, "etcd", settings.etcd_endpoints, "ETCD_ENDPOINTS")
    retry_log = RetryLog("etcd", settings.etcd_endpoints)
    tls = _etcd_tls_options(settings)
    credentials = None
    if settings.etcd_user and settings.etcd_password_file:
        credentials = (settings.etcd_user, SecretFile("etcd", "ETCD_PASSWORD_FILE", settings.etcd_password_file))
    while True:
        remaining = backoff.deadline - time.monotonic()
        client: EtcdClient | None = None
        try:
            endpoints = [await _resolve_ipv4(url) for url in settings.etcd_urls()]
            client = EtcdClient(endpoints, credentials, **tls)
            client._manager.grpc_options += _ETCD_RECONNECT_OPTIONS
            await client.connect(timeout=min(2.0, max(remaining, 0.1)))
            await etcd_service(client.kv).get(ETCD_ROOT.encode(), timeout=min(2.0, max(remaining, 0.1)), max_attempts=1)
            return client
        except (TimeoutError, OSError, etcd3aio.EtcdError, grpc.aio.AioRpcError) as exc:
            last_error: BaseException = exc
            if client is not None:
                await client.close()
            refusal = _etcd_refusal(exc)
            if refusal is not None:
                raise ConnectError(f"etcd at {settings.etcd_endpoints} {refusal}") from exc
            retry_log.failed(exc)
        await backoff.wait(last_error)


async def check_reachable(settings: RuntimeSettings) -> None:
    """Connect to NATS and etcd as a service would (the same retries and deadline), then
    close: ConnectError naming the server that cannot be reached."""
    # Both tries run to their end; whichever connected is closed, even when the other failed.
    results = await asyncio.gather(connect_nats(settings), connect_etcd(settings), return_exceptions=True)
    for client in results:
        if not isinstance(client, BaseException):
            await client.close()
    for failure in results:
        if isinstance(failure, BaseException):
            raise failure
