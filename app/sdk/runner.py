"""Running one service in this process: connect, start, serve, wait for a signal, drain, stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from app import env
from app.aio import cancel_and_wait
from app.protocol import ProcessRecord
from app.sdk import startup
from app.sdk.config import GraphConfig
from app.sdk.graph import dependency_names
from app.sdk.heap import settle_heap
from app.sdk.service import EndpointSpec, spec_of
from app.settings import RuntimeSettings
from app.versions import tandem_version, vllm_version

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ProcessFacts:
    """What a service tells the fleet about its process, set during its start hooks: the
    runner puts it in the process record it writes once they are done."""

    nixl_side_channel: str = ""  # HOST:PORT where its engine listens for NIXL handshakes


@dataclass(frozen=True)
class ServiceContext:
    """Where a service instance runs: `self.ctx` inside a service."""

    service_name: str
    replica: int  # 0-based index among this node's processes of the service
    config_path: str | None
    config: GraphConfig  # the whole file, for services that read another's section
    # Asks this process to leave because the service can serve nothing more (its engine
    # died, ...): it deregisters at once, stops, and exits non-zero, so that supervisord
    # starts a fresh one.
    fail: Callable[[str], None]
    # The names of the services of the graph this one runs in: a depends() target outside
    # it is not deployed (graphs.agg's Processor has no Router to ask).
    graph: frozenset[str] = frozenset()
    process: ProcessFacts = field(default_factory=ProcessFacts)


# Of supervisord's stop wait (TANDEM_STOP_WAIT_S), what a service keeps to stop its engine
# and leave once its drain has ended.
STOP_AFTER_DRAIN_S = 10


def drain_budget_s() -> int:
    """How long a service on SIGTERM goes on serving its in-flight calls, out of routing:
    the one budget the layers above it (supervisord, the container's stop) are sized by."""
    return max(env.TANDEM_STOP_WAIT_S.get() - STOP_AFTER_DRAIN_S, 1)


class ServiceFailedError(Exception):
    """The service called `ctx.fail(reason)`: the process stopped and must exit non-zero."""


def configure_logging(service_name: str, replica: int, level: int = logging.INFO) -> None:
    """One line per event, tagged `Service[replica]`: processes of a node share one stdout."""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {service_name}[{replica}] %(name)s: %(message)s",
        force=True,
    )
    # Per-request lines are DEBUG (a busy node would log thousands a second); an operator
    # who wants some of them names their loggers.
    for name in filter(None, (part.strip() for part in (env.TANDEM_DEBUG_LOGGERS.get() or "").split(","))):
        logging.getLogger(name).setLevel(logging.DEBUG)


def _endpoint_handler(instance: Any, ep: EndpointSpec) -> Callable[[Any, Any], AsyncGenerator[Any, None]]:
    method = getattr(instance, ep.method_name)

    async def handle(payload: Any, ctx: Any) -> AsyncGenerator[Any, None]:
        stream = method(payload, ctx) if ep.wants_context else method(payload)
        # aclosing: when the caller goes away the runtime closes this generator, and the
        # endpoint's own `finally` (e.g. aborting the engine request) must run at once.
        async with contextlib.aclosing(stream):
            async for item in stream:
                yield item

    return handle


