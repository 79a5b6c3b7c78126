"""Each routing policy's choices on hand-made contexts."""

from __future__ import annotations

import collections
import math

import pytest

from app.router.load import WorkerLoad
from app.router.policies import POLICIES, PolicyConfigError, RoutingContext, create_policy

WORKERS = ["a", "b", "c"]


def context(overlaps: dict[str, int] | None = None, prompt_blocks: int = 10, **loads: WorkerLoad) -> RoutingContext:
    return RoutingContext(
        request_id="r",
        block_hashes=list(range(prompt_blocks)),
        overlaps=overlaps or {},
        load={w: loads.get(w, WorkerLoad()) for w in WORKERS},
        workers=WORKERS,
    )


def picks(policy_name: str, ctx: RoutingContext, n: int, **knobs: object) -> collections.Counter[str]:
    policy = create_policy(policy_name, {"seed": 1, **knobs})
    return collections.Counter(policy.select_worker(ctx).worker_id for _ in range(n))


def test_kv_prefers_the_worker_holding_the_prefix() -> None:
    decision = create_policy("kv").select_worker(context({"b": 8, "c": 2}))
    assert (decision.worker_id, decision.overlap_blocks, decision.prompt_blocks) == ("b", 8, 10)


def test_kv_avoids_the_prefix_holder_when_it_is_overloaded() -> None:
    busy = WorkerLoad(active_requests=20, kv_usage=0.9)
    assert create_policy("kv").select_worker(context({"b": 8}, b=busy)).worker_id in {"a", "c"}
    queued = WorkerLoad(pending_prefill_blocks=40)
    assert create_policy("kv").select_worker(context({"b": 8}, b=queued)).worker_id in {"a", "c"}


def test_kv_breaks_ties_at_random() -> None:
    assert set(picks("kv", context(), 100)) == set(WORKERS)


def test_kv_overlap_weight_trades_cache_for_load() -> None:
    ctx = context({"b": 8}, b=WorkerLoad(active_requests=5))  # b: 2 + 10 = 12 vs a, c: 10
    assert create_policy("kv", {"overlap-weight": 1.0}).select_worker(ctx).worker_id != "b"
    assert create_policy("kv").select_worker(ctx).worker_id == "b"  # the default weight is 2


def test_kv_temperature_samples_by_softmax_of_normalized_cost() -> None:
    # a costs 0, b costs 10, c costs 10 (normalized 0, 1, 1): p(a) = 1 / (1 + 2/e).
    ctx = context({"a": 10})
    counts = picks("kv", ctx, 6000, temperature=1.0)
    expected = 1 / (1 + 2 * math.exp(-1))
    assert abs(counts["a"] / 6000 - expected) < 0.03
    assert counts["b"] > 0 and counts["c"] > 0
    assert picks("kv", ctx, 500, temperature=0.05)["a"] == 500


def test_kv_legacy_scores_hit_fraction_against_usage_and_queue() -> None:
    policy = create_policy("kv-legacy")
    assert policy.select_worker(context({"b": 5})).worker_id == "b"
    # b: 2*0.5 - 0.9 - 1 = -0.9 ; a, c: 0
    ctx = context({"b": 5}, b=WorkerLoad(kv_usage=0.9, waiting=3))
    assert policy.select_worker(ctx).worker_id in {"a", "c"}


def test_round_robin_spreads_evenly_in_turn() -> None:
    policy = create_policy("round-robin")
    order = [policy.select_worker(context({"a": 10})).worker_id for _ in range(6)]
    assert order == ["a", "b", "c", "a", "b", "c"]


def test_random_spreads_over_all_workers() -> None:
    counts = picks("random", context(), 3000)
    assert all(800 < counts[w] < 1200 for w in WORKERS)


def test_least_loaded_picks_fewest_active_then_lowest_kv_usage() -> None:
    policy = create_policy("least-loaded")
    loads = context(
        {"a": 10},
        a=WorkerLoad(active_requests=3),
        b=WorkerLoad(active_requests=1, kv_usage=0.5),
        c=WorkerLoad(active_requests=1, kv_usage=0.2),
    )
    assert policy.select_worker(loads).worker_id == "c"


def test_unknown_or_invalid_knobs_are_named() -> None:
    with pytest.raises(PolicyConfigError, match=r"'kv'.*unknown knob 'overlap_wieght'"):
        create_policy("kv", {"overlap_wieght": 1})
    with pytest.raises(PolicyConfigError, match="knob 'temperature'"):
        create_policy("kv", {"temperature": -1})
    with pytest.raises(PolicyConfigError, match="unknown knob 'seed'"):
        create_policy("round-robin", {"seed": 3})
    with pytest.raises(PolicyConfigError, match="unknown router policy 'fastest'"):
        create_policy("fastest")


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_is_documented_with_a_yaml_example(name: str) -> None:
    import sys

    doc = sys.modules[POLICIES[name].__module__].__doc__ or ""
    assert f"`{name}`" in doc and f"policy: {name}" in doc and "Knobs" in doc
