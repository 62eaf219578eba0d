"""Latency histograms: precision against exact percentiles, lossless encode/decode and merge."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatprobe.histogram import HIGHEST_US, LOWEST_US, REPORTED_PERCENTILES, LatencyHistogram

PRECISION = 0.001  # 3 significant digits: a percentile is exact to 0.1 % of its value
PERCENTILES = (*REPORTED_PERCENTILES, 1.0, 25.0, 75.0, 99.99, 100.0)

# Latencies from 1 µs to well past the clamp, weighted towards realistic values.
samples = st.lists(st.one_of(st.integers(LOWEST_US, 5_000),
                             st.integers(LOWEST_US, 20_000_000),
                             st.integers(LOWEST_US, HIGHEST_US)),
                   min_size=1, max_size=300)


def exact_percentile(values: list[int], percentile: float) -> int:
    """Nearest rank with HdrHistogram's rounding of the rank (count * p / 100, half up,
    at least 1), from the sorted raw samples."""
    ordered = sorted(values)
    rank = max(int(percentile * len(ordered) / 100 + 0.5), 1)
    return ordered[min(rank, len(ordered)) - 1]


def histogram_of(values: list[int]) -> LatencyHistogram:
    hist = LatencyHistogram()
    for value in values:
        hist.record_us(value)
    return hist


def close(reported: int, exact: int) -> bool:
    return abs(reported - exact) <= exact * PRECISION


@settings(max_examples=200, deadline=None)
@given(samples)
def test_percentiles_within_precision_of_exact(values: list[int]) -> None:
    hist = histogram_of(values)
    assert hist.count == len(values)
    for p in PERCENTILES:
        assert close(hist.percentile_us(p), exact_percentile(values, p)), p
    assert close(hist.max_us(), max(values))
    assert close(hist.min_us(), min(values))


def test_percentiles_exact_for_small_values() -> None:
    values = list(range(1, 1001))  # 1..1000 µs: one bucket per value
    hist = histogram_of(values)
    assert hist.percentile_us(50.0) == 500
    assert hist.percentile_us(90.0) == 900
    assert hist.percentile_us(99.0) == 990
    assert hist.percentile_us(99.9) == 999
    assert hist.max_us() == 1000 and hist.min_us() == 1


def test_summary_ms_keys_and_values() -> None:
    hist = histogram_of([1000] * 50 + [2000] * 40 + [9000] * 10)
    summary = hist.summary_ms()
    assert set(summary) == {"p50", "p90", "p99", "p999", "max"}
    assert summary["p50"] == pytest.approx(1.0, rel=PRECISION)
    assert summary["p90"] == pytest.approx(2.0, rel=PRECISION)
    assert summary["p99"] == pytest.approx(9.0, rel=PRECISION)
    assert summary["p999"] == pytest.approx(9.0, rel=PRECISION)
    assert summary["max"] == pytest.approx(9.0, rel=PRECISION)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(-10, HIGHEST_US * 2), max_size=200))
def test_encode_decode_round_trip(values: list[int]) -> None:
    hist = histogram_of(values)
    encoded = hist.encode()
    assert isinstance(encoded, str) and encoded.isascii()
    back = LatencyHistogram.decode(encoded)
    assert back.count == hist.count == len(values)
    assert back.max_us() == hist.max_us()
    assert back.min_us() == hist.min_us()
    # summary_ms covers p50/p90/p99/p99.9 and max (each percentile walks the buckets: slow).
    assert back.summary_ms() == hist.summary_ms()
    assert back.percentile_us(100.0) == hist.percentile_us(100.0)


def test_decode_empty_string_is_empty_histogram() -> None:
    assert LatencyHistogram.decode("").count == 0


@settings(max_examples=100, deadline=None)
@given(samples, samples)
def test_merge_equals_histogram_of_union(a: list[int], b: list[int]) -> None:
    union = histogram_of(a + b)
    # In process ...
    merged = histogram_of(a)
    merged.merge(histogram_of(b))
    # ... and across processes, through the text encoding.
    carried = LatencyHistogram.decode(histogram_of(a).encode())
    carried.merge(LatencyHistogram.decode(histogram_of(b).encode()))
    for hist in (merged, carried):
        assert hist.count == union.count == len(a) + len(b)
        assert hist.max_us() == union.max_us()
        assert hist.min_us() == union.min_us()
        for p in REPORTED_PERCENTILES:
            assert hist.percentile_us(p) == union.percentile_us(p), p
            assert close(hist.percentile_us(p), exact_percentile(a + b, p)), p


def test_merge_with_empty_changes_nothing() -> None:
    hist = histogram_of([5, 50, 500])
    hist.merge(LatencyHistogram())
    assert hist.count == 3 and hist.max_us() == 500
    empty = LatencyHistogram()
    empty.merge(histogram_of([7]))
    assert empty.count == 1 and empty.percentile_us(50.0) == 7


@pytest.mark.parametrize("value", [0, -1, -1_000_000])
def test_zero_and_negative_clamped_to_lowest(value: int) -> None:
    hist = histogram_of([value])
    assert hist.count == 1
    assert hist.min_us() == LOWEST_US
    assert hist.max_us() == LOWEST_US
    assert hist.percentile_us(50.0) == LOWEST_US


@pytest.mark.parametrize("value", [HIGHEST_US, HIGHEST_US + 1, 10**15])
def test_huge_values_clamped_to_highest(value: int) -> None:
    hist = histogram_of([value, 10])
    assert hist.count == 2
    assert close(hist.max_us(), HIGHEST_US)
    assert close(hist.percentile_us(100.0), HIGHEST_US)
    assert hist.min_us() == 10


def test_empty_histogram_returns_zeros() -> None:
    hist = LatencyHistogram()
    assert hist.count == 0
    assert hist.max_us() == 0 and hist.min_us() == 0
    for p in PERCENTILES:
        assert hist.percentile_us(p) == 0
    assert hist.summary_ms() == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "p999": 0.0, "max": 0.0}
    back = LatencyHistogram.decode(hist.encode())
    assert back.count == 0 and back.summary_ms() == hist.summary_ms()
