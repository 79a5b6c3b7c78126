"""`tandem infra up|status|down` and the server fixtures, on free ports and a temp state dir."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypedDict

import pytest

from app.infra import EtcdServer, NatsServer, add_cli, infra_down, infra_status, infra_up
from app.launch.ports import free_port
from app.launch.processes import pid_alive
from tests.waiting import answers_200


class _Ports(TypedDict):
    nats_port: int
    nats_monitor_port: int
    etcd_port: int
    etcd_peer_port: int


def test_fixture_servers_answer(nats_server: NatsServer, etcd_server: EtcdServer) -> None:
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    assert etcd_server.url == f"http://127.0.0.1:{etcd_server.port}"
    assert nats_server.healthy()
    assert etcd_server.healthy()


def test_infra_up_status_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # ETCD_ENDPOINTS in the caller's environment must not reach etcd as a flag.
    monkeypatch.setenv("ETCD_ENDPOINTS", "http://127.0.0.1:1")
    ports = _Ports(
        nats_port=free_port(), nats_monitor_port=free_port(), etcd_port=free_port(), etcd_peer_port=free_port()
    )
    try:
        urls = infra_up(root=tmp_path, **ports)
        assert urls == {
            "NATS_SERVER": f"nats://127.0.0.1:{ports['nats_port']}",
            "ETCD_ENDPOINTS": f"http://127.0.0.1:{ports['etcd_port']}",
        }
        status = infra_status(root=tmp_path)
        assert status["nats"]["running"] and status["etcd"]["running"]
        pids = {name: entry["pid"] for name, entry in status.items()}
        assert answers_200(f"http://127.0.0.1:{ports['etcd_port']}/health")

        # Idempotent: a second `up` finds them running and starts nothing new.
        assert infra_up(root=tmp_path, **ports) == urls
        assert {name: entry["pid"] for name, entry in infra_status(root=tmp_path).items()} == pids
    finally:
        stopped = infra_down(root=tmp_path)
    assert sorted(stopped) == ["etcd", "nats"]
    assert not any(pid_alive(pid) for pid in pids.values())
    assert not answers_200(f"http://127.0.0.1:{ports['etcd_port']}/health")
    assert infra_status(root=tmp_path) == {}


def test_infra_cli_parses_and_dispatches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TANDEM_STATE_DIR", str(tmp_path))
    parser = argparse.ArgumentParser(prog="tandem")
    add_cli(parser.add_subparsers(dest="command", required=True))
    nats_port, etcd_port = free_port(), free_port()
    up = parser.parse_args(
        [
            "infra",
            "up",
            "--export",
            "--nats-port",
            str(nats_port),
            "--nats-monitor-port",
            str(free_port()),
            "--etcd-port",
            str(etcd_port),
            "--etcd-peer-port",
            str(free_port()),
        ]
    )
    try:
        assert up.func(up) == 0
        out = capsys.readouterr().out
        assert f"export NATS_SERVER=nats://127.0.0.1:{nats_port}\n" in out
        assert f"export ETCD_ENDPOINTS=http://127.0.0.1:{etcd_port}\n" in out
        status = parser.parse_args(["infra", "status"])
        assert status.func(status) == 0
        assert "nats: running" in capsys.readouterr().out
    finally:
        down = parser.parse_args(["infra", "down"])
        assert down.func(down) == 0
    status = parser.parse_args(["infra", "status"])
    assert status.func(status) == 1
