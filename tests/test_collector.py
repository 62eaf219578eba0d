"""The swarm master's collector: batches in, one ledger, time series and generator health."""

from __future__ import annotations

from typing import Any

from chatprobe.histogram import LatencyHistogram
from chatprobe.ledger import LedgerCounts
from chatprobe.stamp import StampCodec
from chatprobe.swarm.collector import Collector, empty_batch
from chatprobe.verdict import RunSummary

SECOND = 1_000_000


def collector() -> Collector:
    return Collector(StampCodec(run="run1", secret=b"collector-secret"), sla_us=SECOND,
                     deadline_us=3 * SECOND, start_us=0)


def batch(worker: str = "w0", clock: str = "boot-a", **fields: Any) -> dict[str, Any]:
    data = empty_batch(worker, "host") | {"clock": clock}
    data.update(fields)
    return data


def summary_of(c: Collector) -> dict[str, Any]:
    ledger = c.ledger
    return c.finish(RunSummary("run1", "t", ledger.counts, ledger.latency, 1000, 3000))


def test_sends_and_receipts_from_different_workers_meet_in_one_ledger() -> None:
    c = collector()
    # Worker 0 runs the agents and reports the receipt before worker 1 reports the send.
    c.ingest(batch("w0", receipts=[["w1u1", 1, "probe-1", 1_050_000]]))
    c.ingest(batch("w1", sends=[["w1u1", "w1u1", 1, 1_000_000, 1_000_100, "greeting"]]))
    doc = summary_of(c)
    assert (doc["sent"], doc["delivered"], doc["lost"], doc["unknown"]) == (1, 1, 0, 0)
    assert abs(doc["latency_ms"]["p50"] - 50.0) <= 0.05  # HdrHistogram: 3 significant digits
    assert doc["valid"] is True and doc["clock"]["clock_domains"] == 1


def test_unmatched_sends_are_lost_at_finish_and_binned_by_plan() -> None:
    c = collector()
    c.ingest(batch(sends=[["c", "c", 1, 2 * SECOND, 2 * SECOND, "greeting"]]))
    doc = summary_of(c)
    assert doc["lost"] == 1
    assert [row["lost"] for row in doc["timeseries"]] == [1]
    assert doc["timeseries"][0]["t_s"] == 2.0


def test_generator_health_makes_a_run_invalid() -> None:
    c = collector()
    sends = [["c", "c", i, i * 1000, i * 1000, "k"] for i in range(1, 101)]
    c.ingest(batch(sends=sends, late_sends=5, cpu=95.0, loop_lag_max_us=150_000))
    reasons = c.invalid_reasons()
    assert any("CPU" in r for r in reasons)
    assert any("lagged" in r for r in reasons)
    assert any("behind plan" in r for r in reasons)


def test_workers_on_two_clocks_are_reported() -> None:
    c = collector()
    c.ingest(batch("w0", clock="boot-a"))
    c.ingest(batch("w1", clock="boot-b"))
    doc = summary_of(c)
    assert doc["valid"] is False and doc["clock"]["uncertainty_ms"] is None


def test_worker_failures_are_kept_for_the_verdict() -> None:
    c = collector()
    c.ingest(batch(failure="agent login failed", failure_cause="auth.rejected"))
    assert c.failures == [("w0", "agent login failed", "auth.rejected")]


def test_per_interval_histograms_merge_to_the_run_histogram() -> None:
    c = collector()
    sends, receipts = [], []
    for i in range(1, 200):
        intended = i * 50_000
        sends.append(["c", "c", i, intended, intended, "k"])
        receipts.append(["c", i, "a", intended + 1000 + (i * 7919) % 400_000])
    c.ingest(batch(sends=sends, receipts=receipts))
    doc = summary_of(c)
    merged = {k: v for k, v in doc["latency_ms_merged_bins"].items() if k != "count"}
    assert merged == {k: v for k, v in doc["latency_ms"].items() if k != "count"}
    assert len(doc["timeseries"]) > 3


def test_long_runs_forget_closed_records_but_keep_counts() -> None:
    c = collector()
    c.ingest(batch(sends=[["c", "c", 1, 0, 0, "k"]], receipts=[["c", 1, "a", 1000]]))
    before = LedgerCounts(**vars(c.ledger.counts))
    c.expire(60 * SECOND)
    assert c.ledger.counts == before
    assert not c.ledger._closed
    assert isinstance(c.ledger.latency, LatencyHistogram) and c.ledger.latency.count == 1
