"""What a node advertises when the operator gives only the guide's exports.

The seed's prefill nodes export NATS_SERVER and ETCD_ENDPOINTS and nothing else: the
address they put in their instance records and NIXL side channel must still be the one
the head node reaches them at, not the hostname's (often loopback).
"""

from __future__ import annotations

import os
import socket
import sys

import pytest

from app.node import node_address
from tests.capabilities import require_fabric
from tests.netns import Fabric

PRINT_ADVERTISED = "from app.node import node_address; print(node_address())"


def test_explicit_address_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_ADVERTISE_HOST", "10.9.8.7")
    monkeypatch.setenv("VLLM_HOST_IP", "10.1.1.1")
    assert node_address("nats://127.0.0.1:4222") == "10.9.8.7"


def test_vllm_host_ip_is_the_nodes_address_where_tandem_is_given_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TANDEM_ADVERTISE_HOST", raising=False)
    monkeypatch.setenv("VLLM_HOST_IP", "10.1.1.1")
    assert node_address("nats://127.0.0.1:4222") == "10.1.1.1"


def test_nats_on_loopback_falls_back_to_the_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TANDEM_ADVERTISE_HOST", raising=False)
    monkeypatch.delenv("VLLM_HOST_IP", raising=False)
    assert node_address("nats://127.0.0.1:4222") == socket.gethostbyname(socket.gethostname())


def test_a_node_joining_by_nats_server_advertises_its_own_address() -> None:
    require_fabric()
    with Fabric(2) as fabric:
        head, joiner = fabric.nodes
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TANDEM_", "NATS_", "ETCD_", "VLLM_HOST_IP"))}
        env["NATS_SERVER"] = f"nats://{head.ip}:4222"  # nothing needs to listen: a route lookup only
        out = joiner.run([sys.executable, "-c", PRINT_ADVERTISED], env=env, cwd=os.getcwd())
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == joiner.ip
