"""The Router's Prometheus metrics read the RoutingCore's own accounting."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app.protocol import BlockStored, KvEventBatch
from app.router import RoutingCore
from app.router.metrics import RouterMetrics

BLOCK = 4


def scrape(metrics: RouterMetrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_hit_rate_decisions_and_decision_time_reach_the_scrape() -> None:
    metrics = RouterMetrics()
    assert "tandem_router_decisions_total" not in scrape(metrics)  # no core yet: nothing made up
    core = RoutingCore(BLOCK, "kv", {"seed": 0}, observe_decision_seconds=metrics.observe_decision)
    metrics.core = core
    prompt = list(range(40))
    core.apply_kv_batch(
        KvEventBatch(
            worker_id="w2",
            seq=0,
            block_size=BLOCK,
            events=[BlockStored(token_ids=prompt[:32], block_hashes=list(range(8)))],
        )
    )
    core.route("q1", prompt, ["w1", "w2"])  # 8 of 10 blocks cached on w2
    core.route("q2", list(range(500, 540)), ["w1", "w2"])  # nothing cached
    values = scrape(metrics)
    assert values["tandem_router_decisions_total"] == 2
    assert values["tandem_router_prompt_blocks_total"] == 20
    assert values["tandem_router_hit_blocks_total"] == 8
    assert values["tandem_router_hit_rate"] == 0.4
    assert values["tandem_router_indexed_blocks"] == 8
    assert values["tandem_router_decision_seconds_count"] == 2
    assert values["tandem_router_decision_seconds_sum"] > 0
