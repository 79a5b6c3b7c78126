"""Running one service in this process: connect, start, serve, wait for a signal, drain, stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from app.sdk.config import GraphConfig
from app.sdk.service import EndpointSpec, spec_of
from app.settings import RuntimeSettings

log = logging.getLogger(__name__)

REPLICA_ENV = "TANDEM_REPLICA"  # supervisord's process_num for this program


@dataclass(frozen=True)
class ServiceContext:
    """Where a service instance runs: `self.ctx` inside a service."""

    service_name: str
    replica: int  # 0-based index among this node's processes of the service
    config_path: str | None
    config: GraphConfig  # the whole file, for services that read another's section


def replica_from_env() -> int:
    return int(os.environ.get(REPLICA_ENV, "0"))


def configure_logging(service_name: str, replica: int, level: int = logging.INFO) -> None:
    """One line per event, tagged `Service[replica]`: processes of a node share one stdout."""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {service_name}[{replica}] %(name)s: %(message)s",
        force=True,
    )


def _endpoint_handler(instance: Any, ep: EndpointSpec) -> Callable[[Any, Any], AsyncIterator[Any]]:
    method = getattr(instance, ep.method_name)

    async def handle(payload: Any, ctx: Any) -> AsyncIterator[Any]:
        stream = method(payload, ctx) if ep.wants_context else method(payload)
        # aclosing: when the caller goes away the runtime closes this generator, and the
        # endpoint's own `finally` (e.g. aborting the engine request) must run at once.
        async with contextlib.aclosing(stream):
            async for item in stream:
                yield item

    return handle


async def run_service(
    cls: type,
    config: GraphConfig,
    settings: RuntimeSettings,
    *,
    replica: int | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve `cls` until SIGTERM/SIGINT (or until `stop` is set, when given)."""
    from app.runtime import Runtime

    spec = spec_of(cls)
    service_config = config.service_config(spec, check_engine_args=True)
    ctx = ServiceContext(spec.name, replica_from_env() if replica is None else replica, config.path, config)
    loop = asyncio.get_running_loop()
    handled_signals: list[signal.Signals] = []
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            handled_signals.append(sig)

    runtime = await Runtime.connect(settings)
    log.info("connected: instance %s, namespace %s", runtime.instance_id, runtime.namespace)
    try:
        # Injected before __init__ so that a service may use its config there already.
        instance = cls.__new__(cls)
        instance.config = service_config
        instance.runtime = runtime
        instance.ctx = ctx
        instance.__init__()
        for hook in spec.on_start:
            await getattr(instance, hook)()
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
            log.info("serving %s", ", ".join(spec.endpoints) or "no endpoints")
            await stop.wait()
            log.info("stopping: draining in-flight requests")
        finally:
            await asyncio.gather(*(s.stop() for s in served))
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
