"""What a benchmark or an end-to-end test runs, each process stopped by its PID however it ends: NATS
and etcd of its own, graphs under `tandem serve` on namespaces of their own (`async with ServedGraph`,
or `start()` and `stop()` for one that outlives a block), other servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import httpx
import psutil
import yaml

from app.infra import EtcdServer, NatsServer
from app.launch.ports import free_port
from app.launch.processes import stop_pid
from app.protocol import InstanceRecord, names
from app.runtime import Runtime
from app.settings import RuntimeSettings

REPO = Path(__file__).resolve().parents[1]
TANDEM = str(Path(sys.executable).with_name("tandem"))
# The endpoint whose instances show that a service serves (in wait_ready's order).
SERVING_ENDPOINT = {
    names.VLLM_WORKER: names.GENERATE,
    names.ROUTER: names.ROUTE,
    names.PROCESSOR: names.CHAT_COMPLETIONS,
    names.PREFILL_WORKER: names.PREFILL_STATUS,
}


@contextlib.contextmanager
def control_plane(workdir: Path) -> Iterator[tuple[NatsServer, EtcdServer]]:
    """NATS (JetStream) and etcd on free loopback ports."""
    nats = NatsServer("127.0.0.1", free_port(), free_port(), workdir / "nats")
    etcd = EtcdServer("127.0.0.1", free_port(), free_port(), workdir / "etcd")
    try:
        nats.start()
        etcd.start()
        yield nats, etcd
    finally:
        etcd.stop()
        nats.stop()


def stop_process_tree(
    process: subprocess.Popen[bytes], timeout: float = 90.0, known: Iterable[psutil.Process] = ()
) -> None:
    """SIGTERM a process and wait, SIGKILL it after `timeout`; then kill whatever of its tree is left.

    supervisord puts each service in a process group of its own, and an orphan can no longer be
    found from its parent: the tree is taken before the stop, and `known` adds what was seen earlier.
    """
    left = list(known)
    if process.poll() is None:
        with contextlib.suppress(psutil.NoSuchProcess):
            left += psutil.Process(process.pid).children(recursive=True)
        stop_pid(process.pid, timeout, process)
    for child in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()  # psutil makes sure first that the PID was not reused


async def _instances(runtime: Runtime, service: str, endpoint: str) -> dict[str, InstanceRecord]:
    watch = await runtime.discovery.watch_instances(service, endpoint)
    try:
        return dict(watch.items)
    finally:
        await watch.close()


class ServedProcess:
    """A server in a session of its own (a terminal's Ctrl-C does not reach it), its output in a log."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path, port: int) -> None:
        self.argv, self.env, self.log_path, self.port = list(argv), dict(env), log_path, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._seen: dict[int, psutil.Process] = {}

    def start(self) -> None:
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                self.argv,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @contextlib.contextmanager
    def running(self) -> Iterator[Self]:
        """Started, and stopped on leaving the block however it ends."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def descendants(self) -> list[psutil.Process]:
        """The process tree as seen now and before, remembered for the stop."""
        assert self.process is not None
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self._seen.setdefault(child.pid, child)
        return list(self._seen.values())

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def assert_running(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.argv[0]} exited with {self.process.returncode}:\n{self.log_tail()}")

    async def healthy(self) -> bool:
        """GET /health answers 200: Tandem's Frontend serves a model, vLLM's server has its engine."""
        with contextlib.suppress(httpx.HTTPError):
            async with httpx.AsyncClient(timeout=5) as http:
                return (await http.get(f"http://127.0.0.1:{self.port}/health")).status_code == 200
        return False

    async def wait_healthy(self, timeout: float) -> None:
        await self._poll(self.healthy, timeout, lambda: "not healthy")

    async def _poll(self, ready: Callable[[], Awaitable[bool]], timeout: float, state: Callable[[], str]) -> None:
        """Until `ready()`, while the server runs; its `state()` and its log's tail in the error after `timeout`."""
        deadline = time.monotonic() + timeout
        while not await ready():
            self.assert_running()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.argv[0]}: {state()} after {timeout:.0f} s:\n{self.log_tail()}")
            await asyncio.sleep(0.5)
        self.descendants()

    def stop(self, timeout: float = 90.0) -> None:
        if self.process is not None:
            stop_process_tree(self.process, timeout, self.descendants())
            self.process = None


