"""`tandem infra up --secure`: real NATS and etcd with TLS and passwords, as the command starts
them (free ports, a temp state dir), and Tandem processes joining with the printed exports."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import etcd3aio
import grpc.aio
import nats
import pytest

from app.errors import UnavailableError, WorkerUnavailableError
from app.infra import EtcdServer, NatsServer, SecureFiles, add_cli, infra_down, infra_status, infra_up
from app.launch import pki
from app.launch.ports import free_port
from app.protocol.names import ETCD_ROOT
from app.runtime import ConnectError, RequestContext, Runtime
from app.settings import RuntimeSettings

REPO = Path(__file__).resolve().parents[2]
TANDEM = str(Path(sys.executable).parent / "tandem")
# Far beyond what a refused connection may take: a refusal must not wait for the deadline.
CONNECT_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def state_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("secure-state")


@pytest.fixture(scope="module")
def exports(state_root: Path) -> Iterator[dict[str, str]]:
    """What `tandem infra up --secure --export` printed, parsed; the servers stop at the end."""
    parser = argparse.ArgumentParser(prog="tandem")
    add_cli(parser.add_subparsers(dest="command", required=True))
    ports = [f"--{name}-port={free_port()}" for name in ("nats", "nats-monitor", "etcd", "etcd-peer")]
    up = parser.parse_args(["infra", "up", "--secure", "--export", "--host", "127.0.0.1", *ports])
    printed = io.StringIO()
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
            patch.setenv("TANDEM_STATE_DIR", str(state_root))
            # A caller's own ETCD_* variables must not reach etcd as flags.
            patch.setenv("ETCD_USER", "somebody-else")
            assert up.func(up) == 0
        lines = printed.getvalue().splitlines()
        assert all(line.startswith("export ") for line in lines), lines
        yield dict(line.removeprefix("export ").split("=", 1) for line in lines)
    finally:
        infra_down(root=state_root)


@pytest.fixture
def secure_env(exports: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process's environment as a node's that ran the exports, in a namespace of its own."""
    for name, value in exports.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TANDEM_NAMESPACE", f"t{uuid.uuid4().hex[:12]}")
    monkeypatch.setenv("TANDEM_CONNECT_TIMEOUT_S", str(CONNECT_TIMEOUT_S))
    return exports


def _password(exports: dict[str, str], variable: str) -> str:
    return Path(exports[variable]).read_text().strip()


def _host_port(url: str) -> str:
    return url.rpartition("@")[2].rpartition("/")[2]


def test_exports_name_tls_urls_the_ca_and_owner_only_password_files(state_root: Path, exports: dict[str, str]) -> None:
    status = infra_status(root=state_root)
    nats_port, etcd_port = status["nats"]["url"].rpartition(":")[2], status["etcd"]["url"].rpartition(":")[2]
    assert exports == {
        "NATS_SERVER": f"tls://tandem@127.0.0.1:{nats_port}",
        "NATS_PASSWORD_FILE": str(state_root / "secure" / "nats-password"),
        "NATS_TLS_CA": str(state_root / "secure" / "ca.pem"),
        "ETCD_ENDPOINTS": f"https://127.0.0.1:{etcd_port}",
        "ETCD_USER": "tandem",
        "ETCD_PASSWORD_FILE": str(state_root / "secure" / "etcd-password"),
        "ETCD_TLS_CA": str(state_root / "secure" / "ca.pem"),
    }
    secure = state_root / "secure"
    assert secure.stat().st_mode & 0o777 == 0o700
    for path in secure.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert (state_root / "nats" / "nats.conf").stat().st_mode & 0o777 == 0o600
    # No password on a command line that `ps` shows.
    passwords = [_password(exports, "NATS_PASSWORD_FILE"), _password(exports, "ETCD_PASSWORD_FILE")]
    passwords.append((secure / "etcd-root-password").read_text().strip())
    assert len(set(passwords)) == 3 and all(len(p) >= 24 for p in passwords)
    for name in ("nats", "etcd"):
        command_line = Path(f"/proc/{status[name]['pid']}/cmdline").read_bytes().decode()
        assert not any(password in command_line for password in passwords), name

    # Idempotent: a second `up --secure` finds both running and answers the same; a plain
    # `up` is refused rather than mixed in.
    assert infra_up(root=state_root, secure=True) == exports
    assert {name: entry["pid"] for name, entry in infra_status(root=state_root).items()} == {
        name: entry["pid"] for name, entry in status.items()
    }
    with pytest.raises(RuntimeError, match=r"nats, etcd already run with --secure: `tandem infra down` first"):
        infra_up(root=state_root)


