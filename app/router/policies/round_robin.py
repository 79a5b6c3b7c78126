"""`round-robin`: each request to the next live worker in turn.

Ignores cache contents and load; the baseline every KV-aware policy must beat.
The cursor walks the sorted live worker ids, so workers joining or leaving shift it
but never make it skip the whole fleet.

Inputs: live worker ids. Knobs: none.

Example (graph config):

    Router:
      policy: round-robin
"""

from __future__ import annotations

from app.protocol import RouteDecision
from app.router.policies.base import NoKnobs, RoutingContext, RoutingPolicy


class RoundRobinPolicy(RoutingPolicy):
    name = "round-robin"

    def __init__(self, knobs: NoKnobs) -> None:
        super().__init__(knobs)
        self._cursor = 0

    def select_worker(self, ctx: RoutingContext) -> RouteDecision:
        worker_id = ctx.workers[self._cursor % len(ctx.workers)]
        self._cursor += 1
        return ctx.decision(worker_id)
