"""The NATS and etcd command lines every launcher uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.launch.servers import etcd_client_urls, etcd_command, find_binary, nats_command


def test_nats_binds_where_asked_and_everywhere_otherwise() -> None:
    assert nats_command("nats-server", Path("/d"), 4222, 8222) == [
        "nats-server",
        "-js",
        "-sd",
        "/d",
        "-p",
        "4222",
        "-m",
        "8222",
    ]
    assert nats_command("nats-server", Path("/d"), 4222, 8222, "10.0.0.1")[-2:] == ["-a", "10.0.0.1"]


def test_etcd_listens_on_the_node_and_loopback_and_keeps_its_peer_port_on_loopback() -> None:
    command = etcd_command("etcd", Path("/d"), "10.0.0.1", 2379, 2380, environ={})
    flags = dict(zip(command[1::2], command[2::2], strict=False))
    assert command[0] == "etcd"
    assert flags["--listen-client-urls"] == "http://10.0.0.1:2379,http://127.0.0.1:2379"
    assert flags["--advertise-client-urls"] == "http://10.0.0.1:2379"
    assert flags["--listen-peer-urls"] == flags["--initial-advertise-peer-urls"] == "http://127.0.0.1:2380"
    assert flags["--initial-cluster"] == "tandem=http://127.0.0.1:2380"
    assert etcd_client_urls("127.0.0.1", 2379) == ["http://127.0.0.1:2379"]
    assert etcd_client_urls("0.0.0.0", 2379) == ["http://0.0.0.0:2379"]


def test_etcd_never_sees_our_etcd_variables() -> None:
    """etcd reads every ETCD_* variable as a flag and refuses ones it does not know."""
    environ = {"ETCD_ENDPOINTS": "x", "ETCD_PORT": "1", "PATH": "/bin"}
    command = etcd_command("etcd", Path("/d"), "127.0.0.1", 2379, 2380, environ)
    assert command[:6] == ["env", "-u", "ETCD_ENDPOINTS", "-u", "ETCD_PORT", "etcd"]


def test_a_binary_variable_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_ETCD_BIN", "/opt/etcd")
    assert find_binary("etcd") == "/opt/etcd"