async def test_nats_refuses_a_client_without_credentials(exports: dict[str, str]) -> None:
    tls = ssl.create_default_context(cafile=exports["NATS_TLS_CA"])
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(
            f"tls://{_host_port(exports['NATS_SERVER'])}", tls=tls, allow_reconnect=False, connect_timeout=5
        )


async def test_nats_refuses_a_client_without_the_ca(exports: dict[str, str]) -> None:
    password = _password(exports, "NATS_PASSWORD_FILE")
    url = f"tls://tandem:{password}@{_host_port(exports['NATS_SERVER'])}"
    with pytest.raises(ssl.SSLCertVerificationError):
        await nats.connect(url, allow_reconnect=False, connect_timeout=5)
    # Nor in plain text: the server asks for TLS first.
    with pytest.raises(ssl.SSLCertVerificationError):
        await nats.connect(url.replace("tls://", "nats://"), allow_reconnect=False, connect_timeout=5)


async def _etcd_client(exports: dict[str, str], user: str | None = None, password: str = "") -> etcd3aio.Etcd3Client:
    ca_cert = Path(exports["ETCD_TLS_CA"]).read_bytes()  # noqa: ASYNC240 (a local file, once)
    client = etcd3aio.Etcd3Client([_host_port(exports["ETCD_ENDPOINTS"])], ca_cert=ca_cert, tls_server_name="127.0.0.1")
    await client.connect()
    if user is not None:
        assert client.auth is not None
        client.set_token((await client.auth.authenticate(user, password, timeout=5)).token)
    return client


async def test_etcd_keeps_tandem_keys_from_clients_without_credentials(exports: dict[str, str]) -> None:
    anonymous = await _etcd_client(exports)
    try:
        assert anonymous.kv is not None
        with pytest.raises(grpc.aio.AioRpcError, match="user name is empty"):
            await anonymous.kv.get(ETCD_ROOT, etcd3aio.prefix_range_end(ETCD_ROOT.encode()), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError, match="user name is empty"):
            await anonymous.kv.put(f"{ETCD_ROOT}forged", b"x", timeout=5)
    finally:
        await anonymous.close()

    # The fleet user may use Tandem's keys and no others.
    fleet = await _etcd_client(exports, "tandem", _password(exports, "ETCD_PASSWORD_FILE"))
    try:
        assert fleet.kv is not None
        await fleet.kv.put(f"{ETCD_ROOT}probe", b"1", timeout=5)
        assert (await fleet.kv.get(f"{ETCD_ROOT}probe", timeout=5)).kvs[0].value == b"1"
        await fleet.kv.delete(f"{ETCD_ROOT}probe", timeout=5)
        with pytest.raises(etcd3aio.EtcdPermissionDeniedError):
            await fleet.kv.get("/elsewhere", timeout=5)
    finally:
        await fleet.close()


