"""This node's address: the one answer every process, the launchers and the entrypoint use.

Standard library only (the container entrypoint imports it).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from urllib.parse import urlsplit

from app import env


def configured_node_address(environ: Mapping[str, str] | None = None) -> str | None:
    """The address the operator gave this node, or None: TANDEM_ADVERTISE_HOST, else VLLM_HOST_IP.

    For what must not guess: where `tandem infra up` binds, what Ray and etcd announce.
    """
    return env.TANDEM_ADVERTISE_HOST.get(environ) or env.VLLM_HOST_IP.get(environ)


def node_address(nats_url: str | None = None) -> str:
    """Where other nodes reach this process.

    The configured address when there is one; else this node's own address on the route
    to the NATS server (`nats_url`, default NATS_SERVER's first): a node that joins a fleet
    with only the guide's NATS_SERVER / ETCD_ENDPOINTS exports then advertises the address
    the head node (and so every peer on that network) reaches it at. With NATS on loopback
    (one node, or the head itself) that route says nothing, and the hostname's address is
    the best guess.
    """
    configured = configured_node_address()
    if configured:
        return configured
    routed = _source_address_towards(nats_url or env.NATS_SERVER.get().split(",")[0])
    if routed and not ipaddress.ip_address(routed).is_loopback:
        return routed
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _source_address_towards(url: str) -> str | None:
    """The local address the kernel would send from to reach `url`'s host (no packet is sent)."""
    parsed = urlsplit(url.strip())
    if not parsed.hostname:
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((parsed.hostname, parsed.port or 4222))  # UDP connect: a route lookup only
            return str(probe.getsockname()[0])
    except OSError:
        return None
