"""Several "nodes" on one machine: network namespaces joined by a bridge.

The seed's deployments span hosts (head, prefill nodes, Ray workers). A `Fabric` gives each
node its own network namespace with its own address on one bridge, so that what a node
advertises (etcd's client URL, the NIXL side channel, Ray's node IP) must really be its
own address: loopback on one node is not reachable from another.

A process started with `private=True` also gets its own PID, IPC and mount namespace with
a fresh /dev/shm, as a separate host would: vLLM's shared-memory names and UCX's
same-host shortcuts (cross-process memory reads) then cannot reach across nodes, so the
bytes really cross the veth (tests/unit/engines/test_vllm_cpu_ray.py: a fresh /dev/shm is
another shm domain; docs/internals.md, "NIXL on vLLM's CPU build"). It runs as PID 1 of
its namespace: stopping it tears down everything it started there, which is how tests
stop Ray without `ray stop`.

Needs root (`ip netns`, `unshare`); `Fabric.available()` tells a test whether to skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

# The program's first words inside a private node: a fresh /dev/shm (else every node sees
# the host's, and the shared-memory files of one "node" are visible to the others).
_PRIVATE_SHM = 'mount -t tmpfs -o size=4g tmpfs /dev/shm && exec "$@"'


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class NodeProcess:
    """A process started on a node; `stop` ends it and everything it started there."""

    popen: subprocess.Popen[bytes]
    private: bool

    @property
    def pid(self) -> int:
        """Host PID of the program itself (inside a private node, the namespace's PID 1)."""
        if not self.private:
            return self.popen.pid
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                children = psutil.Process(self.popen.pid).children()
            except psutil.NoSuchProcess:
                break
            if children:
                return children[0].pid
            time.sleep(0.01)
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM the program, then SIGKILL: in a private node that kills its whole PID namespace."""
        if self.popen.poll() is not None:
            return
        target = self.pid
        descendants = _descendants(target)
        _signal(target, signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # PID 1 of a namespace ignores SIGTERM unless it handles it; SIGKILL always lands,
            # and `unshare` then reaps it and exits.
            _signal(target, signal.SIGKILL)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        # A non-private program's children may have outlived it (a private node's cannot).
        for child in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


@dataclass
class Node:
    """One "host": a network namespace with one address on the fabric's bridge."""

    name: str
    ip: str
    processes: list[NodeProcess] = field(default_factory=list)

    def command(self, argv: Sequence[str], private: bool = True) -> list[str]:
        prefix = ["ip", "netns", "exec", self.name]
        if not private:
            return [*prefix, *argv]
        return [
            *prefix,
            "unshare", "--pid", "--ipc", "--mount", "--fork", "--mount-proc",
            # If the test dies, the node's processes die with it.
            "--kill-child=SIGKILL",
            "sh", "-c", _PRIVATE_SHM, self.name, *argv,
        ]  # fmt: skip

    def popen(self, argv: Sequence[str], *, private: bool = True, **kwargs: Any) -> NodeProcess:
        """Start `argv` on this node; the fabric stops it at the latest when it closes."""
        process = NodeProcess(subprocess.Popen(self.command(argv, private), **kwargs), private)
        self.processes.append(process)
        return process

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run a short command in this node's network namespace and wait for it."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(argv, private=False), **kwargs)


class Fabric:
    """`count` nodes 10.A.B.1 ... on a bridge whose host side is 10.A.B.254.

    Names and the subnet derive from this process's PID, so two test runs on one machine
    (a developer's and CI's) do not collide. Use as a context manager: on exit every
    process started on a node is stopped and the namespaces and bridge are deleted.
    """

    def __init__(self, count: int) -> None:
        pid = os.getpid()
        self.tag = f"td{pid % 100000}"
        self.subnet_prefix = f"10.{100 + (pid // 250) % 100}.{pid % 250}"
        self.host_ip = f"{self.subnet_prefix}.254"
        self.bridge = f"{self.tag}br"
        self.nodes = [Node(f"{self.tag}n{i + 1}", f"{self.subnet_prefix}.{i + 1}") for i in range(count)]
        self._created_namespaces: list[str] = []
        self._created_links: list[str] = []
        self._bridge_created = False

    @staticmethod
    def available() -> bool:
        """Root with `ip` and `unshare`: what a multi-node test needs."""
        return os.geteuid() == 0 and bool(shutil.which("ip")) and bool(shutil.which("unshare"))

    def __enter__(self) -> Fabric:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._bridge_created = True
        _ip("addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for index, node in enumerate(self.nodes, start=1):
            host_end, node_end = f"{self.tag}h{index}", f"{self.tag}v{index}"
            _ip("netns", "add", node.name)
            self._created_namespaces.append(node.name)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
            self._created_links.append(host_end)
            _ip("link", "set", node_end, "netns", node.name)
            _ip("link", "set", host_end, "master", self.bridge)
            _ip("link", "set", host_end, "up")
            _ip("-n", node.name, "link", "set", node_end, "name", "eth0")
            _ip("-n", node.name, "addr", "add", f"{node.ip}/24", "dev", "eth0")
            _ip("-n", node.name, "link", "set", "eth0", "up")
            _ip("-n", node.name, "link", "set", "lo", "up")

    def close(self) -> None:
        for node in self.nodes:
            for process in reversed(node.processes):
                process.stop()
            node.processes.clear()
        for link in self._created_links:
            # Deleting one end deletes the pair at once. Deleting the namespace would too, but
            # the kernel cleans a namespace up later, asynchronously: the next Fabric of this
            # process, reusing the names, then found the old host end still there.
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        self._created_links.clear()
        for name in self._created_namespaces:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._created_namespaces.clear()
        if self._bridge_created:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
            self._bridge_created = False