async def _unless_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """`work`'s result, or None (`work` cancelled) if `stop` is set first: a SIGTERM while
    NATS or etcd cannot be reached yet ends the process at once."""
    task = asyncio.create_task(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if task.done():
        return task.result()
    await cancel_and_wait(task)
    return None


async def _start(instance: Any, hooks: list[str]) -> bool:
    for hook in hooks:
        await getattr(instance, hook)()
    return True


def _leave_without_threads(status: int) -> None:
    """Exit now if a thread still runs: an engine load (`asyncio.to_thread`) that a SIGTERM
    during start-up left behind cannot be cancelled, and the interpreter would wait for
    it at exit, minutes for a large model. The engine processes it started are ended by
    app.launch.leftovers' guard when this process is gone."""
    if any(thread.is_alive() for thread in threading.enumerate() if thread is not threading.main_thread()):
        log.info("leaving without waiting for %d thread(s)", threading.active_count() - 1)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


async def run_service(
    cls: type[Any],
    config: GraphConfig,
    settings: RuntimeSettings,
    *,
    replica: int | None = None,
    stop: asyncio.Event | None = None,
    graph: frozenset[str] | None = None,
) -> None:
    """Serve `cls` until SIGTERM/SIGINT (or until `stop` is set, when given)."""
    from app.runtime import Runtime

    started_at = time.time()
    spec = spec_of(cls)
    service_config = config.service_config(spec, check_engine_args=True)
    loop = asyncio.get_running_loop()
    handled_signals: list[signal.Signals] = []
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            handled_signals.append(sig)
    stopping = stop
    failures: list[str] = []

    def fail(reason: str) -> None:
        if not failures:
            failures.append(reason)
            stopping.set()

    replica = env.TANDEM_REPLICA.get() if replica is None else replica
    if graph is None:
        graph = dependency_names(spec)
    ctx = ServiceContext(spec.name, replica, config.path, config, fail, graph)

    connected = await _unless_stopped(Runtime.connect(settings), stop)
    if connected is None:
        for sig in handled_signals:
            loop.remove_signal_handler(sig)
        log.info("stopped while connecting")
        return
    runtime = connected
    # A lost etcd keep-alive or watch ends this process as a failed service does.
    runtime.discovery.on_failure(fail)
    startup.phase(startup.CONNECTED, f"instance {runtime.instance_id}, namespace {runtime.namespace}")
    interrupted = False  # by a stop during the start hooks
    try:
        # Injected before __init__ so that a service may use its config there already.
        # Any: the attributes below are the runner's to set on whatever class the service is.
        instance: Any = cast(Any, cls).__new__(cls)
        instance.config = service_config
        instance.runtime = runtime
        instance.ctx = ctx
        instance.__init__()
        if await _unless_stopped(_start(instance, spec.on_start), stop) is None:
            log.info("stopped during start-up")
            interrupted = True
            return
        served = []
        try:
            for ep in spec.endpoints.values():
                served.append(
                    await runtime.serve_endpoint(
                        service=spec.name,
                        endpoint=ep.name,
                        handler=_endpoint_handler(instance, ep),
                        metadata={"replica": ctx.replica},
                        request_type=ep.request_type,
                    )
                )
            # What `tandem status` lists: every service process, with or without endpoints.
            await runtime.discovery.register_process(
                ProcessRecord(
                    instance_id=runtime.instance_id,
                    service=spec.name,
                    replica=ctx.replica,
                    host=runtime.host,
                    pid=os.getpid(),
                    started_at=started_at,
                    endpoints=list(spec.endpoints),
                    tandem_version=tandem_version(),
                    vllm_version=vllm_version(),
                    nixl_side_channel=ctx.process.nixl_side_channel,
                )
            )
            if spec.endpoints:
                startup.phase(startup.ROUTABLE, ", ".join(spec.endpoints))
            else:
                startup.phase(startup.REGISTERED, "no endpoints")
            if handled_signals:  # the process is this service's own
                settle_heap()
            await stop.wait()
            if failures:
                log.error("leaving: %s", failures[0])
                # Out of discovery before anything else: callers pick other instances from
                # now on instead of this one while it stops.
                await asyncio.gather(*(s.withdraw() for s in served))
            else:
                budget_s = drain_budget_s()
                log.info("stopping: out of routing, draining in-flight requests (at most %ds)", budget_s)
                await asyncio.gather(*(s.drain(budget_s) for s in served))
        finally:
            # What a drain left (or a failure's calls) ends now, with an error its callers
            # can act on (another worker takes the stream).
            await asyncio.gather(*(s.stop(drain_timeout_s=0) for s in served))
            for hook in spec.on_shutdown:
                try:
                    await getattr(instance, hook)()
                except Exception:
                    log.exception("on_shutdown hook %s failed", hook)
    finally:
        await runtime.close()
        for sig in handled_signals:
            loop.remove_signal_handler(sig)
        log.info("stopped")
        if interrupted and handled_signals:
            _leave_without_threads(1 if failures else 0)
    if failures:
        raise ServiceFailedError(failures[0])
