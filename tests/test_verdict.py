"""Verdicts: status per situation, the --json document's keys, and the human table."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

from chatprobe.diagnosis import Cause, Diagnosis
from chatprobe.histogram import LatencyHistogram
from chatprobe.ledger import LedgerCounts
from chatprobe.verdict import (
    RunSummary,
    Status,
    document_status,
    render_table,
    worst,
)


def latency(*values_us: int) -> LatencyHistogram:
    hist = LatencyHistogram()
    for value in values_us:
        hist.record_us(value)
    return hist


def summary(counts: LedgerCounts | None = None, hist: LatencyHistogram | None = None,
            **changes: Any) -> RunSummary:
    counts = counts or LedgerCounts(sent=10, delivered=10)
    if hist is None:
        hist = latency(*([2000] * (counts.delivered + counts.late)))
    return RunSummary(run="r1", target="ws://example.invalid", counts=counts, latency=hist,
                      sla_ms=3000.0, deadline_ms=10000.0, **changes)


def test_ok() -> None:
    assert summary().status() is Status.OK
    assert summary(p99_warning_ms=None).status() is Status.OK
    assert summary(p99_warning_ms=5.0).status() is Status.OK


def test_exit_codes() -> None:
    assert [int(s) for s in (Status.OK, Status.WARNING, Status.CRITICAL, Status.UNKNOWN)] == [
        0, 1, 2, 3]


@pytest.mark.parametrize("counts", [
    LedgerCounts(sent=10, delivered=9, late=1),
    LedgerCounts(sent=10, delivered=10, duplicate=1),
    LedgerCounts(sent=10, delivered=10, reordered=1),
    LedgerCounts(sent=10, late=10),  # late, but delivered: not "no delivery"
], ids=["late", "duplicate", "reordered", "all-late"])
def test_warning(counts: LedgerCounts) -> None:
    assert summary(counts).status() is Status.WARNING


def test_warning_for_p99_over_threshold() -> None:
    s = summary(hist=latency(*([2000] * 100)))
    assert replace(s, p99_warning_ms=1.5).status() is Status.WARNING
    assert replace(s, p99_warning_ms=2.5).status() is Status.OK
    assert replace(s, p99_warning_ms=None).status() is Status.OK
    assert s.status() is Status.OK


def test_p99_threshold_looks_at_p99_not_max() -> None:
    s = summary(hist=latency(*([1000] * 999 + [60_000])))
    assert replace(s, p99_warning_ms=2.0).status() is Status.OK
    assert replace(s, p99_warning_ms=0.5).status() is Status.WARNING


def test_p99_threshold_ignored_without_samples() -> None:
    s = summary(LedgerCounts(), hist=LatencyHistogram())
    assert replace(s, p99_warning_ms=0.001).status() is Status.OK


@pytest.mark.parametrize("counts", [
    LedgerCounts(sent=10, delivered=9, lost=1),
    LedgerCounts(sent=10, delivered=10, misrouted=1),
    LedgerCounts(sent=10, delivered=10, forged=1),
    LedgerCounts(sent=10, pending=10),  # nothing delivered at all
    LedgerCounts(sent=10, delivered=9, lost=1, late=0, duplicate=3, reordered=2),
], ids=["lost", "misrouted", "forged", "no-delivery", "lost-beats-warnings"])
def test_critical(counts: LedgerCounts) -> None:
    assert summary(counts).status() is Status.CRITICAL


def test_critical_for_fatal_diagnosis() -> None:
    s = summary(fatal=Diagnosis(Cause.AUTH_REJECTED, "bad token"))
    assert s.status() is Status.CRITICAL
    rows = s.diagnosis_table()
    assert rows[0]["outcome"] == "run" and rows[0]["cause"] == "auth.rejected"


def test_unknown_for_harness_error_beats_everything() -> None:
    s = summary(LedgerCounts(sent=10, lost=10), harness_error="config unreadable",
                fatal=Diagnosis(Cause.TRANSPORT))
    assert s.status() is Status.UNKNOWN
    doc = s.to_json()
    assert doc["status"] == "UNKNOWN" and doc["exit_code"] == 3
    assert doc["harness_error"] == "config unreadable"


def test_to_json_keys_and_values() -> None:
    counts = LedgerCounts(sent=10, delivered=6, late=1, lost=2, pending=1, duplicate=3,
                          reordered=4, misrouted=5, forged=6)
    hist = latency(1000, 2000, 3000, 4000, 5000, 6000, 40_000)
    s = summary(counts, hist, diagnoses=[("lost", Diagnosis(Cause.PUSH_LOST)),
                                         ("lost", Diagnosis(Cause.PUSH_LOST)),
                                         ("late", Diagnosis(Cause.SLOW))],
                events=Counter({"reconnect": 2}))
    doc = s.to_json()
    for key, value in (("sent", 10), ("delivered", 6), ("late", 1), ("lost", 2),
                       ("duplicate", 3), ("reordered", 4), ("misrouted", 5), ("forged", 6)):
        assert doc[key] == value, key
    assert doc["availability"] == pytest.approx(6 / 9)
    assert doc["status"] == "CRITICAL" and doc["exit_code"] == 2
    lat = doc["latency_ms"]
    assert {"p50", "p90", "p99", "p999", "max"} <= set(lat)
    assert lat["count"] == 7
    assert lat["p50"] == pytest.approx(4.0, rel=1e-3)
    assert lat["max"] == pytest.approx(40.0, rel=1e-3)
    assert LatencyHistogram.decode(doc["latency_histogram"]).count == 7
    assert doc["diagnoses"][0] == {"outcome": "lost", "cause": "push.lost", "count": 2,
                                   "explanation": Diagnosis(Cause.PUSH_LOST).line()}
    assert doc["events"] == {"reconnect": 2}
    json.dumps(doc)  # the --json document must serialise


def test_to_json_availability_none_without_closed_messages() -> None:
    doc = summary(LedgerCounts(), hist=LatencyHistogram()).to_json()
    assert doc["availability"] is None
    assert doc["latency_ms"]["p99"] == 0.0


def test_to_json_status_uses_thresholds() -> None:
    s = summary(hist=latency(*([2000] * 100)))
    assert replace(s, p99_warning_ms=1.0).to_json()["status"] == "WARNING"
    assert s.to_json()["status"] == "OK"


@pytest.mark.parametrize("counts, status", [
    (LedgerCounts(sent=10, delivered=10), "OK"),
    (LedgerCounts(sent=10, delivered=9, late=1), "WARNING"),
    (LedgerCounts(sent=10, delivered=9, lost=1), "CRITICAL"),
])
def test_render_table_mentions_status(counts: LedgerCounts, status: str) -> None:
    text = render_table(summary(counts).to_json())
    first = text.splitlines()[0]
    assert status in first and "r1" in first
    assert "availability" in text and "p99" in text


def test_render_table_mentions_unknown_and_diagnoses() -> None:
    s = summary(LedgerCounts(), hist=LatencyHistogram(), harness_error="boom",
                diagnoses=[("lost", Diagnosis(Cause.PRESENCE, "probe-1"))])
    text = render_table(s.to_json())
    assert "UNKNOWN" in text.splitlines()[0]
    assert Diagnosis(Cause.PRESENCE, "probe-1").line() in text


def test_render_table_lists_diagnoses_and_events() -> None:
    s = summary(LedgerCounts(sent=10, delivered=9, lost=1),
                diagnoses=[("lost", Diagnosis(Cause.PUSH_STALLED))],
                events=Counter({"disconnect": 1}))
    text = render_table(s.to_json())
    assert "CRITICAL" in text
    assert Diagnosis(Cause.PUSH_STALLED).line() in text
    assert "disconnect 1" in text
    assert "n/a" not in text  # availability is known


# -- rule 8: a probe's own delay is never reported as the target's ----------------------------
# summary() judges with SLA 3,000 ms and deadline 10,000 ms. Latencies below are counted from
# each message's actual send; the probe's receipts may have been held back receipt_delay_us.


def test_late_messages_the_probes_own_delay_could_explain_make_the_verdict_unknown() -> None:
    late = LedgerCounts(sent=10, delivered=8, late=2)
    stalled = summary(late, receipt_delay_us=400_000, late_from_send_us=[3_300_000, 3_100_000])
    assert stalled.status() is Status.UNKNOWN
    doc = stalled.to_json()
    assert doc["status"] == "UNKNOWN" and doc["exit_code"] == 3 and doc["valid"] is False
    assert "400 ms" in doc["invalid_reasons"][0] and "WARNING" in doc["invalid_reasons"][0]
    assert "RUN INVALID" in render_table(doc)
    # One message later than the SLA plus all the probe could have added: it stands.
    assert summary(late, receipt_delay_us=400_000,
                   late_from_send_us=[3_500_000, 3_100_000]).status() is Status.WARNING


def test_a_message_sent_late_and_received_late_counts_both_delays_as_the_probes() -> None:
    """Sent 600 ms after its plan by a stalled probe, then its receipt held back by another
    stall: its 3.7 s from the plan are 3.1 s from the send, of which up to 620 ms may be the
    probe's again. The target's share is under the SLA: not a WARNING."""
    late = LedgerCounts(sent=10, delivered=9, late=1)
    both = summary(late, receipt_delay_us=620_000, send_lag_max_us=600_000,
                   late_from_send_us=[3_100_000])
    assert both.status() is Status.UNKNOWN


def test_a_probe_that_held_nothing_back_keeps_its_verdict_and_says_it_is_valid() -> None:
    late = LedgerCounts(sent=10, delivered=9, late=1)
    doc = summary(late, receipt_delay_us=20_000, late_from_send_us=[3_100_000]).to_json()
    assert doc["status"] == "WARNING" and doc["valid"] is True and doc["invalid_reasons"] == []
    # A swarm's summary carries no own delay (its collector judges its workers): no keys.
    assert "valid" not in summary(late).to_json()


def test_lost_messages_that_turned_up_within_the_probes_own_delay_are_not_a_verdict() -> None:
    """Lost because the probe sent them seconds late: from their actual send they took the
    target 2.5 s, within the SLA. Neither the loss nor any lateness is the target's."""
    lost = LedgerCounts(sent=10, delivered=8, lost=2)
    assert summary(lost, receipt_delay_us=300_000, send_lag_max_us=8_000_000,
                   lost_from_send_us=[2_500_000, 2_600_000]).status() is Status.UNKNOWN
    # One never arrived at all, or arrived later than the delay can explain: loss stands.
    assert summary(lost, receipt_delay_us=300_000,
                   lost_from_send_us=[2_500_000, None]).status() is Status.CRITICAL
    assert summary(lost, receipt_delay_us=300_000,
                   lost_from_send_us=[2_500_000, 10_400_000]).status() is Status.CRITICAL
    # Evidence that is not complete (fewer records than lost messages): the loss stands.
    assert summary(lost, receipt_delay_us=300_000,
                   lost_from_send_us=[2_500_000]).status() is Status.CRITICAL
    # Turned up 10.1 s after its send: the loss may be the probe's, 9.8 s of lateness is not.
    assert summary(lost, receipt_delay_us=300_000,
                   lost_from_send_us=[10_100_000, 10_250_000]).status() is Status.WARNING


