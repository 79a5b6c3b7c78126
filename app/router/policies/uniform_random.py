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

import random

from app.protocol import RouteDecision
from app.router.policies.base import RoutingContext, RoutingPolicy, SeededKnobs


class RandomPolicy(RoutingPolicy):
    name = "random"
    Knobs = SeededKnobs

    def __init__(self, knobs: SeededKnobs) -> None:
        super().__init__(knobs)
        self._rng = random.Random(knobs.seed)

    def select_worker(self, ctx: RoutingContext) -> RouteDecision:
        return ctx.decision(self._rng.choice(ctx.workers))
