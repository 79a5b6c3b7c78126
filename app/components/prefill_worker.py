"""PrefillWorker: pulls prefill jobs from the shared work queue and hands the KV to decode.

The engine lives in an `EngineHost` (app/engines/host.py) that advertises nothing: no
request is routed here. The jobs are `PrefillJobs` (app/disagg/prefill.py; the hand-off
is app/protocol/prefill.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field

from app.disagg.prefill import PrefillJobs
from app.engines.host import EngineHost, WorkerConfig
from app.protocol import names
from app.runtime import Runtime
from app.sdk import Service, ServiceContext, endpoint, on_shutdown, on_start, service


class PrefillWorkerConfig(WorkerConfig):
    max_concurrent_jobs: int = Field(default=4, ge=1, description="prefill jobs in the engine at once")


@service(config=PrefillWorkerConfig)
class PrefillWorker(Service):
    config: PrefillWorkerConfig
    ctx: ServiceContext
    runtime: Runtime

    def __init__(self) -> None:
        self.host = EngineHost(
            names.PREFILL_WORKER, names.PREFILL_STATUS, self.config, self.ctx, self.runtime, advertise=False
        )
        self._jobs = PrefillJobs(
            self.runtime, self.host.engine.generate, self.config.max_concurrent_jobs, self.host.metrics, self.ctx.fail
        )

    @on_start
    async def start(self) -> None:
        await self.host.start()
        await self._jobs.start()

    @endpoint
    async def status(self, request: Any) -> AsyncIterator[dict[str, Any]]:
        """This worker's id, process id, model, live job pullers and job counts (done,
        failed, expired, undelivered, errors), and its wall clock when it answered.

        The process id tells an operator (or a test) which process on the node this
        instance is, e.g. to stop one PrefillWorker of several. The clock is how `tandem
        doctor` measures this node's clock offset (over the call's round trip): a PrefillWorker
        publishes no reports.
        """
        yield {
            "worker_id": self.runtime.instance_id,
            "pid": os.getpid(),
            "time": time.time(),
            "model": self.host.info.name if self.host.info is not None else "",
            "pullers": self._jobs.live_pullers(),
            **self._jobs.counts,
        }

    @on_shutdown
    async def stop(self) -> None:
        await self._jobs.close()
        await self.host.stop()
