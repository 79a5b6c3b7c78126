"""`least-loaded`: the worker with the fewest active requests, then the lowest KV usage.

Active requests blend the worker's last load report with the placements the routers
made since (see `app.router.load`), so a burst spreads out before the next report.
Exact ties are broken at random. Ignores cache contents.

Inputs: load view (active requests, KV usage).

Knobs:
  seed  fixes tie-breaks (default: none)

Example (graph config):

    Router:
      policy: least-loaded
"""

from __future__ import annotations

from app.protocol import RouteDecision
from app.router.policies.base import RoutingContext, SeededKnobs, SeededPolicy


class LeastLoadedPolicy(SeededPolicy):
    name = "least-loaded"
    Knobs = SeededKnobs

    def select_worker(self, ctx: RoutingContext) -> RouteDecision:
        def load_key(worker_id: str) -> tuple[int, float]:
            load = ctx.load[worker_id]
            return load.active_requests, load.kv_usage

        best = min(load_key(w) for w in ctx.workers)
        tied = [w for w in ctx.workers if load_key(w) == best]
        return ctx.decision(tied[0] if len(tied) == 1 else self._rng.choice(tied))
