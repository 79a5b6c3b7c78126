"""PrefillWorker: pulls prefill jobs from the shared work queue and hands the KV to decode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from app.components.worker import WorkerConfig
from app.sdk import endpoint, service


class PrefillWorkerConfig(WorkerConfig):
    pass


@service(config=PrefillWorkerConfig)
class PrefillWorker:
    config: PrefillWorkerConfig

    @endpoint
    async def status(self, request: Any) -> AsyncIterator[dict[str, Any]]:
        raise NotImplementedError("PrefillWorker.status")
        yield  # makes this an async generator, as @endpoint requires
