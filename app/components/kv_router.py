"""Router: picks the worker for a request (KV overlap, load, or a simple policy).

Each Router process is one router replica (app/router/replica.py), configured by this
section (app/router/config.py) and fed by the fleet through the runtime: every replica
builds the whole KV index and shares its placements, so replicas neither miss cached
prefixes nor pile onto one worker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from app.components.worker import VllmWorker
from app.protocol import RouteDecision, RouteRequest
from app.router.config import RouterConfig, router_replica
from app.runtime import Runtime
from app.sdk import Service, ServiceContext, depends, endpoint, on_shutdown, on_start, service


@service(config=RouterConfig)
class Router(Service):
    config: RouterConfig
    runtime: Runtime
    ctx: ServiceContext
    worker = depends(VllmWorker)

    def __init__(self) -> None:
        self._replica = router_replica(self.runtime, self.config, self.worker.generate, self.ctx.replica)

    @on_start
    async def start(self) -> None:
        await self._replica.start()

    @endpoint(request=RouteRequest)
    async def route(self, request: RouteRequest) -> AsyncIterator[RouteDecision]:
        yield self._replica.route(request.request_id, request.token_ids, request.exclude, model=request.model)

    @on_shutdown
    async def stop(self) -> None:
        await self._replica.close()
