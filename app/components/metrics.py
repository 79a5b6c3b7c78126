"""Prometheus /metrics of a service process other than the Frontend.

Each process that sets `metrics-port` in its section serves its own registry on that port
plus its replica index (replicas of one service on a node must not collide). The views
read the service's own state at scrape time, so nothing is kept in step twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from app.engines import Engine


def serve_metrics(registry: CollectorRegistry, base_port: int | None, replica: int) -> Any:
    """Start the /metrics server (a daemon thread); the server to `shutdown()`, or None."""
    if base_port is None:
        return None
    server, _ = prometheus_client.start_http_server(base_port + replica, registry=registry)
    return server


class CounterView(Collector):
    """A `collections.Counter` as one labeled Prometheus counter."""

    def __init__(self, name: str, documentation: str, label: str, counts: Counter[str]) -> None:
        self._name, self._documentation, self._label, self._counts = name, documentation, label, counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._documentation, labels=[self._label])
        for value, count in sorted(self._counts.items()):
            family.add_metric([value], count)
        yield family


class EngineStatsView(Collector):
    """The engine's scheduler state, as its workers' load reports carry it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._engine.stats()
        yield GaugeMetricFamily("tandem_worker_running_requests", "Requests the engine is running", value=stats.running)
        yield GaugeMetricFamily("tandem_worker_waiting_requests", "Requests waiting in the engine", value=stats.waiting)
        yield GaugeMetricFamily("tandem_worker_kv_used_blocks", "KV cache blocks in use", value=stats.kv_used_blocks)
        yield GaugeMetricFamily("tandem_worker_kv_total_blocks", "KV cache blocks in all", value=stats.kv_total_blocks)
        yield CounterMetricFamily(
            "tandem_worker_prefix_cache_hits", "Prompt tokens served from the prefix cache", value=stats.prefix_cache_hits
        )
        yield CounterMetricFamily(
            "tandem_worker_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
            value=stats.prefix_cache_queries,
        )
        # Rises on a decode worker whose prompts were prefilled remotely (vLLM's
        # external_kv_transfer prompt-token source); stays 0 on an aggregated worker.
        yield CounterMetricFamily(
            "tandem_worker_external_kv_prompt_tokens",
            "Prompt tokens whose KV a KV connector pulled from another engine instead of computing it",
            value=stats.external_kv_prompt_tokens,
        )
        yield CounterMetricFamily(
            "tandem_worker_kv_transfer_bytes", "Bytes of KV cache the KV connector transferred (NIXL telemetry)",
            value=stats.kv_transfer_bytes,
        )