def test_a_loss_the_probe_could_have_made_leaves_a_real_warning_standing_with_a_note() -> None:
    counts = LedgerCounts(sent=100, delivered=49, late=50, lost=1)
    mixed = summary(counts, receipt_delay_us=300_000, lost_from_send_us=[10_100_000],
                    late_from_send_us=[8_000_000] * 50)
    doc = mixed.to_json()
    assert doc["status"] == "WARNING" and doc["valid"] is True, doc["invalid_reasons"]
    assert "the loss may be its own" in doc["own_delay_note"]
    assert "note: " in render_table(doc)
    duplicated = LedgerCounts(sent=10, delivered=9, lost=1, duplicate=1)
    assert summary(duplicated, receipt_delay_us=300_000,
                   lost_from_send_us=[10_100_000]).status() is Status.WARNING


def test_what_a_delay_cannot_cause_stands_whatever_the_probes_delay() -> None:
    huge = 60_000_000
    assert summary(LedgerCounts(sent=10, delivered=10, duplicate=1),
                   receipt_delay_us=huge).status() is Status.WARNING
    assert summary(LedgerCounts(sent=10, delivered=10, misrouted=1),
                   receipt_delay_us=huge).status() is Status.CRITICAL
    assert summary(receipt_delay_us=huge).status() is Status.OK  # delays only slow things


