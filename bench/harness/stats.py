"""The statistics every benchmark reports: percentiles, medians, the summary of a load phase.
NaN where there is nothing to measure, so that an empty metric is visibly absent."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from bench.harness.load import RequestResult

T = TypeVar("T")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating between the closest ranks (numpy's default)."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Iterable[float]) -> float:
    """The median of the values that are numbers (a run without samples gives NaN: it is left out)."""
    numbers = [v for v in values if not math.isnan(v)]
    return statistics.median(numbers) if numbers else math.nan


def median_run(runs: Sequence[T], key: Callable[[T], float]) -> T:
    """The run whose measure is the median (the lower one for an even count)."""
    return sorted(runs, key=key)[(len(runs) - 1) // 2]


@dataclass
class Summary:
    """A load phase's figures over its successful requests (docs/benchmarks.md, "Load generator")."""

    requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # successful requests over the wall time of the phase
    output_token_throughput: float  # and their output tokens
    total_output_tokens: int
    mean_prompt_tokens: float  # the server's count
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    itl_p50_s: float
    itl_p99_s: float
    itl_p999_s: float  # a long prefill stalling a batch is a few gaps in a thousand: p99.9 sees it
    e2e_p50_s: float
    e2e_p99_s: float
    errors: dict[str, int]
    error_examples: dict[str, str]
    workers: dict[str, int]

    def as_text(self) -> str:
        """One line per figure, times in milliseconds."""
        lines = []
        for name, value in vars(self).items():
            if isinstance(value, float):
                value = f"{value * 1000:.2f} ms" if name.endswith("_s") else f"{value:.2f}"
            lines.append(f"{name.removesuffix('_s'):24} {value}")
        return "\n".join(lines)


def summarize(results: Sequence[RequestResult], duration_s: float) -> Summary:
    ok, failed = [r for r in results if r.ok], [r for r in results if not r.ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    # A request's decode pace, however its tokens were bunched into streamed chunks.
    tpots = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.ttft_s is not None and r.output_tokens > 1]
    itls = [gap for r in ok for gap in r.itl_s]
    e2es = [r.e2e_s for r in ok]
    tokens = sum(r.output_tokens for r in ok)
    examples: dict[str, str] = {}
    for r in failed:
        examples.setdefault(r.error_kind or "unknown", r.error_message or "")
    return Summary(
        requests=len(results),
        completed=len(ok),
        failed=len(failed),
        duration_s=duration_s,
        request_throughput=len(ok) / duration_s if duration_s > 0 else 0.0,
        output_token_throughput=tokens / duration_s if duration_s > 0 else 0.0,
        total_output_tokens=tokens,
        mean_prompt_tokens=statistics.fmean(r.prompt_tokens for r in ok) if ok else math.nan,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        tpot_p50_s=percentile(tpots, 50),
        itl_p50_s=percentile(itls, 50),
        itl_p99_s=percentile(itls, 99),
        itl_p999_s=percentile(itls, 99.9),
        e2e_p50_s=percentile(e2es, 50),
        e2e_p99_s=percentile(e2es, 99),
        errors=dict(Counter(r.error_kind or "unknown" for r in failed)),
        error_examples=examples,
        workers=dict(Counter(r.worker for r in ok if r.worker is not None)),
    )


@dataclass
class Phase:
    """One load phase on one system, measured: a row of a benchmark's table in one run."""

    row: tuple[str, ...]  # the row's label cells, e.g. ("tandem", "32")
    summary: Summary
    extra: dict[str, float] = field(default_factory=dict)  # figures a benchmark adds to the Summary's

    def figure(self, name: str) -> float:
        return self.extra[name] if name in self.extra else float(getattr(self.summary, name))


def median_rows(phases: Iterable[Phase]) -> dict[tuple[str, ...], dict[str, float]]:
    """Per row (in the order of their first runs), each figure's median over its runs, but "failed": the
    sum of the runs' failed requests; "runs" counts them."""
    by_row: dict[tuple[str, ...], list[Phase]] = {}
    for phase in phases:
        by_row.setdefault(phase.row, []).append(phase)
    names = [f.name for f in fields(Summary) if f.type in ("int", "float")]
    rows = {
        row: {name: median(r.figure(name) for r in runs) for name in [*names, *runs[0].extra]}
        for row, runs in by_row.items()
    }
    for row, runs in by_row.items():
        rows[row].update(runs=len(runs), failed=sum(r.summary.failed for r in runs))
    return rows
