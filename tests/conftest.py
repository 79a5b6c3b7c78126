"""Shared fixtures: real NATS (JetStream) and etcd servers on free loopback ports, and the
tiny local model."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from app.infra import EtcdServer, NatsServer, ServerProcess
from app.launch.ports import free_port
from app.model.tiny import make_tiny
from app.runtime import Runtime
from app.settings import RuntimeSettings

Server = TypeVar("Server", bound=ServerProcess)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama, served as `tiny-llama` (the directory name); deterministic."""
    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)


def _running(server: Server) -> Iterator[Server]:
    """The server, started, until the fixture's teardown stops it."""
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """nats-server with JetStream; `.url`, `.port`, `.restart()` (same port and store)."""
    yield from _running(NatsServer("127.0.0.1", free_port(), free_port(), Path(tmp_path_factory.mktemp("nats"))))


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """Single-member etcd; `.url`, `.port`, `.restart()` (same port and data dir)."""
    yield from _running(EtcdServer("127.0.0.1", free_port(), free_port(), Path(tmp_path_factory.mktemp("etcd"))))


@pytest.fixture
def runtime_settings(nats_server: NatsServer, etcd_server: EtcdServer) -> RuntimeSettings:
    """Settings for the test servers, with a namespace of its own so tests never see each other."""
    return RuntimeSettings(
        nats_server=nats_server.url,
        etcd_endpoints=etcd_server.url,
        namespace=f"t{uuid.uuid4().hex[:12]}",
        connect_timeout_s=10.0,
    )


@pytest.fixture
async def make_runtime(runtime_settings: RuntimeSettings) -> AsyncIterator[Callable[..., Awaitable[Runtime]]]:
    """`await make_runtime(**overrides)` connects a Runtime (test namespace); all closed at the end."""
    runtimes: list[Runtime] = []

    async def make(**overrides: object) -> Runtime:
        settings = runtime_settings.model_copy(update=overrides)
        runtime = await Runtime.connect(settings)
        runtimes.append(runtime)
        return runtime

    try:
        yield make
    finally:
        for runtime in runtimes:
            await runtime.close()
