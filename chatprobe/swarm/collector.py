"""The master side of a swarm: one ledger fed by every worker's batches, a time series, and
the generator's health (pure: batches and times in, summary out).

Workers send what they saw, never conclusions: sends (from the customer's worker) and receipts
(from whichever worker runs the receiving agent) meet here, so a message whose customer and
agent live in different processes is matched like any other. Clock assumption: all workers
share the host's monotonic clock (one machine, `--processes`); batches say which host they
come from, and a run spanning several hosts is reported with its clock caveat.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from chatprobe.histogram import LatencyHistogram
from chatprobe.ledger import Ledger, MessageRecord, Outcome, stamp_fields
from chatprobe.stamp import StampCodec
from chatprobe.verdict import (
    CPU_LIMIT_PERCENT,
    LATE_SEND_LIMIT_SHARE,
    LATE_SEND_US,
    LOOP_LAG_LIMIT_US,
    RunSummary,
)

EXAMPLES_SHOWN = 20  # of each: lost, late
# `chatprobe swarm` names a file here and creates it when SIGINT or SIGTERM stops the run
# (before it asks Locust to quit), so the master's summary is marked partial.
STOP_FILE_ENV = "CHATPROBE_SWARM_STOP_FILE"
INTERRUPTED = ("interrupted before every message had its outcome; the results are "
               "partial")


def stop_requested() -> bool:
    """Whether the run was stopped by a signal (see STOP_FILE_ENV)."""
    path = os.environ.get(STOP_FILE_ENV)
    return path is not None and path != "" and os.path.exists(path)


@dataclass
class Bin:
    users: int = 0
    sent: int = 0
    delivered: int = 0
    late: int = 0
    lost: int = 0
    # A live histogram takes ~200 KB (1 µs..1 h at 3 digits); a bin that can no longer
    # change keeps it compressed instead (a few hundred bytes), so long runs stay flat.
    live: LatencyHistogram | None = field(default_factory=LatencyHistogram)
    sealed: str = ""

    @property
    def latency(self) -> LatencyHistogram:
        if self.live is None:
            self.live = LatencyHistogram.decode(self.sealed)  # a straggler: open it again
            self.sealed = ""
        return self.live

    def seal(self) -> None:
        if self.live is not None:
            self.sealed, self.live = self.live.encode(), None

    def histogram(self) -> LatencyHistogram:
        """The bin's latencies, without reopening a sealed bin."""
        return self.live if self.live is not None else LatencyHistogram.decode(self.sealed)


@dataclass
class WorkerHealth:
    host: str = ""
    cpu_max: float = 0.0
    cpu_high_samples: int = 0
    samples: int = 0
    loop_lag_max_us: int = 0
    late_sends: int = 0
    sends: int = 0
    send_lag_max_us: int = 0
    clock: str = ""
    agents: list[str] = field(default_factory=list)  # the probe agents it logged in
    engine: str = ""  # "compiled" (chatprobe/swarm/_fastref.c) or "python"


# A batch's records lie end to end in flat lists, this many items each:
SEND_FIELDS = 6  # sender, conversation, seq, intended_us, sent_us, kind
ACK_FIELDS = 4  # conversation, seq, ack_us, server_id
RECEIPT_FIELDS = 4  # conversation, seq, receiver, received_us


def empty_batch(worker: str, host: str) -> dict[str, Any]:
    """The batch a worker sends every flush: flat lists of scalars (no object per record
    on the worker, and msgpack carries them cheaply)."""
    return {"worker": worker, "host": host, "sends": [], "acks": [], "receipts": [],
            "forged": 0,
            "foreign": 0, "late_sends": 0, "send_lag_max_us": 0, "cpu": None,
            "loop_lag_max_us": 0, "agents": []}


def records(flat: list[Any], width: int) -> Iterator[tuple[Any, ...]]:
    """A batch's flat list back as records of ``width`` items."""
    items = iter(flat)
    return zip(*[items] * width, strict=True)


CLOCK_SAMPLES = 5  # round trips per worker before its offset is fixed for the run


@dataclass
class ClockEstimate:
    """A worker's monotonic clock against the master's: worker time - offset = master time,
    right to within ``uncertainty_us`` (half the best round trip, as NTP bounds it)."""

    offset_us: int
    uncertainty_us: int
    shared: bool  # the master's own clock (same host, same clock namespace): exact
    samples: int = 1


