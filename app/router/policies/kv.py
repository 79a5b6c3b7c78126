"""`kv`: the cheapest worker by prefill work still to do plus decode load.

For each live worker w, in units of KV blocks of prefill work:

    cost(w) = prompt_blocks - overlap_weight * overlap(w)          # prompt blocks it must compute
            + prefill_load_weight * pending_prefill_blocks(w)      # prefills already queued there
            + active_request_cost * active_requests(w)             # decode batch it is running
            + kv_usage_cost * kv_usage(w)                          # how full its KV cache is

The cheapest worker wins, ties broken at random. With `temperature` > 0 the worker is
sampled instead, with probability proportional to exp(-normalized_cost / temperature),
costs normalized to [0, 1] across the candidates: spreads load among near-equal workers.

Inputs: overlaps from the KV index (`needs_kv_index`), load view (active requests,
pending prefill blocks, KV usage).

Knobs:
  overlap_weight       credit per cached prompt block (default 2.0: a cached block saves its
                       prefill now and keeps its prefix group on one worker instead of copied
                       across several; measured in docs/benchmarks.md, KV routing)
  prefill_load_weight  weight of other requests' pending prefill blocks (default 1.0)
  active_request_cost  blocks-equivalent cost of one active request (default 2.0)
  kv_usage_cost        blocks-equivalent cost of a full KV cache (default 64.0)
  temperature          0 = argmin; > 0 = softmax sampling (default 0.0)
  seed                 fixes tie-breaks and sampling (default: none)

Example (graph config):

    Router:
      policy: kv
      knobs:
        overlap-weight: 2.0
        active-request-cost: 2.0
        temperature: 0.1
"""

from __future__ import annotations

import math

import pydantic

from app.protocol import RouteDecision
from app.router.policies.base import RoutingContext, SeededKnobs, SeededPolicy, pick_lowest


class KvKnobs(SeededKnobs):
    overlap_weight: float = pydantic.Field(default=2.0, ge=0)
    prefill_load_weight: float = pydantic.Field(default=1.0, ge=0)
    active_request_cost: float = pydantic.Field(default=2.0, ge=0)
    kv_usage_cost: float = pydantic.Field(default=64.0, ge=0)
    temperature: float = pydantic.Field(default=0.0, ge=0)


class KvPolicy(SeededPolicy):
    name = "kv"
    needs_kv_index = True
    Knobs = KvKnobs
    knobs: KvKnobs

    def costs(self, ctx: RoutingContext) -> dict[str, float]:
        k = self.knobs
        prompt_blocks = ctx.prompt_blocks
        costs = {}
        for worker_id in ctx.workers:
            load = ctx.load[worker_id]
            costs[worker_id] = (
                prompt_blocks
                - k.overlap_weight * ctx.overlaps.get(worker_id, 0)
                + k.prefill_load_weight * load.pending_prefill_blocks
                + k.active_request_cost * load.active_requests
                + k.kv_usage_cost * load.kv_usage
            )
        return costs

    def select_worker(self, ctx: RoutingContext) -> RouteDecision:
        costs = self.costs(ctx)
        if self.knobs.temperature > 0:
            return ctx.decision(self._sample(costs))
        return ctx.decision(pick_lowest(costs, self._rng))

    def _sample(self, costs: dict[str, float]) -> str:
        low, high = min(costs.values()), max(costs.values())
        spread = high - low
        if spread == 0:
            return self._rng.choice(list(costs))
        temperature = self.knobs.temperature
        workers = list(costs)
        weights = [math.exp(-(costs[w] - low) / spread / temperature) for w in workers]
        return self._rng.choices(workers, weights=weights)[0]
