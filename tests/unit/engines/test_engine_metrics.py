"""The engine's scheduler state on /metrics, read at scrape time."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from app.engines.metrics import EngineStatsView
from app.engines.mocker import MockerEngine
from app.protocol import PreprocessedRequest, SamplingOptions, StopConditions
from tests.unit.test_metrics import scrape


async def test_engine_stats_view_shows_a_running_request() -> None:
    engine = MockerEngine.from_config(
        {
            "model": "m",
            "block_size": 16,
            "num_gpu_blocks": 64,
            "max_model_len": 1024,
            "speedup_ratio": 1.0,
            "decode_base_ms": 20.0,
            "vocab_size": 100,
            "eos_token_id": 1,
        }
    )
    registry = CollectorRegistry()
    registry.register(EngineStatsView(engine))
    await engine.start("w")
    try:
        request = PreprocessedRequest(
            request_id="r",
            model="m",
            token_ids=list(range(2, 50)),
            sampling=SamplingOptions(),
            stop=StopConditions(max_tokens=50, ignore_eos=True),
        )
        stream = engine.generate(request)
        await anext(stream)
        values = scrape(registry)
        assert values[("tandem_worker_running_requests", ())] == 1
        assert values[("tandem_worker_kv_used_blocks", ())] >= 3
        assert values[("tandem_worker_kv_total_blocks", ())] == 64
        await stream.aclose()
        await asyncio.sleep(0.05)
        assert scrape(registry)[("tandem_worker_running_requests", ())] == 0
    finally:
        await engine.stop()
