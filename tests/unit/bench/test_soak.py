"""The soak's figures from made-up samples: RSS growth per process, each kill's recovery, the report."""

from __future__ import annotations

import argparse
import math

import msgspec

from bench.harness.load import RequestResult, summarize
from bench.scenarios import (
    Kill,
    ProcessRss,
    Soak,
    SoakRun,
    kill_report,
    rss_rows,
    throughput_back_s,
    window_medians,
)

MIB = 2**20


def test_rss_growth_is_per_process_and_a_replacement_is_held_to_its_services_median() -> None:
    after_warmup = {("Frontend", 10): 500 * MIB, ("VllmWorker", 11): 90 * MIB, ("VllmWorker", 12): 100 * MIB}
    after_warmup[("VllmWorker", 13)] = 110 * MIB
    at_end = {("Frontend", 10): 520 * MIB, ("VllmWorker", 12): 100 * MIB, ("VllmWorker", 13): 99 * MIB}
    at_end[("VllmWorker", 20)] = 102 * MIB  # the replacement of 11, killed
    rows = {(row.process, row.pid): row for row in rss_rows(after_warmup, at_end)}
    assert list(rows) == [
        ("Frontend", 10),
        ("VllmWorker", 11),
        ("VllmWorker", 12),
        ("VllmWorker", 13),
        ("VllmWorker", 20),
    ]
    assert math.isclose(rows["Frontend", 10].growth, 0.04)
    assert math.isnan(rows["VllmWorker", 11].growth) and rows["VllmWorker", 11].at_end is None
    assert rows["VllmWorker", 12].growth == 0.0
    assert math.isclose(rows["VllmWorker", 13].growth, -0.1)
    assert rows["VllmWorker", 20].after_warmup is None
    assert math.isclose(rows["VllmWorker", 20].growth, 0.02)  # over the median of 90, 100 and 110


def test_each_end_of_the_soak_is_the_median_of_its_window_of_samples() -> None:
    samples = [(0.0, {("etcd", 1): 30}), (5.0, {("etcd", 1): 36, ("VllmWorker", 2): 90}), (10.0, {("etcd", 1): 31})]
    samples.append((40.0, {("etcd", 1): 99}))  # outside the window
    assert window_medians(samples, 0.0, 10.0) == {("etcd", 1): 31, ("VllmWorker", 2): 90}


def test_throughput_is_back_at_the_first_window_near_the_rate_before_the_kill() -> None:
    steady = [i / 10 for i in range(300)]  # 10 completions a second for 30 s, then the kill at 30
    assert throughput_back_s([*steady, *(30 + i / 10 for i in range(100))], 30.0, until=40.0) == 0.0
    # Nothing completes for 2 s after the kill; from then on 10 a second again.
    dip = [*steady, *(32 + i / 10 for i in range(100))]
    assert math.isclose(throughput_back_s(dip, 30.0, until=42.0), 1.5)  # 4.5 of its 5 s at the old rate: 90 %
    assert math.isnan(throughput_back_s(dip, 30.0, until=36.0))  # not before the next kill


def _request(sent_at: float, e2e_s: float, worker: str, ok: bool = True, gaps: tuple[float, ...] = ()) -> RequestResult:
    return RequestResult(ok=ok, e2e_s=e2e_s, sent_at=sent_at, ttft_s=0.1, itl_s=list(gaps), worker=worker)


def test_a_kill_counts_the_streams_on_the_killed_worker_and_times_its_replacement() -> None:
    results = [
        _request(99.0, 0.5, "a"),  # done before the kill at 100
        _request(99.5, 11.0, "a", gaps=(0.01, 9.5)),  # in flight on the killed worker: migrated, stalled 9.5 s
        _request(99.8, 1.0, "b"),  # in flight elsewhere
        _request(103.0, 1.0, "c"),  # the replacement's first: its first text 103.1
    ]
    kill = kill_report(results, 40.0, ("a", 1234, 100.0), ("c", 102.0), until=200.0)
    assert (kill.at_s, kill.worker, kill.pid, kill.streams, kill.failed) == (60.0, "a", 1234, 1, 0)
    assert kill.longest_stall_s == 9.5
    assert kill.replaced_s == 2.0 and math.isclose(kill.replacement_first_token_s, 3.1)
    never = kill_report(results, 40.0, ("b", 1, 100.0), (None, math.nan), until=101.0)
    assert math.isnan(never.replaced_s) and math.isnan(never.replacement_first_token_s)
    assert math.isnan(never.throughput_back_s)


def test_the_report_gives_failures_kills_and_rss() -> None:
    kill = Kill(300.0, "w1", 77, 4, 0, 9.6, 2.0, 2.1, 0.5)
    processes = [
        ProcessRss("Frontend", 10, 500 * MIB, 510 * MIB, 0.02),
        ProcessRss("VllmWorker", 77, 90 * MIB, None, math.nan),
    ]
    processes.append(ProcessRss("VllmWorker", 90, None, 95 * MIB, 0.06))
    soak = SoakRun(("soak",), summarize([_request(0.0, 1.0, "w1")], 1.0), kills=[kill], processes=processes)
    args = argparse.Namespace(warmup=60.0, duration=1200.0, kill_every=300.0)
    lines = Soak().render([soak], args)
    assert lines[0] == (
        "Load: 1 streamed chat requests at concurrency 32, prompts of ~128 words, 64 output tokens (ignore_eos), "
        "a closed loop for 60 s of warm-up and 1200 s measured; one of the 8 workers SIGKILLed every 300 s."
    )
    assert "| 1 | 0 yes | 1 | 1.0 | 100 ms | 100 ms | 1000 ms | 1000 ms |" in lines
    assert "| 1 | 300 | w1 (77) | 4 | 0 | 9.60 s | 2.0 | 2.1 | 0.5 |" in lines
    assert "| Frontend | 10 | 500.0 | 510.0 | +2.0% yes |" in lines
    assert "| VllmWorker | 77 | 90.0 | (killed) | |" in lines
    assert "| VllmWorker | 90 | (replacement) | 95.0 | +6.0% **no** |" in lines
    assert lines[-1] == "Largest growth: +6.0% (VllmWorker, pid 90); target < 5%: **no**."
    assert msgspec.json.encode([soak])  # what --json-out writes
