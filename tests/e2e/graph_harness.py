"""Runs a graph with `tandem serve` for a test module, as an operator would on one node.

The graph gets its own namespace on the session's NATS and etcd, its own free HTTP port,
and is stopped by PID (SIGTERM, then SIGKILL of its process group) however the test ends.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from app.infra import free_port
from app.runtime import Runtime
from app.settings import RuntimeSettings

TANDEM = str(Path(sys.executable).with_name("tandem"))


class ServedGraph:
    def __init__(self, graph: str, config: dict[str, Any], workdir: Path, nats_url: str, etcd_url: str) -> None:
        self.port = free_port()
        config = {**config, "Frontend": {**config.get("Frontend", {}), "port": self.port}}
        self.config_path = workdir / "graph.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "serve.log"
        self.namespace = f"e2e{uuid.uuid4().hex[:8]}"
        self.settings = RuntimeSettings(nats_server=nats_url, etcd_endpoints=etcd_url, namespace=self.namespace)
        self.env = {
            **os.environ,
            "NATS_SERVER": nats_url,
            "ETCD_ENDPOINTS": etcd_url,
            "TANDEM_NAMESPACE": self.namespace,
            "VLLM_CPU_KVCACHE_SPACE": "1",
        }
        self.graph = graph
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *extra_args: str) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [TANDEM, "serve", self.graph, "-f", str(self.config_path), *extra_args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def wait_ready(self, workers: int, timeout: float = 300.0) -> None:
        """Until `workers` VllmWorker instances serve and the Frontend answers /health."""
        deadline = time.monotonic() + timeout
        async with await Runtime.connect(self.settings) as runtime:
            watch = await runtime.discovery.watch_instances("VllmWorker", "generate")
            try:
                await watch.wait_until(lambda items: len(items) >= workers, timeout)
            except TimeoutError:
                raise AssertionError(f"{workers} workers not serving after {timeout}s:\n{self.log_tail()}") from None
            finally:
                await watch.close()
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                self._assert_running()
                try:
                    if (await client.get(f"{self.base_url}/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
        raise AssertionError(f"Frontend not healthy after {timeout}s:\n{self.log_tail()}")

    def _assert_running(self) -> None:
        assert self.process is not None and self.process.poll() is None, f"tandem serve exited:\n{self.log_tail()}"

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def prefill_decision(self, request_id: str, timeout: float = 5.0) -> str:
        """The decode worker's logged decision for a request: local, remote or fallback.

        supervisord relays the worker's output into the log a moment later (it polls the
        pipes): a response can reach the client before its decision line reaches the file.
        """
        marker = f"request {request_id}: prefill "
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if marker in line:
                    return line.split(marker, 1)[1].split(" ", 1)[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no prefill decision logged for {request_id}:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None:
            stop_process_tree(self.process)


def stop_process_tree(process: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    """SIGTERM a `tandem serve`, then kill whatever of its tree outlived the timeout.

    supervisord puts each service in its own process group: the tree is remembered
    before the stop, so a supervisord that does not stop in time leaves nothing behind.
    """
    if process.poll() is not None:
        return
    descendants = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
