"""What `tandem serve` says while its graph starts: "waiting for: ..." every 10 s, then one
"graph up: ..." line once every service of the graph has all its processes registered.

It reads the process records the services write to etcd when their start is done
(app/sdk/runner.py; `tandem status` reads the same ones): a VllmWorker writes its own
once its engine is ready and its `generate` is served, i.e. once it is routable. Only
this serve's processes count: records of this node whose process is a child of this
serve's supervisord (a second `tandem serve` on the node, or another node, may run the
same services in the namespace).

The watch only reports. It runs in a thread of its own beside supervisord's foreground
wait (app/sdk/supervisor.py), so that stopping (SIGTERM, SIGINT to supervisord)
and the exit status stay as they were; if it cannot reach etcd it says so and ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from app.launch.leftovers import parent_pid
from app.protocol import ProcessRecord, names
from app.sdk import startup
from app.sdk.config import GraphConfig
from app.sdk.service import ServiceSpec
from app.settings import RuntimeSettings

log = logging.getLogger(__name__)

# How often a graph that is not up yet says what it waits for.
REPORT_INTERVAL_S = 10.0
# Between two reads of the process records (one etcd range read each).
_POLL_INTERVAL_S = 0.5
# How long `tandem serve` waits for the watch to end once supervisord has exited.
_STOP_WAIT_S = 5.0


@dataclass(frozen=True)
class ExpectedService:
    """A service of the graph as this serve runs it."""

    name: str
    processes: int  # its replicas on this node
    routable: bool = False  # it serves `generate`: the workers requests are routed to
    port: int | None = None  # where it serves HTTP (a Frontend)


def expected_services(
    services: Sequence[ServiceSpec], processes: Mapping[str, int], config: GraphConfig
) -> list[ExpectedService]:
    """The graph's services that have processes here (`processes`: by service name), in
    the graph's order."""
    expected = []
    for spec in services:
        count = processes.get(spec.name, 0)
        if count <= 0:
            continue
        port = getattr(config.service_config(spec), "port", None)
        expected.append(
            ExpectedService(spec.name, count, names.GENERATE in spec.endpoints, port if isinstance(port, int) else None)
        )
    return expected


def registered(expected: Sequence[ExpectedService], records: Iterable[ProcessRecord]) -> dict[str, int]:
    """Per expected service, how many of its replicas have a record (`records`: this serve's)."""
    replicas: dict[str, set[int]] = {service.name: set() for service in expected}
    for record in records:
        if record.service in replicas:
            replicas[record.service].add(record.replica)
    return {service.name: len(replicas[service.name]) for service in expected}


def is_up(expected: Sequence[ExpectedService], counts: Mapping[str, int]) -> bool:
    return all(counts.get(service.name, 0) >= service.processes for service in expected)


def waiting_text(expected: Sequence[ExpectedService], counts: Mapping[str, int], elapsed_s: float) -> str:
    """`waiting for: VllmWorker 0/2 routable, Router 1/2 (after 20 s)`: the services not
    all there yet."""
    missing = [
        f"{service.name} {counts.get(service.name, 0)}/{service.processes}" + (" routable" if service.routable else "")
        for service in expected
        if counts.get(service.name, 0) < service.processes
    ]
    return f"waiting for: {', '.join(missing)} (after {elapsed_s:.0f} s)"


def up_text(expected: Sequence[ExpectedService], elapsed_s: float) -> str:
    """`graph up: Frontend on :8000, 2 VllmWorkers routable, 1 Router (after 14.2 s)`."""
    parts = []
    for service in expected:
        many = f"{service.processes} {service.name}" + ("s" if service.processes > 1 else "")
        if service.port is not None:
            parts.append((service.name if service.processes == 1 else many) + f" on :{service.port}")
        else:
            parts.append(many + (" routable" if service.routable else ""))
    return f"graph up: {', '.join(parts)} (after {elapsed_s:.1f} s)"


def children_of(parent: int, host: str) -> Callable[[ProcessRecord], bool]:
    """Whether a record is of a process on `host` whose parent is `parent` (supervisord)."""
    return lambda record: record.host == host and parent_pid(record.pid) == parent


class GraphWatch:
    """`start(supervisord_pid)` once supervisord runs, `stop()` once it has exited."""

    def __init__(
        self,
        expected: Sequence[ExpectedService],
        settings: RuntimeSettings,
        report_interval_s: float = REPORT_INTERVAL_S,
    ) -> None:
        self._expected = list(expected)
        self._settings = settings
        self._report_interval_s = report_interval_s
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def start(self, supervisord_pid: int) -> None:
        if not self._expected:
            return
        # A daemon: a watch stuck in a call never holds up the exit.
        self._thread = threading.Thread(
            target=self._thread_main, args=(supervisord_pid,), name="graph-watch", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._loop is not None and self._task is not None:
                self._loop.call_soon_threadsafe(self._task.cancel)
        if self._thread is not None:
            self._thread.join(_STOP_WAIT_S)

    def _thread_main(self, supervisord_pid: int) -> None:
        try:
            asyncio.run(self._main(supervisord_pid))
        except Exception:
            log.exception("the graph watch failed; it reports nothing more")

    async def _main(self, supervisord_pid: int) -> None:
        with self._lock:
            if self._stopped:
                return
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()
        try:
            with contextlib.suppress(asyncio.CancelledError):  # stop(): supervisord has exited
                await self.watch(supervisord_pid)
        finally:
            with self._lock:
                self._loop = self._task = None  # done: nothing left for stop() to cancel

    async def watch(self, supervisord_pid: int) -> None:
        """Until the graph is up (said once), or until cancelled."""
        from app.runtime import ConnectError, Runtime

        try:
            runtime = await Runtime.connect(self._settings)
        except ConnectError as exc:
            log.warning("%s; the start-up of the graph is not reported", exc)
            return
        async with runtime:
            ours = children_of(supervisord_pid, runtime.host)
            next_report = time.monotonic() + self._report_interval_s
            problem = ""
            counts: dict[str, int] = {}
            while True:
                try:
                    records = await runtime.discovery.list_processes()
                    counts, problem = registered(self._expected, filter(ours, records)), ""
                except Exception as exc:  # etcd away for a moment: the services wait for it too
                    problem = f"; etcd: {type(exc).__name__}: {exc}"
                if not problem and is_up(self._expected, counts):
                    log.info("%s", up_text(self._expected, startup.elapsed_s()))
                    return
                if time.monotonic() >= next_report:
                    log.info("%s%s", waiting_text(self._expected, counts, startup.elapsed_s()), problem)
                    next_report += self._report_interval_s
                await asyncio.sleep(_POLL_INTERVAL_S)
