"""Capture vLLM's scheduler statistics for a worker's load reports and metrics.

AsyncLLM hands every engine step's SchedulerStats and IterationStats to its stat loggers;
a logger that keeps the latest snapshot (and sums the per-step deltas) makes `stats()` a
cheap read instead of a round trip to the engine core.

The KV-transfer counters are the ones vLLM's own Prometheus logger exports as
`vllm:prompt_tokens_by_source{source="external_kv_transfer"}` and
`vllm:nixl_bytes_transferred`, and NIXL's failure and expiry counters
(`vllm:nixl_num_failed_transfers`, `_failed_handshakes`, `_kv_expired_reqs`): the same
per-step deltas, summed here so that the worker's metrics carry them under its own names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vllm.config import VllmConfig
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.stats import IterationStats, SchedulerStats

from app.engines.base import EngineStats


class SchedulerStatsCapture:
    """Latest scheduler state across the engine's data-parallel ranks."""

    def __init__(self) -> None:
        self._latest: dict[int, SchedulerStats] = {}
        # The counters: each step's deltas summed since start (a snapshot adds the latest state).
        self._counters = EngineStats()
        # Batches of engine core outputs received: the engine core sends one for every step
        # it completes while it has requests (with log_stats, which a custom logger turns on,
        # even a step with no request output carries its SchedulerStats).
        self.steps = 0

    def factory(self, vllm_config: VllmConfig, engine_index: int = 0) -> StatLoggerBase:
        """A per-engine stat logger factory, as AsyncLLM(stat_loggers=[...]) expects."""
        return _CapturingStatLogger(self, engine_index)

    def record(self, engine_index: int, stats: SchedulerStats) -> None:
        self._latest[engine_index] = stats
        self._counters.prefix_cache_hits += stats.prefix_cache_stats.hits
        self._counters.prefix_cache_queries += stats.prefix_cache_stats.queries
        if stats.kv_connector_stats:
            connector = stats.kv_connector_stats
            self._counters.kv_transfer_bytes += transferred_bytes(connector)
            self._counters.kv_transfer_failures += _count(connector, "num_failed_transfers", "num_failed_handshakes")
            self._counters.kv_expired_requests += _count(connector, "num_kv_expired_reqs")

    def record_iteration(self, stats: IterationStats) -> None:
        # Prompt tokens of requests that started this step whose KV a connector loaded
        # (a decode engine pulling a remote prefill) rather than the engine computing it.
        self._counters.external_kv_prompt_tokens += stats.prompt_token_stats.external_kv_transfer

    def snapshot(self, in_flight: int, total_blocks: int) -> EngineStats:
        """`in_flight`: requests the engine front end still tracks.

        The engine core reports only while it steps; after an abort leaves it idle its
        last report would show the aborted request forever. Nothing in flight means
        nothing running, nothing waiting and no block held (cached blocks are free).
        """
        if in_flight == 0:
            running = waiting = used_blocks = 0
        else:
            latest = self._latest.values()
            running = sum(s.num_running_reqs for s in latest)
            waiting = sum(s.num_waiting_reqs + s.num_skipped_waiting_reqs for s in latest)
            usage = sum(s.kv_cache_usage for s in latest) / max(len(self._latest), 1)
            used_blocks = round(usage * total_blocks)
        return dataclasses.replace(
            self._counters, running=running, waiting=waiting, kv_used_blocks=used_blocks, kv_total_blocks=total_blocks
        )


def transferred_bytes(connector_stats: dict[str, Any]) -> int:
    """Bytes a KV connector moved in one step, from its serialized stats.

    NixlConnector reports one `bytes_transferred` entry per finished transfer (NIXL
    telemetry, on by default); connectors that report no bytes count as 0.
    """
    moved = connector_stats.get("bytes_transferred")
    return int(sum(moved)) if isinstance(moved, list) else 0


def _count(connector_stats: dict[str, Any], *names: str) -> int:
    """Events of the named kinds in one step's connector stats: NixlConnector records one
    entry (1) in a list per event; a connector without them counts 0."""
    return sum(int(sum(entries)) for name in names if isinstance(entries := connector_stats.get(name), list))


class _CapturingStatLogger(StatLoggerBase):
    def __init__(self, capture: SchedulerStatsCapture, engine_index: int) -> None:
        self._capture = capture
        self._engine_index = engine_index

    def record(
        self,
        scheduler_stats: SchedulerStats | None,
        iteration_stats: IterationStats | None,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        self._capture.steps += 1
        if scheduler_stats is not None:
            self._capture.record(engine_idx, scheduler_stats)
        if iteration_stats is not None:
            self._capture.record_iteration(iteration_stats)

    def log_engine_initialized(self) -> None:
        pass