async def test_runtimes_from_the_exports_serve_calls_events_and_jobs(secure_env: dict[str, str]) -> None:
    async def greet(name: Any, ctx: RequestContext) -> AsyncGenerator[str, None]:
        for word in ("hello", name):
            yield word

    async with await Runtime.connect(RuntimeSettings()) as server, await Runtime.connect(RuntimeSettings()) as caller:
        await server.serve_endpoint("Greeter", "greet", greet)
        client = caller.client("Greeter", "greet")
        await client.wait_for_instances(timeout=5)
        assert [word async for word in client.stream("node-2")] == ["hello", "node-2"]

        # The events plane and JetStream (the prefill queue) work for the fleet user too.
        subscription = await caller.subscribe("kv")
        await server.publish("kv", {"stored": [1, 2]})
        assert await asyncio.wait_for(anext(subscription), timeout=5) == {"stored": [1, 2]}
        queue = await server.work_queue("prefill", ack_wait_s=5)
        await queue.push({"job": 1})
        job = await (await caller.work_queue("prefill", ack_wait_s=5)).pull(timeout=5)
        assert job is not None and job.data == {"job": 1}
        await job.ack()


async def test_a_rotated_etcd_password_is_picked_up_from_its_file_without_a_restart(
    secure_env: dict[str, str], state_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change of etcd's users makes every token stale at once: each process notices within
    ETCD_TOKEN_CHECK_S and authenticates again, with the password its file holds by then,
    before its lease runs out."""
    ttl = 3
    password_file = tmp_path / "etcd-password"
    password_file.write_text(_password(secure_env, "ETCD_PASSWORD_FILE"))
    monkeypatch.setenv("ETCD_PASSWORD_FILE", str(password_file))
    monkeypatch.setenv("TANDEM_LEASE_TTL_S", str(ttl))

    async def echo(payload: Any, ctx: RequestContext) -> AsyncGenerator[Any, None]:
        yield payload

    root_password = (state_root / "secure" / "etcd-root-password").read_text().strip()
    root = await _etcd_client(secure_env, "root", root_password)
    assert root.auth is not None
    try:
        async with await Runtime.connect(RuntimeSettings()) as server:
            await server.serve_endpoint("Echo", "echo", echo)
            await root.auth.user_change_password("tandem", "rotated-password", timeout=5)
            password_file.write_text("rotated-password\n")  # the secret, updated on the node

            await asyncio.sleep(ttl + 1)
            async with await Runtime.connect(RuntimeSettings()) as caller:
                await caller.client("Echo", "echo").wait_for_instances(timeout=5)
                assert caller.client("Echo", "echo").instance_ids() == [server.instance_id]
            await server.discovery.put_tunable("router/mode", "kv")  # its own token works again
    finally:
        await root.auth.user_change_password("tandem", _password(secure_env, "ETCD_PASSWORD_FILE"), timeout=5)
        await root.close()


async def test_a_wrong_nats_password_fails_at_once_naming_nats(
    secure_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = tmp_path / "nats-password"
    wrong.write_text("not-the-password\n")
    monkeypatch.setenv("NATS_PASSWORD_FILE", str(wrong))
    started = time.monotonic()
    with pytest.raises(ConnectError) as refused:
        await Runtime.connect(RuntimeSettings())
    assert time.monotonic() - started < CONNECT_TIMEOUT_S / 2
    message = str(refused.value)
    assert message.startswith(f"NATS at {secure_env['NATS_SERVER']} rejected the credentials")
    assert "Authorization Violation" in message and "NATS_PASSWORD_FILE" in message


async def test_a_password_in_the_nats_url_works_and_is_never_shown(
    secure_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    password = _password(secure_env, "NATS_PASSWORD_FILE")
    host_port = _host_port(secure_env["NATS_SERVER"])
    monkeypatch.delenv("NATS_PASSWORD_FILE")
    monkeypatch.setenv("NATS_SERVER", f"tls://tandem:{password}@{host_port}")
    async with await Runtime.connect(RuntimeSettings()):
        pass

    monkeypatch.setenv("NATS_SERVER", f"tls://tandem:{password}x@{host_port}")
    with pytest.raises(ConnectError) as refused:
        await Runtime.connect(RuntimeSettings())
    assert str(refused.value).startswith(f"NATS at tls://tandem:***@{host_port} rejected the credentials")
    assert password not in str(refused.value)


async def test_a_wrong_etcd_password_fails_at_once_naming_etcd(
    secure_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = tmp_path / "etcd-password"
    wrong.write_text("not-the-password\n")
    monkeypatch.setenv("ETCD_PASSWORD_FILE", str(wrong))
    started = time.monotonic()
    with pytest.raises(ConnectError) as refused:
        await Runtime.connect(RuntimeSettings())
    assert time.monotonic() - started < CONNECT_TIMEOUT_S / 2
    message = str(refused.value)
    assert message.startswith(f"etcd at {secure_env['ETCD_ENDPOINTS']} rejected the credentials")
    assert "invalid user ID or password" in message and "ETCD_PASSWORD_FILE" in message


def test_tandem_serve_with_a_wrong_password_exits_at_start_naming_nats(
    secure_env: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "graph.yaml"
    config.write_text("Greeter:\n  greeting: hi\nEcho:\n  prefix: '>'\n")
    wrong = tmp_path / "nats-password"
    wrong.write_text("not-the-password\n")
    done = subprocess.run(
        [TANDEM, "serve", "tests.integration.echo_graph:Greeter", "-f", str(config)],
        cwd=REPO,
        env={**os.environ, "NATS_PASSWORD_FILE": str(wrong)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"error: NATS at {secure_env['NATS_SERVER']} rejected the credentials" in done.stderr
    assert "nothing started" in done.stderr


async def test_runtimes_stay_connected_and_registered_across_server_restarts(tmp_path: Path) -> None:
    """The restarted servers know the same users and certificates, an etcd token issued
    before its restart still holds (signed tokens): no lease is lost; a NATS password
    changed meanwhile is read from its file at the reconnection."""
    files = SecureFiles.ensure(tmp_path / "secure")
    nats_server = NatsServer("127.0.0.1", free_port(), free_port(), tmp_path / "nats", secure=files)
    etcd_server = EtcdServer("127.0.0.1", free_port(), free_port(), tmp_path / "etcd", secure=files)
    ttl = 3
    settings = RuntimeSettings(
        nats_server=nats_server.url,
        nats_password_file=str(files.nats_password_file),
        nats_tls_ca=str(files.ca_cert),
        etcd_endpoints=etcd_server.url,
        etcd_user="tandem",
        etcd_password_file=str(files.etcd_password_file),
        etcd_tls_ca=str(files.ca_cert),
        namespace=f"t{uuid.uuid4().hex[:12]}",
        lease_ttl_s=ttl,
        connect_timeout_s=CONNECT_TIMEOUT_S,
    )

    async def echo(payload: Any, ctx: RequestContext) -> AsyncGenerator[Any, None]:
        yield payload

    async def call_until_answered(runtime: Runtime, payload: str, target: str) -> Any:
        deadline = time.monotonic() + 10
        while True:
            try:
                return await runtime.client("Echo", "echo").call(payload, target=target, timeout=2)
            except (UnavailableError, WorkerUnavailableError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    try:
        await asyncio.to_thread(nats_server.start)
        await asyncio.to_thread(etcd_server.start)  # blocking, like every server's start
        async with await Runtime.connect(settings) as server, await Runtime.connect(settings) as caller:
            await server.serve_endpoint("Echo", "echo", echo)
            await caller.client("Echo", "echo").wait_for_instances(timeout=5)

            await asyncio.to_thread(etcd_server.restart)
            await asyncio.sleep(ttl + 1)
            assert caller.client("Echo", "echo").instance_ids() == [server.instance_id]
            async with await Runtime.connect(settings) as late:  # auth still on after the restart
                await late.client("Echo", "echo").wait_for_instances(timeout=5)
                assert late.client("Echo", "echo").instance_ids() == [server.instance_id]

            # A new NATS password, in the server's config and the clients' file alike: they
            # reconnect with it, read from the file again.
            pki.write_private(files.nats_password_file, b"new-nats-password\n")
            await asyncio.to_thread(nats_server.restart)
            assert await call_until_answered(caller, "after", server.instance_id) == "after"
    finally:
        etcd_server.stop()
        nats_server.stop()
