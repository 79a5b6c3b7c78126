"""The vLLM stat logger sums vLLM's per-step deltas into the worker's counters.

Fed with vLLM's own stats objects, as AsyncLLM hands them over after each engine step.
"""

from __future__ import annotations

from vllm.v1.metrics.stats import IterationStats, PrefillStats, PrefixCacheStats, SchedulerStats

from app.engines.vllm_stats import SchedulerStatsCapture


def _step(external: int, computed: int, connector_stats: dict | None) -> tuple[SchedulerStats, IterationStats]:
    scheduler = SchedulerStats(
        num_running_reqs=1,
        prefix_cache_stats=PrefixCacheStats(queries=external + computed, hits=0),
        kv_connector_stats=connector_stats,
    )
    iteration = IterationStats()
    iteration.prompt_token_stats.update_from_output(
        PrefillStats(
            num_prompt_tokens=external + computed,
            num_computed_tokens=computed,
            num_cached_tokens=external,
            num_external_cached_tokens=external,
        )
    )
    return scheduler, iteration


def test_external_kv_tokens_and_nixl_bytes_add_up_across_steps() -> None:
    capture = SchedulerStatsCapture()
    logger = capture.factory(vllm_config=None)  # type: ignore[arg-type]
    # A remote prefill pulled over NIXL (two transfers in the step), then a local prefill.
    logger.record(*_step(external=96, computed=4, connector_stats={"bytes_transferred": [4096, 2048]}))
    logger.record(*_step(external=0, computed=20, connector_stats=None))
    logger.record(
        *_step(external=64, computed=1, connector_stats={"bytes_transferred": [1024], "num_failed_transfers": []})
    )
    stats = capture.snapshot(in_flight=1, total_blocks=100)
    assert stats.external_kv_prompt_tokens == 160
    assert stats.kv_transfer_bytes == 7168
    assert stats.prefix_cache_queries == 185


def test_a_connector_without_byte_counts_reports_no_bytes() -> None:
    capture = SchedulerStatsCapture()
    logger = capture.factory(vllm_config=None)  # type: ignore[arg-type]
    logger.record(*_step(external=32, computed=0, connector_stats={"num_descriptors": [3]}))
    stats = capture.snapshot(in_flight=0, total_blocks=100)
    assert (stats.external_kv_prompt_tokens, stats.kv_transfer_bytes) == (32, 0)


def test_nixl_failures_and_expiries_add_up_across_steps() -> None:
    capture = SchedulerStatsCapture()
    logger = capture.factory(vllm_config=None)  # type: ignore[arg-type]
    # NixlConnector's serialized stats: one entry (1) per event in its list.
    logger.record(
        *_step(external=0, computed=8, connector_stats={"num_failed_transfers": [1, 1], "num_failed_handshakes": [1]})
    )
    logger.record(*_step(external=0, computed=8, connector_stats={"num_kv_expired_reqs": [1], "bytes_transferred": []}))
    logger.record(*_step(external=0, computed=8, connector_stats={"num_failed_transfers": [1]}))
    stats = capture.snapshot(in_flight=0, total_blocks=100)
    assert (stats.kv_transfer_failures, stats.kv_expired_requests) == (4, 1)
