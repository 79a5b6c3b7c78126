"""`nixl-side-channels`: a real TCP connection to each advertised side channel, on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from app.doctor.reach import check_side_channels
from app.protocol import names
from tests.unit.doctor.fleets import fleet, process


@pytest.fixture
async def listening() -> AsyncIterator[int]:
    """A port on 127.0.0.1 that accepts connections (a side channel stand-in)."""
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def disagg(*prefill_channels: str, decode_host: str = "127.0.0.1") -> object:
    processes = [process("d0", names.VLLM_WORKER, host=decode_host)]
    processes += [
        process(f"p{i}", names.PREFILL_WORKER, host="127.0.0.1", nixl_side_channel=channel)
        for i, channel in enumerate(prefill_channels)
    ]
    return fleet(processes)


async def test_reachable_side_channels_pass_saying_from_where(listening: int) -> None:
    check = await check_side_channels(disagg(f"127.0.0.1:{listening}"))  # type: ignore[arg-type]
    assert check.ok and check.applicable
    assert "1 side channel(s) accept TCP connections, checked from this node (10.0.0.9)" in check.message


async def test_an_unreachable_side_channel_fails_naming_the_worker_and_the_port(listening: int) -> None:
    port = closed_port()
    check = await check_side_channels(disagg(f"127.0.0.1:{listening}", f"127.0.0.1:{port}"))  # type: ignore[arg-type]
    assert not check.ok
    assert f"PrefillWorker p1 on 127.0.0.1: its NIXL side channel 127.0.0.1:{port} is unreachable" in check.message
    assert f"Open TCP port {port} on 127.0.0.1" in check.message
    assert "p0" not in check.message


async def test_a_loopback_side_channel_fails_when_decode_workers_run_elsewhere() -> None:
    check = await check_side_channels(disagg("127.0.0.1:5600", decode_host="10.0.0.5"))  # type: ignore[arg-type]
    assert not check.ok
    assert "advertises side channel 127.0.0.1:5600, which decode workers on 10.0.0.5 cannot reach" in check.message


async def test_no_prefill_worker_or_no_side_channel_is_not_applicable() -> None:
    none = await check_side_channels(fleet([process("d0", names.VLLM_WORKER)]))
    assert none.ok and not none.applicable and "no PrefillWorker" in none.message
    mocker = await check_side_channels(disagg(""))  # type: ignore[arg-type]
    assert mocker.ok and not mocker.applicable and "advertises a NIXL side channel" in mocker.message
