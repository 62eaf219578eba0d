"""Verdicts: from ledger counts, latencies and diagnoses to a status and a summary (pure).

Exit codes follow the monitoring convention (measurement.md): 0 OK, 1 WARNING (late,
duplicates, reordering, slow p99), 2 CRITICAL (loss, misrouting, forgery, no delivery, a
broken target), 3 UNKNOWN (the harness could not run, or could not tell its own delay from
the target's).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from chatprobe.diagnosis import Diagnosis
from chatprobe.histogram import LatencyHistogram
from chatprobe.ledger import LedgerCounts


class Status(IntEnum):
    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


# Several verdicts as one (profiles, checks): a proven CRITICAL outranks an UNKNOWN, which
# outranks a WARNING; the exit codes' order is not this one.
SEVERITY = {Status.OK: 0, Status.WARNING: 1, Status.UNKNOWN: 2, Status.CRITICAL: 3}


def worst(statuses: Iterable[Status]) -> Status:
    return max(statuses, key=SEVERITY.__getitem__, default=Status.OK)


def document_status(doc: dict[str, Any]) -> Status:
    """A --json document's status as its exit code gives it: a run the generator made
    invalid is UNKNOWN, unless it never got going for a reason of the target's (a refused
    login, an unreachable target: a verdict whatever the generator's state), or a message
    came back altered or (where counted: probes, not swarms) reached the wrong receiver,
    which no generator delay can cause (CRITICAL). Loss, lateness, duplicates and
    reordering stay UNKNOWN: a starved generator can be dropped as a slow consumer, and its
    resends after the drop can duplicate or reorder."""
    status = Status[str(doc["status"])]
    if doc.get("valid", True) or any(
            row.get("outcome") == "run" for row in doc.get("diagnoses", [])):
        return status
    if status is Status.CRITICAL and (doc.get("misrouted") or doc.get("forged")):
        return status
    return Status.UNKNOWN


# When the generator's own numbers cannot be trusted (a swarm's and a probe's alike). Sends
# later than this behind their intended time mean the generator fell behind its plan:
LATE_SEND_US = 50_000
CPU_LIMIT_PERCENT = 90.0
LOOP_LAG_LIMIT_US = 100_000
LATE_SEND_LIMIT_SHARE = 0.01


@dataclass
class RunSummary:
    """Everything a probe run reports; ``to_json`` is the --json document."""

    run: str
    target: str
    counts: LedgerCounts
    latency: LatencyHistogram
    sla_ms: float
    deadline_ms: float
    p99_warning_ms: float | None = None  # a p99 above this is a WARNING (target config)
    diagnoses: list[tuple[str, Diagnosis]] = field(default_factory=list)  # (outcome, diag)
    fatal: Diagnosis | None = None
    events: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)
    duration_s: float = 0.0
    harness_error: str | None = None
    # Stopped (SIGINT/SIGTERM) before it was done: before every message had its outcome, or
    # while it listened on or explained its losses (harness_error says which).
    partial: bool = False
    # What the generator measured of itself, by process (a probe's; a swarm's collector
    # writes its workers' into the document itself).
    generator: dict[str, Any] | None = None
    # What tells a probe's own delay from the target's (None: not watched; a swarm's
    # collector judges its workers itself): the most the probe may have held back a
    # receipt's timestamp (its worst loop lag plus its lag timer's grain), the most it sent a
    # message after its plan, and each late and lost message's latency counted from its
    # actual send (None: a lost message that never turned up).
    receipt_delay_us: int | None = None
    send_lag_max_us: int = 0
    late_from_send_us: list[int] = field(default_factory=list)
    lost_from_send_us: list[int | None] = field(default_factory=list)

    def status(self) -> Status:
        return self._verdict()[0]

    def _verdict(self) -> tuple[Status, list[str], str | None]:
        """The status; why it is UNKNOWN if the probe's own delay may be why (measurement.md,
        rule 8: a harness fault is never reported as the product's); and a note when that
        delay explains only the loss. A message's own-delay share is the time it was
        sent after its plan plus the most a receipt was held back; what is left of its
        latency is the target's. One message late or lost beyond its share makes the verdict
        stand, and so does anything a delay cannot cause (duplicates, reordering,
        misrouting, forgery) or evidence that is not complete."""
        status = self._status_of_target()
        held = self.receipt_delay_us
        if held is None or status in (Status.OK, Status.UNKNOWN) or self.fatal is not None:
            return status, [], None
        counts = self.counts
        sla_us, deadline_us = self.sla_ms * 1000, self.deadline_ms * 1000
        late_evidence = len(self.late_from_send_us) == counts.late
        # A lost message that took the target longer than the SLA was late at least.
        warning_stands = bool(counts.duplicate or counts.reordered or (
            counts.late and (not late_evidence or any(
                latency - held > sla_us for latency in self.late_from_send_us))) or any(
            latency is not None and latency - held > sla_us
            for latency in self.lost_from_send_us))
        limit = self.p99_warning_ms
        if limit is not None and self.latency.count and (
                self.latency.percentile_us(99.0) - self.send_lag_max_us - held
                > limit * 1000):
            warning_stands = True
        own = (f"the probe sent up to {self.send_lag_max_us / 1000:g} ms after its plan and "
               f"its loop may have held receipts back up to {held / 1000:g} ms")
        if status is Status.WARNING:
            if warning_stands:
                return status, [], None
            return Status.UNKNOWN, [f"{own}, which explains every late message and a slow "
                                    "p99: its WARNING may be its own delay, not the target's"], None
        if counts.misrouted or counts.forged or not counts.lost or (
                len(self.lost_from_send_us) != counts.lost) or any(
                latency is None or latency - held > deadline_us
                for latency in self.lost_from_send_us):
            return status, [], None
        loss = (f"its {counts.lost} lost messages all turned up, within what that explains "
                "of their deadline")
        if warning_stands:
            return Status.WARNING, [], f"{own}; {loss}: the loss may be its own"
        return Status.UNKNOWN, [f"{own}; {loss}: its CRITICAL may be its own delay, not the "
                                "target's"], None

    def _status_of_target(self) -> Status:
        if self.harness_error is not None:
            return Status.UNKNOWN
        counts = self.counts
        if self.fatal is not None:
            return Status.CRITICAL
        if counts.sent and counts.delivered + counts.late == 0:
            return Status.CRITICAL
        if counts.lost or counts.misrouted or counts.forged:
            return Status.CRITICAL
        if counts.late or counts.duplicate or counts.reordered:
            return Status.WARNING
        limit = self.p99_warning_ms
        if limit is not None and self.latency.count and (
                self.latency.percentile_us(99.0) / 1000.0 > limit):
            return Status.WARNING
        return Status.OK

    def diagnosis_table(self) -> list[dict[str, Any]]:
        grouped: Counter[tuple[str, str]] = Counter()
        details: dict[tuple[str, str], str] = {}
        for outcome, diagnosis in self.diagnoses:
            key = (outcome, diagnosis.cause.value)
            grouped[key] += 1
            details.setdefault(key, diagnosis.line())
        rows = [{"outcome": outcome, "cause": cause, "count": count,
                 "explanation": details[(outcome, cause)]}
                for (outcome, cause), count in grouped.most_common()]
        if self.fatal is not None:
            rows.insert(0, {"outcome": "run", "cause": self.fatal.cause.value, "count": 1,
                            "explanation": self.fatal.line()})
        return rows

    def to_json(self) -> dict[str, Any]:
        counts = self.counts
        status, reasons, note = self._verdict()
        own_delay: dict[str, Any] = {} if self.receipt_delay_us is None else {
            "valid": not reasons, "invalid_reasons": reasons, "own_delay_note": note}
        return {
            "run": self.run,
            "target": self.target,
            "status": status.name,
            "exit_code": int(status),
            "sent": counts.sent,
            "delivered": counts.delivered,
            "late": counts.late,
            "lost": counts.lost,
            "duplicate": counts.duplicate,
            "reordered": counts.reordered,
            "misrouted": counts.misrouted,
            "forged": counts.forged,
            "foreign": counts.foreign,
            "unknown": counts.unknown,
            "received_after_deadline": counts.received_after_deadline,
            "availability": counts.availability,
            "availability_formula": "delivered_within_sla / (delivered + late + lost)",
            "sla_ms": self.sla_ms,
            "deadline_ms": self.deadline_ms,
            "p99_warning_ms": self.p99_warning_ms,
            "latency_ms": self.latency.summary_ms() | {"count": self.latency.count},
            "latency_histogram": self.latency.encode(),
            "diagnoses": self.diagnosis_table(),
            "events": dict(self.events),
            "examples": self.examples,
            "duration_s": round(self.duration_s, 3),
            "harness_error": self.harness_error,
            "partial": self.partial,
            "pending": counts.pending,
        } | ({"generator": self.generator} if self.generator is not None else {}) | own_delay


def _latency_line(lat: dict[str, Any], clock_uncertainty_ms: float | None) -> str:
    # Never more digits than the clocks can vouch for (workers on other hosts): at most µs.
    decimals = 3
    if clock_uncertainty_ms:
        decimals = max(0, min(3, -math.floor(math.log10(clock_uncertainty_ms))))
    line = "  latency ms  " + "".join(
        f" {name} {lat[key]:.{decimals}f} " for name, key in (
            ("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p99.9", "p999"), ("max", "max")))
    line += f" (n={lat['count']})"
    if clock_uncertainty_ms:
        line += f"  clock uncertainty +/- {clock_uncertainty_ms:.{decimals}f} ms"
    return line


def render_table(doc: dict[str, Any]) -> str:
    """The human summary printed at the end of a probe."""
    lat = doc["latency_ms"]
    avail = doc["availability"]
    if doc["sent"] == 0 and doc["diagnoses"]:
        # Nothing was sent: the counters say nothing, the diagnosis says everything.
        head = f"chatprobe run {doc['run']} against {doc['target']}: {doc['status']}"
        return "\n".join([head] + [f"  {row['explanation']}" for row in doc["diagnoses"]])
    lines = [
        f"chatprobe run {doc['run']} against {doc['target']}: {doc['status']}",
        "",
        f"  {'sent':<12}{doc['sent']:>8}   {'duplicate':<12}{doc['duplicate']:>8}",
        f"  {'delivered':<12}{doc['delivered']:>8}   {'reordered':<12}{doc['reordered']:>8}",
        f"  {'late':<12}{doc['late']:>8}   {'misrouted':<12}{doc['misrouted']:>8}",
        f"  {'lost':<12}{doc['lost']:>8}   {'forged':<12}{doc['forged']:>8}",
        f"  availability {('n/a' if avail is None else f'{avail * 100:.3f} %')}"
        f" (within SLA {doc['sla_ms']:g} ms; lost after {doc['deadline_ms']:g} ms)",
        _latency_line(lat, (doc.get("clock") or {}).get("uncertainty_ms")),
    ]
    p99_warning_ms = doc.get("p99_warning_ms")
    if p99_warning_ms is not None and lat["count"] and lat["p99"] > p99_warning_ms:
        lines.append(f"  p99 {lat['p99']:g} ms is above the {p99_warning_ms:g} ms threshold "
                     "(p99_warning_ms)")
    if doc["diagnoses"]:
        lines.append("")
        lines.append("  diagnosis:")
        for row in doc["diagnoses"]:
            lines.append(f"    {row['outcome']:<9}{row['count']:>6}  {row['explanation']}")
    if doc["events"]:
        events = ", ".join(f"{k} {v}" for k, v in sorted(doc["events"].items()))
        lines.append(f"  connection events: {events}")
    for name, generator in sorted((doc.get("generator") or {}).items()):
        if generator.get("late_sends"):
            lines.append(f"  generator {name}: {generator['late_sends']} of "
                         f"{generator['sends']} sends left more than {LATE_SEND_US // 1000} ms "
                         f"after their plan (their latency counts from the plan)")
    if doc.get("own_delay_note"):
        lines.append(f"  note: {doc['own_delay_note']}")
    if doc.get("partial"):
        if doc.get("pending", 0):
            lines.append(f"  RUN PARTIAL: stopped before every message had its outcome; "
                         f"{doc['pending']} still pending (neither delivered nor lost)")
        else:  # stopped later: every count is final, something else was left undone
            lines.append(f"  RUN PARTIAL: {doc.get('harness_error') or 'stopped early'}")
    if doc.get("valid") is False:
        lines.append("  RUN INVALID: these numbers describe the harness (its load "
                     "generator or its clocks), not the target:")
        lines.extend(f"    {reason}" for reason in doc.get("invalid_reasons", []))
    return "\n".join(lines)