def test_a_p99_threshold_crossed_only_by_the_probes_own_delay_is_unknown() -> None:
    slow = latency(*([2000] * 9), 9_000)  # p99 9 ms, counted from the plan
    assert summary(hist=slow, receipt_delay_us=3_000, send_lag_max_us=2_000,
                   p99_warning_ms=5.0).status() is Status.UNKNOWN
    assert summary(hist=slow, receipt_delay_us=2_000,
                   p99_warning_ms=5.0).status() is Status.WARNING


def test_several_verdicts_as_one_rank_a_proven_critical_above_an_unknown() -> None:
    from chatprobe.netem.session import combine

    assert worst([Status.UNKNOWN, Status.CRITICAL, Status.WARNING]) is Status.CRITICAL
    assert worst([Status.WARNING, Status.UNKNOWN]) is Status.UNKNOWN
    assert worst([]) is Status.OK
    # Profiles: a lossy profile's proven CRITICAL beside a clean one the probe could not
    # judge (its own stall) is CRITICAL, exit 2, not UNKNOWN.
    documents = [{"status": "UNKNOWN", "exit_code": 3, "target": "t"},
                 {"status": "CRITICAL", "exit_code": 2, "target": "t"}]
    assert combine(documents)["exit_code"] == 2


def test_a_lost_message_the_target_held_beyond_the_sla_keeps_at_least_a_warning() -> None:
    """Lost only because the probe sent it 9 s late, but the target still took 4 s of it
    (more than the 3 s SLA): the loss may be the probe's, the lateness is not."""
    lost = LedgerCounts(sent=10, delivered=9, lost=1)
    doc = summary(lost, receipt_delay_us=30_000, send_lag_max_us=9_000_000,
                  lost_from_send_us=[4_000_000]).to_json()
    assert doc["status"] == "WARNING" and doc["valid"] is True and doc["own_delay_note"]


