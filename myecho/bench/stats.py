"""Order statistics for timings: medians and tail percentiles.

Benchmarks on a shared machine have long right tails (a descheduled
process shows up as one 10 ms sample among 20 us ones), so the tables quote
medians and show p99 beside them, never means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (0..1), interpolated between closest ranks.

    The same definition as numpy's default ("linear"), so figures can be
    checked with any tool. Raises ValueError on an empty sequence.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction {fraction} is not within 0..1")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    weight = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * weight


def median(values: Sequence[float]) -> float:
    """The middle value (mean of the two middle ones for an even count)."""
    return percentile(values, 0.5)


@dataclass(frozen=True)
class Summary:
    """What a table cell needs from many samples of one duration (seconds)."""

    n: int
    median: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary | None:
        """The summary of ``values``, or None when there are none."""
        if not values:
            return None
        return cls(len(values), median(values), percentile(values, 0.99), min(values), max(values))


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference, or None when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def spread(values: Sequence[float]) -> float | None:
    """Relative spread of repeated runs: (max - min) / median; how noisy a figure is."""
    if len(values) < 2:
        return None
    mid = median(values)
    return (max(values) - min(values)) / mid if mid else None
