"""The statistics every benchmark reports: percentiles, medians, the median run. NaN where there is nothing."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default method); NaN for no values, so an empty metric is visibly absent."""
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
