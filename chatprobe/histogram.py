"""Latency histograms: HdrHistogram at microsecond resolution, mergeable across processes.

Pure code. Values are microseconds; the range covers 1 µs to 1 hour with 3 significant
digits, so a percentile is exact to 0.1 % of its value. ``encode``/``decode`` carry a histogram
between processes (Locust workers, xdist workers) with no loss: merging then asking for a
percentile gives the percentile of the union of the raw samples.
"""

from __future__ import annotations

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 3_600_000_000
SIGNIFICANT_DIGITS = 3
REPORTED_PERCENTILES = (50.0, 90.0, 99.0, 99.9)


class LatencyHistogram:
    """An HdrHistogram of latencies in microseconds."""

    __slots__ = ("_hist",)

    def __init__(self) -> None:
        self._hist = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)

    def record_us(self, value_us: int) -> None:
        # Clamp rather than fail: a 0 µs or >1 h sample is still a sample.
        if value_us < LOWEST_US:
            value_us = LOWEST_US
        elif value_us > HIGHEST_US:
            value_us = HIGHEST_US
        self._hist.record_value(value_us)

    @property
    def count(self) -> int:
        return int(self._hist.get_total_count())

    def percentile_us(self, percentile: float) -> int:
        return int(self._hist.get_value_at_percentile(percentile)) if self.count else 0

    def max_us(self) -> int:
        return int(self._hist.get_max_value()) if self.count else 0

    def min_us(self) -> int:
        return int(self._hist.get_min_value()) if self.count else 0

    def merge(self, other: LatencyHistogram) -> None:
        self._hist.add(other._hist)

    def encode(self) -> str:
        """Compressed, base64 text form (HdrHistogram's standard V2 encoding)."""
        raw = self._hist.encode()
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    @classmethod
    def decode(cls, encoded: str) -> LatencyHistogram:
        hist = cls()
        if encoded:
            hist._hist.decode_and_add(encoded)
        return hist

    def summary_ms(self) -> dict[str, float]:
        """p50/p90/p99/p999/max in milliseconds, rounded to the histogram's precision."""
        names = ("p50", "p90", "p99", "p999")
        out = {n: _ms(self.percentile_us(p)) for n, p in zip(names, REPORTED_PERCENTILES,
                                                             strict=True)}
        out["max"] = _ms(self.max_us())
        return out


def _ms(value_us: int) -> float:
    return round(value_us / 1000.0, 3)