def test_an_invalid_swarm_run_is_unknown_unless_it_saw_what_no_generator_delay_can_cause(
) -> None:
    invalid = {"status": "CRITICAL", "valid": False, "diagnoses": [], "lost": 3}
    assert document_status(invalid) is Status.UNKNOWN  # a starved generator may be dropped
    assert document_status(invalid | {"duplicate": 2, "reordered": 1}) is Status.UNKNOWN
    assert document_status(invalid | {"misrouted": 1}) is Status.CRITICAL
    assert document_status(invalid | {"forged": 1}) is Status.CRITICAL
    refused = invalid | {"diagnoses": [{"outcome": "run", "cause": "auth.rejected"}]}
    assert document_status(refused) is Status.CRITICAL
    assert document_status({"status": "WARNING", "valid": False, "diagnoses": [],
                            "late": 5}) is Status.UNKNOWN
    assert document_status(invalid | {"valid": True}) is Status.CRITICAL


def test_combined_profiles_report_the_status_their_exit_code_gives() -> None:
    """An invalid swarm document keeps its own status (its generator could not judge it):
    combined with a clean profile, the JSON says UNKNOWN, as the exit code does."""
    from chatprobe.netem.session import combine

    invalid = {"status": "CRITICAL", "exit_code": 2, "valid": False, "target": "t",
               "diagnoses": []}
    clean = {"status": "OK", "exit_code": 0, "valid": True, "target": "t", "diagnoses": []}
    assert document_status(invalid) is Status.UNKNOWN
    combined = combine([invalid, clean])
    assert (combined["status"], combined["exit_code"], combined["valid"]) == ("UNKNOWN", 3,
                                                                                False)
