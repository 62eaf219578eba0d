"""End-to-end probe runs against the real reference service on loopback (issue 2 acceptance).

Measured numbers are checked against the service's own ground-truth counters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from chatprobe.probe import ProbeHooks, ProbeOptions, run_probe
from chatprobe.verdict import RunSummary, Status, render_table
from tests.conftest import ServiceProcess, scaled


def probe(service: ServiceProcess, messages: int, customers: int, rate: float = 1000.0,
          hooks: ProbeHooks | None = None, **config_changes: object) -> RunSummary:
    config = service.target_config(**config_changes)
    options = ProbeOptions(messages=messages, customers=customers, rate_per_s=rate)
    return asyncio.run(asyncio.wait_for(run_probe(service.base_url, config, options, hooks),
                                        timeout=scaled(120)))


def test_clean_run_2000_messages_from_20_customers(reference_service: ServiceProcess) -> None:
    summary = probe(reference_service, 2000, 20, rate=2000.0)
    doc = summary.to_json()
    assert doc["sent"] == 2000
    assert doc["delivered"] == 2000
    for key in ("late", "lost", "duplicate", "reordered", "misrouted", "forged", "unknown"):
        assert doc[key] == 0, key
    assert doc["availability"] == 1.0
    assert doc["latency_ms"]["count"] == 2000
    assert summary.status() is Status.OK
    stats = reference_service.stats()
    assert stats["accepted"] == 2000
    assert stats["pushed"] == 2000


def test_a_stall_of_the_probes_own_loop_shows_in_its_generator_numbers(
        reference_service: ServiceProcess) -> None:
    """Rule 8 of measurement.md: the harness watches itself. A probe whose loop is blocked
    (here for 250 ms after its 20th send, the fault this test injects) reports the stall
    and the sends it made late, apart from what it measured of the target."""
    async def stall_once(count: int) -> None:
        if count == 20:
            time.sleep(0.25)  # blocks the probe's own loop: the injected fault

    summary = probe(reference_service, 100, 5, rate=1000.0,
                    hooks=ProbeHooks(after_send=stall_once))
    doc = summary.to_json()
    generator = doc["generator"]["probe"]
    assert generator["sends"] == 100
    # Lower bounds: a busy machine only adds to them.
    assert generator["loop_lag_max_ms"] >= 100, generator
    assert generator["late_sends"] >= 1 and generator["send_lag_max_ms"] >= 200, generator
    assert "generator probe: " in render_table(doc)


def test_lateness_of_the_probes_own_making_is_unknown_and_the_targets_is_a_warning(
        reference_service: ServiceProcess) -> None:
    """Harness faults are never reported as the product's (measurement.md, exit codes). A
    probe whose own loop is blocked for 1.5 s after its 20th send (the injected fault) finds
    its messages late by about that much against a 1 s SLA: it cannot tell that from the
    target, so it says UNKNOWN (exit 3), not WARNING. The same lateness made by the target
    (a 1.5 s push delay, the probe's loop free) is a WARNING."""
    async def stall_once(count: int) -> None:
        if count == 20:
            time.sleep(1.5)  # blocks the probe's own loop: the injected fault

    stalled = probe(reference_service, 100, 5, rate=1000.0,
                    hooks=ProbeHooks(after_send=stall_once), sla_ms=1000.0)
    doc = stalled.to_json()
    assert doc["late"] > 0 and doc["lost"] == 0, doc
    assert stalled.status() is Status.UNKNOWN and doc["exit_code"] == 3, doc["generator"]
    assert doc["valid"] is False and "may be its own delay" in doc["invalid_reasons"][0]

    reference_service.ok("POST", "/admin/faults", {"delay_ms": 1500})
    slow = probe(reference_service, 100, 5, rate=1000.0, sla_ms=1000.0)
    doc = slow.to_json()
    assert doc["late"] == 100 and doc["valid"] is True, (doc["generator"],
                                                         doc["invalid_reasons"])
    assert slow.status() is Status.WARNING


def test_a_probe_interrupted_while_it_listens_on_keeps_its_complete_counts(
        reference_service: ServiceProcess) -> None:
    """A probe that sent late listens on after the deadlines, to see whether its lost
    messages still arrive (the verdict's own-delay rule). Interrupted then, as SIGINT and
    SIGTERM interrupt it (cli._interruptible cancels its task), it keeps the counts it has,
    all of them final, and says which question was left open. The service drops every
    message; the probe's loop is blocked for 1.5 s after its first send, so the other nine
    leave 1.5 s late and it has seconds to listen on."""
    reference_service.ok("POST", "/admin/faults", {"drop": 1.0})
    progress: list[str] = []
    listened_for: list[int] = []

    async def stall_once(count: int) -> None:
        if count == 1:
            time.sleep(1.5)  # blocks the probe's own loop: the injected fault

    async def interrupt(unseen: int) -> None:
        listened_for.append(unseen)
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # lands at the probe's next wait: while it listens on

    config = reference_service.target_config(sla_ms=1000.0, deadline_ms=2000.0)
    options = ProbeOptions(messages=10, customers=2, rate_per_s=1000.0,
                           progress=progress.append)
    hooks = ProbeHooks(after_send=stall_once, lingering=interrupt)
    summary = asyncio.run(asyncio.wait_for(
        run_probe(reference_service.base_url, config, options, hooks), timeout=scaled(60)))
    assert listened_for == [10]
    assert any(line.startswith("listening on") for line in progress), progress
    doc = summary.to_json()
    assert doc["partial"] is True and doc["status"] == "UNKNOWN", doc
    assert "listening on" in doc["harness_error"] and "counts are complete" in (
        doc["harness_error"])
    assert "RUN PARTIAL: interrupted while listening on" in render_table(doc)
    # The stall came before the first send yielded: the lag watcher saw it all the same.
    assert doc["generator"]["probe"]["loop_lag_max_ms"] >= 1400, doc["generator"]
    assert doc["sent"] == doc["lost"] == reference_service.stats()["dropped"] == 10
    assert doc["pending"] == 0


def test_loss_duplicates_and_reordering_equal_service_counters(
        reference_service: ServiceProcess) -> None:
    reference_service.ok("POST", "/admin/faults",
                         {"drop": 0.01, "duplicate": 0.005, "reorder": 0.01, "seed": 20261124})
    summary = probe(reference_service, 2000, 20, rate=1000.0)
    stats = reference_service.stats()
    # The faults must really have fired, or equality below proves nothing.
    assert stats["dropped"] > 5 and stats["duplicated"] > 2 and stats["reordered"] > 5, stats
    assert summary.counts.lost == stats["dropped"]
    assert summary.counts.duplicate == stats["duplicated"]
    assert summary.counts.reordered == stats["reordered"]
    assert summary.counts.sent == summary.counts.delivered + summary.counts.late + \
        summary.counts.lost
    causes = {d.cause.value for outcome, d in summary.diagnoses if outcome == "lost"}
    assert causes == {"push.lost"}
    assert summary.status() is Status.CRITICAL


def test_injected_push_delay_of_200_ms_measures_p50_between_200_and_210(
        reference_service: ServiceProcess) -> None:
    reference_service.ok("POST", "/admin/faults", {"delay_ms": 200})
    summary = probe(reference_service, 500, 10, rate=500.0)
    assert summary.counts.delivered == 500
    p50_ms = summary.latency.percentile_us(50.0) / 1000.0
    assert 200.0 <= p50_ms <= 210.0, p50_ms
    assert reference_service.stats()["delayed"] == 500


def test_restart_mid_probe_loses_no_acked_message_and_creates_no_false_counts(
        reference_service: ServiceProcess) -> None:
    restarted = asyncio.Event()

    async def crash_and_restart(sent: int) -> None:
        if sent == 1000:
            reference_service.kill()
            await asyncio.to_thread(reference_service.start)
            restarted.set()

    hooks = ProbeHooks(after_send=crash_and_restart)
    summary = probe(reference_service, 2000, 20, rate=1000.0, hooks=hooks,
                    sla_ms=10000.0, deadline_ms=20000.0, reconnect_window_s=scaled(30))
    assert restarted.is_set()
    counts = summary.counts
    assert counts.sent == 2000
    assert counts.lost == 0
    assert counts.duplicate == 0
    assert counts.reordered == 0
    assert counts.delivered + counts.late == 2000
    assert summary.events["agent resumed"] >= 2
    # The restarted service holds every message exactly once (client ids deduplicated).
    rows = _message_count(reference_service)
    assert rows == 2000


def _message_count(service: ServiceProcess) -> int:
    import sqlite3

    with sqlite3.connect(service.db) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM messages WHERE direction='in'").fetchone()
    return int(count)


def test_probe_over_several_channels_reports_per_message_outcomes(
        reference_service: ServiceProcess) -> None:
    summary = probe(reference_service, 60, 6, channels=("web", "app", "mini_program"))
    assert summary.counts.delivered == 60
    assert summary.events["conversation assigned"] == 6


def test_probe_result_is_independent_of_other_runs_on_the_same_target(
        reference_service: ServiceProcess) -> None:
    first = probe(reference_service, 100, 5)
    second = probe(reference_service, 100, 5)
    assert first.run != second.run
    assert first.counts.delivered == second.counts.delivered == 100
    assert dataclasses.asdict(second.counts)["foreign"] == 0
