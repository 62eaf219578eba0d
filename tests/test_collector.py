"""The swarm master's collector: batches in, one ledger, time series and generator health."""

from __future__ import annotations

from typing import Any

from chatprobe.histogram import LatencyHistogram
from chatprobe.ledger import LedgerCounts
from chatprobe.stamp import StampCodec
from chatprobe.swarm.collector import CLOCK_SAMPLES, Collector, empty_batch
from chatprobe.verdict import RunSummary, render_table

SECOND = 1_000_000


def collector(clock: str | None = None) -> Collector:
    return Collector(StampCodec(run="run1", secret=b"collector-secret"), sla_us=SECOND,
                     deadline_us=3 * SECOND, start_us=0, clock=clock)


def round_trips(c: Collector, worker: str, clock: str, offset_us: int,
                trips_us: list[int]) -> None:
    """NTP-style samples from a worker whose clock is ``offset_us`` ahead of the master's;
    each answer is read on the worker's clock halfway (or anywhere) through the trip."""
    master = 10 * SECOND
    for trip in trips_us:
        c.clock_sample(worker, clock, master, master + trip // 3 + offset_us, master + trip)
        master += SECOND


def batch(worker: str = "w0", clock: str = "boot-a", **fields: Any) -> dict[str, Any]:
    """A worker's batch; sends, acks and receipts given as records are laid end to end."""
    data = empty_batch(worker, "host") | {"clock": clock}
    for key, value in fields.items():
        data[key] = [item for record in value for item in record] if key in (
            "sends", "acks", "receipts") else value
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


def test_workers_on_two_clocks_without_estimates_are_reported() -> None:
    c = collector()
    c.ingest(batch("w0", clock="boot-a"))
    c.ingest(batch("w1", clock="boot-b"))
    doc = summary_of(c)
    assert doc["valid"] is False
    assert any("different clocks" in r for r in doc["invalid_reasons"])


def test_a_worker_on_another_clock_is_moved_onto_the_masters_by_its_estimated_offset() -> None:
    c = collector(clock="boot-a")
    # w1 runs the customers on a clock 5,000 s ahead; w0 shares the master's clock.
    c.ingest(batch("w1", clock="boot-b",
                   sends=[["w1c1-1", "w1c1-1", 1, 5_000 * SECOND + 2 * SECOND,
                           5_000 * SECOND + 2 * SECOND, "greeting"]]))
    c.ingest(batch("w0", clock="boot-a", receipts=[["w1c1-1", 1, "agent", 2 * SECOND + 40_000]]))
    assert c.ledger.counts.sent == 0  # held: neither offset is known yet
    round_trips(c, "w0", "boot-a", 0, [400] * CLOCK_SAMPLES)
    round_trips(c, "w1", "boot-b", 5_000 * SECOND, [900, 600, 2_000, 700, 800])
    doc = summary_of(c)
    assert (doc["sent"], doc["delivered"], doc["lost"]) == (1, 1, 0)
    # The best round trip (600 µs) bounds the offset to +/- 300 µs; the true latency is
    # 40 ms, and the estimate is within that bound.
    assert abs(doc["latency_ms"]["p50"] - 40.0) <= 0.3 + 0.05
    assert doc["clock"]["workers"]["w0"] == {"offset_ms": 0.0, "uncertainty_ms": 0.0,
                                             "shared_clock": True}
    assert doc["clock"]["workers"]["w1"]["shared_clock"] is False
    assert doc["clock"]["workers"]["w1"]["uncertainty_ms"] == 0.3
    assert doc["clock"]["uncertainty_ms"] == 0.3
    assert doc["valid"] is True
    # The table shows no more digits than the clocks vouch for.
    assert " p50 40.0 " in render_table(doc) or " p50 39.9 " in render_table(doc)
    assert "clock uncertainty +/- 0.3 ms" in render_table(doc)


def test_same_boot_id_but_a_shifted_clock_is_not_taken_for_the_masters() -> None:
    # A worker in another time namespace (or container) on the same kernel.
    c = collector(clock="boot-a")
    round_trips(c, "w1", "boot-a", 3 * SECOND, [500] * CLOCK_SAMPLES)
    assert c.clocks["w1"].shared is False and c.clocks["w1"].offset_us != 0


def test_a_worker_that_never_answers_the_clock_is_counted_but_invalid() -> None:
    c = collector(clock="boot-a")
    c.ingest(batch("w1", clock="boot-b", sends=[["c", "c", 1, SECOND, SECOND, "k"]]))
    doc = summary_of(c)
    assert doc["sent"] == 1  # held batches are not lost at the end
    assert doc["valid"] is False and doc["clock"]["uncertainty_ms"] is None
    assert any("never estimated" in r for r in doc["invalid_reasons"])


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


def test_a_lost_message_keeps_its_ack_as_evidence() -> None:
    c = collector()
    c.ingest(batch(sends=[["c", "c", 1, SECOND, SECOND, "greeting"],
                          ["c", "c", 2, SECOND, SECOND, "question"]],
                   acks=[["c", 1, SECOND + 2_000, "m-41"], ["unknown", 9, SECOND, "m-0"]]))
    doc = summary_of(c)
    by_seq = {e["seq"]: e for e in doc["examples"]}
    assert by_seq[1]["server_id"] == "m-41" and by_seq[1]["acked_after_ms"] == 2.0
    assert by_seq[2]["server_id"] is None  # never accepted: the target has no trace of it
    assert doc["lost"] == 2 and doc["sent"] == 2


def test_bins_that_can_no_longer_change_are_kept_compressed() -> None:
    c = collector()
    sends, receipts = [], []
    for i in range(1, 601):  # one message every 100 ms for a minute
        intended = i * 100_000
        sends.append(["c", "c", i, intended, intended, "k"])
        receipts.append(["c", i, "a", intended + 2_000 + (i * 7919) % 50_000])
    c.ingest(batch(sends=sends, receipts=receipts))
    live_before = sum(b.live is not None for b in c.bins.values())
    c.expire(120 * SECOND)
    sealed = [b for b in c.bins.values() if b.live is None]
    assert live_before == len(c.bins) > 20 and len(sealed) > 20
    assert all(len(b.sealed) < 5_000 for b in sealed)  # vs ~200 KB for a live histogram
    doc = summary_of(c)
    merged = {k: v for k, v in doc["latency_ms_merged_bins"].items() if k != "count"}
    assert merged == {k: v for k, v in doc["latency_ms"].items() if k != "count"}
    assert all(row["p50_ms"] > 0 for row in doc["timeseries"] if row["late"] == 0)
    # A straggler for a sealed bin reopens it rather than being lost.
    sealed[0].latency.record_us(1_000)
    assert sealed[0].live is not None and sealed[0].sealed == ""
