"""`kv-legacy`: Dynamo's original KV-router score, highest wins.

    score(w) = hit_weight * overlap(w) / prompt_blocks - kv_usage(w) - waiting(w) / max_waiting

where max_waiting is the largest waiting queue among the live workers (1 if all are
empty). Ties are broken at random. Kept for comparison with the `kv` cost model: it
ignores how many requests a worker is decoding and what the router placed since the
last load report, except through KV usage.

Inputs: overlaps from the KV index (`needs_kv_index`), KV usage, waiting queue.

Knobs:
  hit_weight  weight of the cache-hit fraction (default 2.0)
  seed        fixes tie-breaks (default: none)

Example (graph config):

    Router:
      policy: kv-legacy
      knobs:
        hit-weight: 2.0
"""

from __future__ import annotations

import pydantic

from app.protocol import RouteDecision
from app.router.policies.base import RoutingContext, SeededKnobs, SeededPolicy, pick_lowest


class KvLegacyKnobs(SeededKnobs):
    hit_weight: float = pydantic.Field(default=2.0, ge=0)


class KvLegacyPolicy(SeededPolicy):
    name = "kv-legacy"
    needs_kv_index = True
    Knobs = KvLegacyKnobs
    knobs: KvLegacyKnobs

    def select_worker(self, ctx: RoutingContext) -> RouteDecision:
        max_waiting = max((ctx.load[w].waiting for w in ctx.workers), default=0) or 1
        prompt_blocks = ctx.prompt_blocks or 1
        negated_scores = {}
        for worker_id in ctx.workers:
            load = ctx.load[worker_id]
            hit_fraction = ctx.overlaps.get(worker_id, 0) / prompt_blocks
            score = self.knobs.hit_weight * hit_fraction - load.kv_usage - load.waiting / max_waiting
            negated_scores[worker_id] = -score
        return ctx.decision(pick_lowest(negated_scores, self._rng))
