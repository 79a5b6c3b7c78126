"""A service process's /metrics: views read the service's own state at scrape time, and each
replica serves on its own port."""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import CounterView, replica_port


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_counter_view_follows_the_counter() -> None:
    decisions: Counter[str] = Counter()
    registry = CollectorRegistry()
    registry.register(CounterView("tandem_worker_prefill_decisions", "where", "decision", decisions))
    decisions["remote"] += 2
    decisions["local"] += 1
    values = scrape(registry)
    assert values[("tandem_worker_prefill_decisions_total", (("decision", "remote"),))] == 2
    assert values[("tandem_worker_prefill_decisions_total", (("decision", "local"),))] == 1


def test_each_replica_serves_on_the_base_port_plus_its_index() -> None:
    assert [replica_port(9100, replica) for replica in range(3)] == [9100, 9101, 9102]
    assert replica_port(None, 2) is None