class Collector:
    def __init__(self, codec: StampCodec, sla_us: int, deadline_us: int, start_us: int,
                 bin_s: float = 2.0,
                 on_outcome: Callable[[MessageRecord], None] | None = None,
                 keep_raw: bool = False, clock: str | None = None) -> None:
        """``keep_raw``: also keep every latency sample (µs) so a test or an engineer can
        recompute percentiles exactly, independent of the histograms. ``clock``: the
        master's clock domain when workers run in other processes; their batches then wait
        until :meth:`clock_sample` has fixed each worker's offset, and their times are
        moved onto the master's clock. None: one process, one clock."""
        self.start_us = start_us
        self.clock = clock
        self.clocks: dict[str, ClockEstimate] = {}
        self._held: dict[str, list[dict[str, Any]]] = {}
        self.bin_us = int(bin_s * 1_000_000)
        self.bins: dict[int, Bin] = {}
        self.workers: dict[str, WorkerHealth] = {}
        self.failures: list[tuple[str, str, str | None]] = []  # (worker, what, cause)
        self._on_outcome = on_outcome
        self.raw_latencies_us: list[int] | None = [] if keep_raw else None
        self.ledger = Ledger(codec, sla_us, deadline_us, hold_early_receipts=True,
                             on_outcome=self._outcome)
        # Batches can trail by a flush interval or two; never expire what may still come.
        self.grace_us = 3_000_000
        self._pruned_until_us = start_us

    def _bin(self, time_us: int) -> Bin:
        index = max(0, (time_us - self.start_us) // self.bin_us)
        found = self.bins.get(index)
        if found is None:
            found = self.bins[index] = Bin()
        return found

    def _outcome(self, record: MessageRecord) -> None:
        if record.outcome is Outcome.LOST:
            self._bin(record.intended_us).lost += 1
        else:
            assert record.first_receipt_us is not None and record.latency_us is not None
            at = self._bin(record.first_receipt_us)
            at.latency.record_us(record.latency_us)
            if self.raw_latencies_us is not None:
                self.raw_latencies_us.append(record.latency_us)
            if record.outcome is Outcome.DELIVERED:
                at.delivered += 1
            else:
                at.late += 1
        if self._on_outcome is not None:
            self._on_outcome(record)

    def clock_sample(self, worker: str, worker_clock: str, master_sent_us: int,
                     worker_us: int, master_received_us: int) -> None:
        """One NTP-style round trip: the master sent at ``master_sent_us``, the worker read
        its clock (``worker_us``), the master got the answer at ``master_received_us``."""
        estimate = self.clocks.get(worker)
        if estimate is not None and estimate.samples >= CLOCK_SAMPLES:
            return  # fixed for the run: every batch of a worker moves by the same offset
        uncertainty = max(0, master_received_us - master_sent_us) // 2
        offset = worker_us - (master_sent_us + master_received_us) // 2
        # Same boot id and an offset the round trip cannot tell from zero: the same clock.
        shared = worker_clock == self.clock and abs(offset) <= uncertainty
        if estimate is None or uncertainty < estimate.uncertainty_us:
            samples = 1 if estimate is None else estimate.samples + 1
            estimate = ClockEstimate(offset, uncertainty, shared, samples)
            self.clocks[worker] = estimate
        else:
            estimate.samples += 1
        if estimate.shared:
            estimate.offset_us = estimate.uncertainty_us = 0
        if estimate.samples >= CLOCK_SAMPLES:
            for held in self._held.pop(worker, []):
                self.ingest(held)

    def _offset_us(self, batch: dict[str, Any]) -> int | None:
        """The shift onto the master's clock, or None while it is not known yet."""
        if self.clock is None:
            return 0
        estimate = self.clocks.get(batch["worker"])
        if estimate is None or estimate.samples < CLOCK_SAMPLES:
            return None
        return estimate.offset_us

    def ingest(self, batch: dict[str, Any]) -> None:
        offset = self._offset_us(batch)
        if offset is None:
            self._held.setdefault(batch["worker"], []).append(batch)
            return
        ledger = self.ledger
        for sender, conversation, seq, intended_us, sent_us, kind in records(
                batch["sends"], SEND_FIELDS):
            intended_us -= offset
            ledger.record_send(sender, conversation, seq, intended_us, sent_us - offset, kind)
            self._bin(intended_us).sent += 1
        for conversation, seq, ack_us, server_id in records(batch.get("acks", []),
                                                            ACK_FIELDS):
            ledger.record_ack_of(conversation, seq, server_id, ack_us - offset)
        for conversation, seq, receiver, received_us in records(batch["receipts"],
                                                                RECEIPT_FIELDS):
            ledger.record_receipt(conversation, seq, receiver, received_us - offset)
        ledger.counts.forged += batch["forged"]
        ledger.counts.foreign += batch["foreign"]
        health = self.workers.setdefault(batch["worker"], WorkerHealth(host=batch["host"]))
        health.clock = str(batch.get("clock", batch["host"]))
        health.sends += len(batch["sends"]) // SEND_FIELDS
        health.late_sends += batch["late_sends"]
        health.engine = str(batch.get("engine", ""))
        if batch.get("agents"):
            health.agents = [str(agent) for agent in batch["agents"]]
        health.send_lag_max_us = max(health.send_lag_max_us, batch["send_lag_max_us"])
        health.loop_lag_max_us = max(health.loop_lag_max_us, batch["loop_lag_max_us"])
        if batch.get("failure"):
            self.failures.append((str(batch["worker"]), str(batch["failure"]),
                                  batch.get("failure_cause")))
        cpu = batch["cpu"]
        if cpu is not None:
            health.samples += 1
            health.cpu_max = max(health.cpu_max, cpu)
            if cpu > CPU_LIMIT_PERCENT:
                health.cpu_high_samples += 1

    def sample_users(self, now_us: int, users: int) -> None:
        self._bin(now_us).users = max(self._bin(now_us).users, users)

    def expire(self, now_us: int) -> None:
        self.ledger.expire(now_us - self.grace_us)
        # Long runs: forget what can no longer change (duplicates of a message are looked
        # for during twice its deadline), so the master's memory stays flat.
        horizon = now_us - self.grace_us - 2 * self.ledger.deadline_us
        if horizon - self._pruned_until_us > 10_000_000:
            self.ledger.forget_closed_before(horizon)
            for index in range(max(0, (self._pruned_until_us - self.start_us) // self.bin_us),
                               max(0, (horizon - self.start_us) // self.bin_us)):
                old_bin = self.bins.get(index)
                if old_bin is not None:
                    old_bin.seal()
            self._pruned_until_us = horizon

    def release_held(self) -> list[str]:
        """At the end: batches of workers whose clock was never estimated go in unshifted;
        returns those workers (their latencies mix clocks, so the run is invalid)."""
        unknown = sorted(self._held)
        for worker in unknown:
            estimate = self.clocks.get(worker)
            # Fewer round trips than planned still beat none; -1 marks it as not trusted.
            self.clocks[worker] = ClockEstimate(estimate.offset_us if estimate else 0, -1,
                                                False, CLOCK_SAMPLES)
            for held in self._held.pop(worker):
                self.ingest(held)
        return unknown

    def clock_uncertainty_us(self) -> int | None:
        """How far a latency can be off because of clocks: a message's send and receipt
        may come from the two least certain workers. None when a clock is unknown."""
        if any(e.uncertainty_us < 0 for e in self.clocks.values()):
            return None
        worst = sorted((e.uncertainty_us for e in self.clocks.values()), reverse=True)
        return sum(worst[:2])

    def invalid_reasons(self) -> list[str]:
        """Why the generator's own numbers cannot be trusted (empty when they can)."""
        reasons = []
        for worker, estimate in sorted(self.clocks.items()):
            if estimate.uncertainty_us < 0:
                reasons.append(f"worker {worker}: its clock offset was never estimated; "
                               "latencies across workers mix unrelated clocks")
        clocks = {h.clock for h in self.workers.values()}
        if self.clock is None and len(clocks) > 1:
            reasons.append(f"workers on {len(clocks)} different clocks (hosts) and no "
                           "clock estimate: latencies across them mix unrelated clocks")
        for name, health in sorted(self.workers.items()):
            if health.samples and health.cpu_high_samples * 2 > health.samples:
                reasons.append(f"worker {name}: CPU above {CPU_LIMIT_PERCENT:g} % in "
                               f"{health.cpu_high_samples} of {health.samples} samples")
            if health.loop_lag_max_us > LOOP_LAG_LIMIT_US:
                reasons.append(f"worker {name}: event loop lagged "
                               f"{health.loop_lag_max_us / 1000:.0f} ms")
            if health.sends and health.late_sends > LATE_SEND_LIMIT_SHARE * health.sends:
                reasons.append(f"worker {name}: {health.late_sends} of {health.sends} sends "
                               f"more than {LATE_SEND_US // 1000} ms behind plan")
        return reasons

    def _example(self, record: MessageRecord) -> dict[str, Any]:
        """A lost or late message as evidence: which one, when in the run, who got it."""
        return {"outcome": record.outcome.value, "kind": record.kind,
                "stamp": stamp_fields(self.ledger.codec.run, record),
                "conversation": record.conversation, "seq": record.seq,
                "sender": record.sender,
                "planned_at_s": round((record.intended_us - self.start_us) / 1e6, 3),
                # Hops: accepted by the target (its id, to trace it there), then received.
                "server_id": record.server_id,
                "acked_after_ms": None if record.ack_us is None
                else (record.ack_us - record.intended_us) / 1000,
                "latency_ms": None if record.latency_us is None else record.latency_us / 1000,
                "receiver": record.receiver}

    def finish(self, summary: RunSummary) -> dict[str, Any]:
        """Close the run (everything still pending is lost) and build the JSON document.
        A run stopped by a signal is partial instead: messages still in flight stay pending
        (the run, not the target, stopped waiting for them), as in an interrupted probe."""
        self.release_held()
        if stop_requested():
            summary.partial = True
            # The cause already named (agents that could not log in, say) stays first.
            summary.harness_error = INTERRUPTED if summary.harness_error is None else (
                f"{summary.harness_error}; {INTERRUPTED}")
        else:
            self.ledger.finish()
        doc = summary.to_json()
        reasons = self.invalid_reasons()
        hosts = sorted({h.host for h in self.workers.values()})
        clocks = {h.clock for h in self.workers.values()}
        doc["valid"] = not reasons
        doc["invalid_reasons"] = reasons
        uncertainty = self.clock_uncertainty_us()
        doc["clock"] = {
            "assumption": "each worker's monotonic clock runs at the master's rate; workers "
                          "that share the master's clock are exact, the others are shifted "
                          "by an offset estimated from NTP-style round trips at the start",
            "hosts": hosts, "clock_domains": len(clocks),
            "uncertainty_ms": None if uncertainty is None else uncertainty / 1000,
            "workers": {worker: {"offset_ms": e.offset_us / 1000,
                                 "uncertainty_ms": None if e.uncertainty_us < 0
                                 else e.uncertainty_us / 1000,
                                 "shared_clock": e.shared}
                        for worker, e in sorted(self.clocks.items())}}
        doc["generator"] = {
            name: {"host": h.host, "cpu_max_percent": round(h.cpu_max, 1),
                   "loop_lag_max_ms": round(h.loop_lag_max_us / 1000, 3),
                   "late_sends": h.late_sends, "sends": h.sends,
                   "send_lag_max_ms": round(h.send_lag_max_us / 1000, 3),
                   "agents": h.agents, "engine": h.engine}
            for name, h in sorted(self.workers.items())}
        merged = LatencyHistogram()
        for time_bin in self.bins.values():
            merged.merge(time_bin.histogram())
        # The per-interval histograms merged must give the run's percentiles back exactly.
        doc["latency_ms_merged_bins"] = merged.summary_ms() | {"count": merged.count}
        doc["examples"] = [self._example(record) for record in
                           self.ledger.lost_records[:EXAMPLES_SHOWN] +
                           self.ledger.late_records[:EXAMPLES_SHOWN]]
        bin_s = self.bin_us / 1_000_000
        doc["timeseries"] = [
            {"t_s": round(index * bin_s, 3), "users": b.users,
             "sends_per_s": round(b.sent / bin_s, 3),
             "delivered_per_s": round((b.delivered + b.late) / bin_s, 3),
             "p50_ms": (h := b.histogram().summary_ms())["p50"], "p99_ms": h["p99"],
             "late": b.late, "lost": b.lost}
            for index, b in sorted(self.bins.items())]
        return doc