class ServedGraph(ServedProcess):
    """`tandem serve GRAPH -f CONFIG --Frontend.port=PORT OVERRIDES...`, as an operator runs it on one node.

    CONFIG is a file, or a mapping written to `workdir/NAME.yaml`; the log is `workdir/NAME.log`.
    """

    def __init__(
        self,
        graph: str,
        config: Path | Mapping[str, Any],
        workdir: Path,
        nats_url: str,
        etcd_url: str,
        *,
        overrides: Sequence[str] = (),
        name: str = "serve",
        lease_ttl_s: int = 10,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config_path = config if isinstance(config, Path) else workdir / f"{name}.yaml"
        if not isinstance(config, Path):
            self.config_path.write_text(yaml.safe_dump(dict(config)))
        self.settings = RuntimeSettings(
            nats_server=nats_url,
            etcd_endpoints=etcd_url,
            lease_ttl_s=lease_ttl_s,
            namespace=f"graph{uuid.uuid4().hex[:10]}",
            connect_timeout_s=10.0,
        )
        port = free_port()
        env = {
            **(os.environ if env is None else env),
            "NATS_SERVER": nats_url,
            "ETCD_ENDPOINTS": etcd_url,
            "TANDEM_NAMESPACE": self.settings.namespace,
            "TANDEM_LEASE_TTL_S": str(lease_ttl_s),
        }
        # Each request's prefill decision (a DEBUG line), which the disaggregation tests read.
        env.setdefault("TANDEM_DEBUG_LOGGERS", "app.disagg.policy")
        argv = [TANDEM, "serve", graph, "-f", str(self.config_path), f"--Frontend.port={port}", *overrides]
        super().__init__(argv, env, workdir / f"{name}.log", port)
        self.runtime: Runtime | None = None

    async def __aenter__(self) -> Self:
        self.start()
        try:
            self.runtime = await Runtime.connect(self.settings)
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self.runtime is not None:
                await self.runtime.close()
        finally:
            self.stop()

    @contextlib.asynccontextmanager
    async def _runtime(self) -> AsyncIterator[Runtime]:
        """The graph's Runtime inside `async with`; one for the moment outside it (after `start()`)."""
        if self.runtime is not None:
            yield self.runtime
        else:
            async with await Runtime.connect(self.settings) as runtime:
                yield runtime

    async def instances(self, service: str, endpoint: str | None = None) -> dict[str, InstanceRecord]:
        """The live instance records of a service's endpoint (by default the one that shows it serves)."""
        async with self._runtime() as runtime:
            return await _instances(runtime, service, endpoint or SERVING_ENDPOINT[service])

    async def wait_ready(
        self,
        workers: int,
        *,
        routers: int | None = None,
        processors: int | None = None,
        prefill_workers: int | None = None,
        timeout: float = 300.0,
    ) -> None:
        """Until that many instances serve (None: any number) and the Frontend's /health says it serves a model."""
        wanted = (workers, routers, processors, prefill_workers)
        expected = {service: n for service, n in zip(SERVING_ENDPOINT, wanted, strict=True) if n is not None}
        counts: dict[str, int] = {}
        async with self._runtime() as runtime:

            async def ready() -> bool:
                counts.update({s: len(await _instances(runtime, s, SERVING_ENDPOINT[s])) for s in expected})
                return counts == expected and await self.healthy()

            await self._poll(ready, timeout, lambda: f"graph not ready: {counts} serve, {expected} expected")

    async def prefill_jobs_done(self) -> int:
        """Jobs the graph's PrefillWorkers answered so far, summed over them (inside `async with`)."""
        assert self.runtime is not None
        client = self.runtime.client(names.PREFILL_WORKER, names.PREFILL_STATUS)
        done = [await client.call({}, target=instance, timeout=10.0) for instance in await client.watch()]
        return sum(int(status.get("done", 0)) for status in done)

    def service_pids(self) -> dict[str, list[int]]:
        """Live service processes by service: `Frontend` runs `... app.components.frontend:Frontend ...`."""
        by_service: dict[str, list[int]] = {}
        for child in self.descendants():
            with contextlib.suppress(psutil.Error):
                name = next((a.split(":", 1)[1] for a in child.cmdline() if a.startswith("app.") and ":" in a), None)
                if name is not None and child.is_running():
                    by_service.setdefault(name, []).append(child.pid)
        return by_service
