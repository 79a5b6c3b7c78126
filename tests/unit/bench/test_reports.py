"""The benchmarks' reports from made-up runs: what they compute and the tables docs/benchmarks.md quotes."""

from __future__ import annotations

import argparse
import math

import msgspec

from bench.harness.load import LoadConfig, Phase, RequestResult, summarize
from bench.scenarios import Disagg, VsDirect, by_kind


def _stream(ttft: float, gaps: list[float], prompt: int = 100) -> RequestResult:
    e2e = ttft + sum(gaps)
    return RequestResult(ok=True, e2e_s=e2e, ttft_s=ttft, itl_s=gaps, output_tokens=len(gaps) + 1, prompt_tokens=prompt)


def test_vs_direct_puts_each_system_and_their_ratio_in_one_table() -> None:
    def run(system: str, ttft: float) -> Phase:
        return Phase((system, "1"), summarize([_stream(ttft, [0.01] * 9) for _ in range(10)], duration_s=2.0))

    phases = [run("direct", 0.04), run("tandem", 0.05)]
    lines = VsDirect().render(phases, argparse.Namespace(runs=1, requests=10))
    assert lines[0] == (
        "Each run, after a warm-up: 10 streamed chat requests at concurrency 1, prompts of ~128 words, "
        "64 output tokens (ignore_eos); 100 prompt tokens by the servers' count."
    )
    assert lines[2].startswith("| system | concurrency | output tok/s | req/s | TTFT p50 ms |")
    assert lines[4] == "| direct | 1 | 50.0 | 5.00 | 40.0 | 40.0 | 10.00 | 10.00 | 1 | 0 |"
    assert lines[6] == "| **Tandem / direct** | 1 | 1.00 | 1.00 | 1.25 | 1.25 | 1.00 | 1.00 | | |"
    assert lines[-1] == "concurrency 1: Tandem at 100% of direct (meets the 90% target)."
    assert msgspec.json.encode(phases)  # what --json-out writes: strict JSON, NaN as null


def test_disagg_rows_split_decode_pace_from_chunk_gaps_and_count_stalls() -> None:
    steady, stalled = _stream(0.2, [0.01] * 4), _stream(0.1, [0.01, 0.3, 0.01, 0.01])
    load = LoadConfig("m", long_share=1.0)  # every request is long
    whole = summarize([steady, stalled], duration_s=0.25)
    long, short = by_kind("aggregated", load, [steady, stalled], whole, 0.1, prefill_jobs=3)
    assert long.extra == {"stalled": 0.5, "all_output_tokens_per_second": 40.0, "prefill_jobs": 3}
    # (e2e - TTFT) / (tokens - 1), then the median
    assert math.isclose(long.summary.tpot_p50_s, (0.01 + 0.0825) / 2)
    assert short.summary.requests == 0
    report = Disagg().render([long], argparse.Namespace(requests=None))
    assert report[0] == (
        "Load: 200 streamed chat requests at concurrency 16, prompts of ~50 words, 30% of them ~1100 words, "
        "64 output tokens (ignore_eos)."
    )
    assert (
        "| layout | requests | prompt tokens | TTFT p50 | TTFT p99 | TPOT p50 | ITL p50 | ITL p99 | ITL p99.9 "
        "| requests stalled >= 100 ms | output tok/s (all) | prefilled remotely |" in report
    )
    assert (
        "| aggregated, long | 2 | 100 | 150 ms | 199 ms | 46.3 ms | 10.0 ms | 279.7 ms | 298 ms | 50% | 40 | 3 |"
        in report
    )
