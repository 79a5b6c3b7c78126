"""Ports handed out for a process to bind later."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Below the kernel's ephemeral range: a port the OS picked with bind(0) is free only for
# now, and any outgoing connection (a NATS or ZMQ client) may take it as its source port
# before the server binds it. Above 19999 so that Ray's worker ports (10002-19999) stay
# out of it.
_HANDED_OUT_PORTS_FROM = 20000


def _ephemeral_port_range() -> range:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on now and that no outgoing connection will take.

    Random within 20000..(start of the ephemeral range), so that processes picking ports at
    the same moment on one host rarely pick the same one; each pick is checked by binding it.
    """
    ephemeral = _ephemeral_port_range()
    candidates = range(_HANDED_OUT_PORTS_FROM, ephemeral.start)
    for port in random.sample(candidates, min(len(candidates), 200)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # unusual port ranges: let the OS pick
        sock.bind((host, 0))
        return sock.getsockname()[1]
