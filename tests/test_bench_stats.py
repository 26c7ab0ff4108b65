"""myecho-bench's statistics: medians and percentiles as numpy defines them."""

from __future__ import annotations

import pytest

from myecho.bench.stats import Summary, median, percentile, ratio, spread


def test_median_odd_and_even() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median([7.0]) == 7.0


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0.0) == 1.0
    assert percentile(values, 1.0) == 100.0
    assert percentile(values, 0.99) == pytest.approx(99.01)  # numpy.percentile(range(1,101), 99)
    assert percentile([10.0, 20.0], 0.25) == pytest.approx(12.5)


def test_percentile_ignores_order_and_keeps_the_input() -> None:
    values = [5.0, 1.0, 4.0]
    assert percentile(values, 0.5) == 4.0
    assert values == [5.0, 1.0, 4.0]


def test_percentile_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        percentile([], 0.5)
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


def test_summary_of_a_long_tail() -> None:
    samples = [20e-6] * 98 + [10e-3, 30e-3]  # two descheduled samples
    summary = Summary.of(samples)
    assert summary is not None
    assert summary.n == 100
    assert summary.median == pytest.approx(20e-6)  # the median ignores the tail
    assert summary.p99 > 1e-3  # p99 shows it
    assert summary.min == 20e-6 and summary.max == 30e-3
    assert Summary.of([]) is None


def test_ratio_and_spread() -> None:
    assert ratio(3.0, 1.5) == 2.0
    assert ratio(None, 1.0) is None
    assert ratio(1.0, 0.0) is None
    assert spread([1.0, 1.1, 0.9]) == pytest.approx(0.2)
    assert spread([1.0]) is None
