"""The multi-node test fabric keeps nodes apart the way separate hosts are apart.

The multi-node tests prove that Tandem advertises routable addresses and that KV bytes
cross the network; that only holds if the fabric itself isolates loopback and /dev/shm.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from tests.capabilities import require_fabric
from tests.netns import Fabric


@pytest.fixture(autouse=True, scope="module")
def _network_namespaces() -> None:
    require_fabric()


def _wait_http(url: str, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return urllib.request.urlopen(url, timeout=2).status
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_nodes_reach_each_other_by_address_but_not_by_loopback() -> None:
    with Fabric(2) as fabric:
        server_node, client_node = fabric.nodes
        server = server_node.popen(
            [sys.executable, "-m", "http.server", "18099", "--bind", server_node.ip],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert _wait_http(f"http://{server_node.ip}:18099/") == 200
        probe = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)"
        assert client_node.run([sys.executable, "-c", probe, f"http://{server_node.ip}:18099/"]).returncode == 0
        assert client_node.run([sys.executable, "-c", probe, "http://127.0.0.1:18099/"]).returncode != 0
        server.stop(timeout=2)  # http.server, as PID 1 without a SIGTERM handler, needs the SIGKILL


def test_private_node_has_its_own_shm_and_pids_and_stops_whole() -> None:
    marker = f"tandem-fabric-{os.getpid()}"
    with Fabric(1) as fabric:
        (node,) = fabric.nodes
        listing = node.popen(["sh", "-c", f"touch /dev/shm/{marker}; ls /dev/shm; echo pid=$$"], stdout=subprocess.PIPE)
        out = listing.popen.communicate(timeout=10)[0].decode().split()
        assert marker in out and "pid=1" in out
        assert not os.path.exists(f"/dev/shm/{marker}")

        # A program without a SIGTERM handler is PID 1 there and ignores SIGTERM: stop()
        # must still end it and what it started.
        sleeper = node.popen(["sh", "-c", "sleep 300 & sleep 300"])
        time.sleep(0.5)
        pids = [sleeper.pid, *(child.pid for child in psutil.Process(sleeper.pid).children(recursive=True))]
        assert len(pids) == 3
        sleeper.stop(timeout=2)
        assert not any(psutil.pid_exists(pid) for pid in pids)
    assert fabric.nodes[0].name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
