"""The benchmarks' reports from made-up runs: what they compute and the tables docs/benchmarks.md quotes."""

from __future__ import annotations

import argparse
import json
import math

from bench import disagg_scenarios, vs_direct
from bench.harness.load import RequestResult
from bench.loadgen import summarize


def _stream(ttft: float, gaps: list[float], prompt: int = 100) -> RequestResult:
    e2e = ttft + sum(gaps)
    return RequestResult(ok=True, e2e_s=e2e, ttft_s=ttft, itl_s=gaps, output_tokens=len(gaps) + 1, prompt_tokens=prompt)


def test_vs_direct_puts_each_system_and_their_ratio_in_one_table() -> None:
    def run(system: vs_direct.System, ttft: float) -> vs_direct.RunResult:
        summary = summarize([_stream(ttft, [0.01] * 9) for _ in range(10)], duration_s=2.0)
        return vs_direct.RunResult(system, 1, 0, summary)

    results = [run("direct", 0.04), run("tandem", 0.05)]
    lines = vs_direct.markdown_table(results, [1]).splitlines()
    assert lines[0].startswith("| system | concurrency | output tok/s | req/s | TTFT p50 ms |")
    assert lines[2] == "| direct | 1 | 50.0 | 5.00 | 40.0 | 40.0 | 10.00 | 10.00 | 1 | 0 |"
    assert lines[4] == "| **Tandem / direct** | 1 | 1.00 | 1.00 | 1.25 | 1.25 | 1.00 | 1.00 | | |"
    assert vs_direct.verdict(results, [1]) == "concurrency 1: Tandem at 100% of direct (meets the 90% target)"
    args = argparse.Namespace(repeats=1, concurrency=[1], requests=10)
    section = vs_direct.section_text("cmd", "Run ...", "TABLE\n", args, results)
    assert section.startswith(vs_direct.SECTION_TITLE) and "(100 tokens by the servers' count)" in section
    assert json.dumps(results[0].summary.as_dict())  # strict JSON: no NaN


def test_disagg_figures_split_decode_pace_from_chunk_gaps_and_count_stalls() -> None:
    steady = _stream(0.2, [0.01] * 4)
    stalled = _stream(0.1, [0.01, 0.3, 0.01, 0.01])
    figures = disagg_scenarios.kind_figures([steady, stalled], stall_s=0.1)
    assert figures["requests"] == 2 and figures["prompt tokens"] == 100
    assert math.isclose(figures["TPOT p50"], (0.01 + 0.0825) / 2)  # (e2e - TTFT) / (tokens - 1), then the median
    assert figures["stalled"] == 0.5
    run = disagg_scenarios.RunResult(by_kind={"long": figures, "short": figures}, output_tokens_per_s=42.0, failed=0)
    report = disagg_scenarios.render({"aggregated": [run]}, "cmd", 1, "Run ...", disagg_scenarios.SCENARIOS["mocker"])
    assert (
        "| layout | requests | prompt tokens | TTFT p50 | TTFT p99 | TPOT p50 | ITL p50 | ITL p99 | ITL p99.9 "
        "| requests stalled >= 100 ms | output tok/s (all) | prefilled remotely |" in report
    )
    assert (
        "| aggregated, long | 2 | 100 | 150 ms | 199 ms | 46.3 ms | 10.0 ms | 279.7 ms | 298 ms | 50% | 42 | 0 |"
        in report
    )
