"""The NATS and etcd command lines every launcher uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.launch.servers import (
    etcd_client_urls,
    etcd_command,
    etcd_tls_flags,
    find_binary,
    nats_command,
    nats_secure_config,
)


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


def test_secure_nats_takes_everything_from_its_config_and_keeps_the_monitor_on_loopback() -> None:
    config = nats_secure_config(
        Path("/d"), "0.0.0.0", 4222, 8222, Path("/s/nats.pem"), Path("/s/k.pem"), "tandem", "pw"
    )
    assert config.splitlines() == [
        'listen: "0.0.0.0:4222"',
        'http: "127.0.0.1:8222"',
        'jetstream { store_dir: "/d" }',
        'tls { cert_file: "/s/nats.pem", key_file: "/s/k.pem", timeout: 2 }',
        'authorization { users: [ { user: "tandem", password: "pw" } ] }',
    ]


def test_secure_etcd_serves_https_with_signed_tokens() -> None:
    tls_flags = etcd_tls_flags(Path("/s/etcd.pem"), Path("/s/etcd-key.pem"), Path("/s/t.pem"), Path("/s/t.pub.pem"))
    command = etcd_command("etcd", Path("/d"), "10.0.0.1", 2379, 2380, environ={}, tls_flags=tls_flags)
    flags = dict(zip(command[1::2], command[2::2], strict=False))
    assert flags["--listen-client-urls"] == "https://10.0.0.1:2379,https://127.0.0.1:2379"
    assert flags["--advertise-client-urls"] == "https://10.0.0.1:2379"
    assert flags["--listen-peer-urls"] == "http://127.0.0.1:2380"  # one member: no peer ever dials it
    assert (flags["--cert-file"], flags["--key-file"]) == ("/s/etcd.pem", "/s/etcd-key.pem")
    assert flags["--auth-token"].startswith("jwt,pub-key=/s/t.pub.pem,priv-key=/s/t.pem,sign-method=ES256,")
