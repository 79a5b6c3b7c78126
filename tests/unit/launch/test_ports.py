"""Ports handed out to be bound later."""

from __future__ import annotations

import socket

import pytest

from app.launch import ports
from app.launch.ports import free_port


def test_free_port_is_below_the_ephemeral_range_and_skips_ports_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outgoing connections take source ports from the ephemeral range; a port handed out to
    be bound later must not be one of them (a NIXL side channel once lost its port that way)."""
    ephemeral = ports._ephemeral_port_range()
    handed_out = {free_port() for _ in range(20)}
    assert all(20000 <= port < ephemeral.start for port in handed_out)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        held.listen()
        # Only two candidates, one of them in use: the other one is the answer every time.
        monkeypatch.setattr(ports, "_HANDED_OUT_PORTS_FROM", taken - 1)
        monkeypatch.setattr(ports, "_ephemeral_port_range", lambda: range(taken + 1, 61000))
        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", taken - 1))
            blocker.listen()
            # both candidates busy: the OS picks
            assert free_port() not in (taken - 1, taken)
        assert {free_port() for _ in range(5)} == {taken - 1}
