"""`random`: a live worker picked uniformly at random.

Ignores cache contents and load; a baseline.

Inputs: live worker ids.

Knobs:
  seed  fixes the sequence of picks (default: none)

Example (graph config):

    Router:
      policy: random
      knobs:
        seed: 7
"""

from __future__ import annotations

from app.protocol import RouteDecision
from app.router.policies.base import RoutingContext, SeededKnobs, SeededPolicy


class RandomPolicy(SeededPolicy):
    name = "random"
    Knobs = SeededKnobs

    def select_worker(self, ctx: RoutingContext) -> RouteDecision:
        return ctx.decision(self._rng.choice(ctx.workers))
