"""Prometheus view of a router replica's `RoutingCore`: what a Router exposes on its metrics port."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import get_args

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from app.router.core import RoutingCore
from app.router.kv_resync import KvResync, Reason

_DECISION_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 0.1)


class RouterMetrics(Collector):
    """Reads the core's own counters at scrape time (nothing to keep in step) and times
    its decisions in a histogram (`observe_decision` is the RoutingCore's callback)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.core: RoutingCore | None = None  # set once the replica has built it
        self.kv_resync: KvResync | None = None  # likewise
        self.decision_seconds = Histogram(
            "tandem_router_decision_seconds",
            "Time to pick a worker for one request",
            buckets=_DECISION_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(self)

    def observe_decision(self, seconds: float) -> None:
        self.decision_seconds.observe(seconds)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        core = self.core
        if core is None:
            return
        counters = core.counters
        yield CounterMetricFamily("tandem_router_decisions", "Requests routed", value=counters.decisions)
        yield CounterMetricFamily(
            "tandem_router_prompt_blocks", "Full KV blocks in the prompts routed", value=counters.prompt_blocks
        )
        yield CounterMetricFamily(
            "tandem_router_hit_blocks", "Prompt blocks the chosen worker already held", value=counters.hit_blocks
        )
        yield GaugeMetricFamily("tandem_router_hit_rate", "hit_blocks / prompt_blocks so far", value=counters.hit_rate)
        yield CounterMetricFamily(
            "tandem_router_rejected_kv_batches",
            "KV event batches rejected (block size mismatch)",
            value=counters.rejected_batches,
        )
        yield GaugeMetricFamily(
            "tandem_router_kv_silent_workers",
            "Workers running requests without publishing KV events for longer than kv-silence-s",
            value=len(core.kv_health.silent),
        )
        yield CounterMetricFamily(
            "tandem_router_kv_silences",
            "Times a worker was found running requests without publishing KV events",
            value=core.kv_health.silences,
        )
        yield GaugeMetricFamily(
            "tandem_router_kv_rejected_workers",
            "Workers whose latest KV event batch was rejected (block size mismatch)",
            value=len(core.kv_health.rejected),
        )
        yield CounterMetricFamily(
            "tandem_router_kv_seq_gaps", "Gaps seen in workers' KV event sequences", value=core.seq_gaps
        )
        yield GaugeMetricFamily("tandem_router_indexed_blocks", "Blocks in the KV index", value=core.index.num_blocks())
        yield CounterMetricFamily(
            "tandem_router_stray_events",
            "KV event batches and load reports dropped: their worker is not in discovery (it left)",
            value=core.counters.stray_events,
        )
        if self.kv_resync is not None:
            yield _by_reason(
                "tandem_router_kv_resyncs",
                "Workers' KV views replaced by a dump of their cache, by why: start, seq_gap, registered",
                self.kv_resync.resyncs,
            )
            yield _by_reason(
                "tandem_router_kv_resync_failures",
                "Workers that never sent the dump of their cache (routed by their KV events alone), by why",
                self.kv_resync.failures,
            )


def _by_reason(name: str, documentation: str, counts: Mapping[Reason, int]) -> CounterMetricFamily:
    """Every reason, those at 0 too: a rate() over a series that appears late misses its first count."""
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    for reason in get_args(Reason):
        family.add_metric([reason], counts.get(reason, 0))
    return family
