"""Start-up while NATS or etcd cannot be reached: one clear line, SIGTERM obeyed at once,
and `tandem serve` giving up with the server's name instead of restarting services forever;
SIGTERM obeyed at once during a long engine load too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.launch.ports import free_port

REPO = Path(__file__).resolve().parents[2]
TANDEM = str(Path(sys.executable).parent / "tandem")


def _environment(etcd_server_url: str, nats_server_url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "NATS_SERVER": nats_server_url,
        "ETCD_ENDPOINTS": etcd_server_url,
        "TANDEM_NAMESPACE": f"down{os.getpid()}",
        **extra,
    }


@pytest.mark.parametrize("down", ["NATS", "etcd"])
def test_a_service_says_once_what_it_cannot_reach_and_stops_at_once_on_sigterm(
    down: str, nats_server, etcd_server, tmp_path: Path
) -> None:
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    nats_url = f"nats://{closed}" if down == "NATS" else nats_server.url
    etcd_url = f"http://{closed}" if down == "etcd" else etcd_server.url
    log_path = tmp_path / "service.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.sdk.process", "tests.integration.echo_graph:Echo"],
            cwd=REPO,
            env=_environment(etcd_url, nats_url, TANDEM_CONNECT_TIMEOUT_S="120"),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while f"cannot reach {down} at" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        time.sleep(3)  # many attempts (backoff from 0.1 s), still one line
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - sent < 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert log.count("cannot reach") == 1, log
    assert f"cannot reach {down} at {nats_url if down == 'NATS' else etcd_url}" in log
    assert "stopped while connecting" in log


def test_tandem_serve_without_nats_exits_non_zero_naming_it_and_starts_nothing(etcd_server) -> None:
    closed = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = subprocess.run(
        [TANDEM, "serve", "tests.integration.echo_graph:Greeter"],
        cwd=REPO,
        env=_environment(etcd_server.url, closed, TANDEM_CONNECT_TIMEOUT_S="3"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert time.monotonic() - started < 30
    assert f"error: cannot reach NATS at {closed} within 3s" in result.stderr
    assert "nothing started" in result.stderr
    assert "supervisord" not in result.stdout + result.stderr  # no service was ever spawned


def test_sigterm_during_a_load_in_a_thread_ends_the_service_at_once(nats_server, etcd_server, tmp_path: Path) -> None:
    log_path = tmp_path / "service.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.sdk.process", "tests.integration.echo_graph:SlowStart"],
            cwd=REPO,
            env=_environment(etcd_server.url, nats_server.url),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "loading" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - sent < 2, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert "stopped during start-up" in log and "leaving without waiting for" in log, log
