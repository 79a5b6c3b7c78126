"""The engine's scheduler state as Prometheus metrics, read at scrape time (the engine host
serves them on the worker's metrics port, beside what the worker adds)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from app.engines.base import Engine

# Each EngineStats field's metric: its kind, name and help.
_METRICS: dict[str, tuple[type[GaugeMetricFamily | CounterMetricFamily], str, str]] = {
    "running": (GaugeMetricFamily, "tandem_worker_running_requests", "Requests the engine is running"),
    "waiting": (GaugeMetricFamily, "tandem_worker_waiting_requests", "Requests waiting in the engine"),
    "kv_used_blocks": (GaugeMetricFamily, "tandem_worker_kv_used_blocks", "KV cache blocks in use"),
    "kv_total_blocks": (GaugeMetricFamily, "tandem_worker_kv_total_blocks", "KV cache blocks in all"),
    "prefix_cache_hits": (
        CounterMetricFamily,
        "tandem_worker_prefix_cache_hits",
        "Prompt tokens served from the prefix cache",
    ),
    "prefix_cache_queries": (
        CounterMetricFamily,
        "tandem_worker_prefix_cache_queries",
        "Prompt tokens looked up in the prefix cache",
    ),
    # Rises on a decode worker whose prompts were prefilled remotely (vLLM's
    # external_kv_transfer prompt-token source); stays 0 on an aggregated worker.
    "external_kv_prompt_tokens": (
        CounterMetricFamily,
        "tandem_worker_external_kv_prompt_tokens",
        "Prompt tokens whose KV a KV connector pulled from another engine instead of computing it",
    ),
    "kv_transfer_bytes": (
        CounterMetricFamily,
        "tandem_worker_kv_transfer_bytes",
        "Bytes of KV cache the KV connector transferred (NIXL telemetry)",
    ),
    # vLLM's NIXL failure counters (vllm:nixl_num_failed_transfers and _handshakes, summed),
    # and on a prefill worker vllm:nixl_num_kv_expired_reqs: a decode that never pulled.
    "kv_transfer_failures": (
        CounterMetricFamily,
        "tandem_worker_kv_transfer_failures",
        "KV pulls that failed (a transfer or its handshake); the request recomputed its prompt",
    ),
    "kv_expired_requests": (
        CounterMetricFamily,
        "tandem_worker_kv_expired_requests",
        "Prefilled requests whose held KV expired before a decode engine pulled it",
    ),
}


class EngineStatsView(Collector):
    """The engine's scheduler state, as its workers' load reports carry it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._engine.stats()
        for field, (family, name, documentation) in _METRICS.items():
            yield family(name, documentation, value=getattr(stats, field))
