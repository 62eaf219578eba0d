"""Swarms (issue 4): real Locust (local and --processes 2) against the real reference service.

Ground truth is the service's own counters; shapes are checked in Locust's own history CSV.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hdrh.histogram import HdrHistogram

from chatprobe.histogram import LatencyHistogram
from chatprobe.swarm.runner import SwarmOptions, run_swarm
from chatprobe.swarm.shapes import load_shape
from tests.conftest import ServiceProcess, scaled


def shape_file(folder: Path, stages: Sequence[tuple[float, int, float]]) -> Path:
    path = folder / "test-shape.yaml"
    lines = ["name: test-shape", "stages:"] + [
        f"  - {{duration: {d}, users: {u}, spawn_rate: {r}}}" for d, u, r in stages]
    path.write_text("\n".join(lines) + "\n")
    return path


def swarm(service: ServiceProcess, shape: Path, **changes: Any) -> dict[str, Any]:
    options = SwarmOptions(target=service.base_url, shape=str(shape), think_scale=0.1,
                           admin_token=service.admin_token, sla_ms=2000.0, deadline_ms=3000.0)
    for key, value in changes.items():
        setattr(options, key, value)
    return run_swarm(options, timeout_s=scaled(240))


@pytest.mark.parametrize("engine", ["auto", "python"])
def test_two_worker_swarm_with_faults_equals_service_counters(
        reference_service: ServiceProcess, tmp_path: Path, engine: str) -> None:
    reference_service.ok("POST", "/admin/faults",
                         {"drop": 0.01, "duplicate": 0.005, "seed": 4})
    doc = swarm(reference_service, shape_file(tmp_path, [(8, 20, 20)]), workers=2,
                engine=engine)
    # auto: the compiled engine drives the reference protocol over ws://.
    assert {g["engine"] for g in doc["generator"].values()} == {
        "compiled" if engine == "auto" else "python"}
    stats = reference_service.stats()
    # Customer messages (faults apply) plus the probe agents' replies (no faults).
    assert doc["sent"] == stats["accepted"] + stats["replies"]
    assert stats["accepted"] > 500
    assert stats["dropped"] > 2 and stats["duplicated"] > 0, stats
    assert doc["lost"] == stats["dropped"]
    assert doc["duplicate"] == stats["duplicated"]
    assert doc["sent"] == doc["delivered"] + doc["late"] + doc["lost"]
    assert doc["unknown"] == 0 and doc["forged"] == 0
    # Each lost message is shown as evidence: which conversation, which step, when.
    lost_examples = [e for e in doc["examples"] if e["outcome"] == "lost"]
    assert len(lost_examples) == min(doc["lost"], 20)
    assert all(e["kind"] and e["planned_at_s"] >= 0 for e in lost_examples)
    # The service accepted each one (its id is there to trace it) and dropped it on the push.
    assert all(e["server_id"] and e["acked_after_ms"] >= 0 for e in lost_examples)
    for example in lost_examples[:3]:
        trace = reference_service.ok("GET", f"/admin/messages/{example['server_id']}")
        assert "drop" in json.dumps(trace), trace
    # Both workers sent, and each ran one of the two probe agents: a message's customer and
    # the agent that confirmed it were in different processes about half the time.
    assert set(doc["generator"]) == {"w0", "w1"}
    assert all(g["sends"] > 0 for g in doc["generator"].values())
    assert [g["agents"] for _, g in sorted(doc["generator"].items())] == [["probe-1"],
                                                                          ["probe-2"]]


def test_merged_percentiles_equal_those_of_all_raw_samples(
        reference_service: ServiceProcess, tmp_path: Path) -> None:
    raw_path = tmp_path / "raw.txt"
    doc = swarm(reference_service, shape_file(tmp_path, [(6, 15, 15)]), workers=2,
                extra_locust_args=("--cp-raw-latencies", str(raw_path)))
    samples = sorted(int(line) for line in raw_path.read_text().split())
    assert len(samples) == doc["delivered"] + doc["late"] == doc["latency_ms"]["count"]
    assert samples[0] >= 0  # nothing is sent before its planned time
    precision = HdrHistogram(1, 3_600_000_000, 3)
    for name, percentile in (("p50", 50.0), ("p99", 99.0)):
        # The exact percentile of the raw samples, ranked as HdrHistogram ranks (rank =
        # round(p/100 * n), at least 1), against the summary: equal to histogram precision,
        # i.e. inside the exact value's bucket.
        rank = max(1, int(percentile * len(samples) / 100 + 0.5))
        exact_us = samples[rank - 1]
        reported_us = round(doc["latency_ms"][name] * 1000)
        low = precision.get_lowest_equivalent_value(exact_us)
        high = precision.get_highest_equivalent_value(exact_us)
        assert low <= reported_us <= high, (name, exact_us, reported_us, low, high)
        assert doc["latency_ms_merged_bins"][name] == doc["latency_ms"][name]
    hist = LatencyHistogram()
    for value in samples:
        hist.record_us(value)
    assert hist.summary_ms() == {k: v for k, v in doc["latency_ms"].items() if k != "count"}


def test_users_over_time_follow_the_shape_file(reference_service: ServiceProcess,
                                              tmp_path: Path) -> None:
    stages = [(6, 4, 50), (6, 12, 50), (6, 2, 50)]
    path = shape_file(tmp_path, stages)
    prefix = tmp_path / "locust"
    swarm(reference_service, path, csv_prefix=str(prefix))
    shape = load_shape(str(path))
    with open(f"{prefix}_stats_history.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["Name"] == "Aggregated"]
    start = int(rows[0]["Timestamp"])
    checked = 0
    for row in rows:
        elapsed = int(row["Timestamp"]) - start
        # Away from stage edges (Locust samples once a second and spawns at the given rate):
        if any(abs(elapsed - edge) <= 1.5 for edge in (0, 6, 12, 18)):
            continue
        expected = shape.at(elapsed)
        assert expected is not None or int(row["User Count"]) == 0
        if expected is not None:
            assert int(row["User Count"]) == expected[0], (elapsed, row["User Count"])
            checked += 1
    assert checked >= 6


@pytest.mark.skipif(os.cpu_count() == 1, reason="needs a core to pin the generator to")
def test_generator_starved_of_cpu_marks_the_run_invalid(reference_service: ServiceProcess,
                                                        tmp_path: Path) -> None:
    # Pin the swarm and four busy loops to one core: the generator cannot keep its plan.
    # The plan (~100 users x 5 messages every ~0.3 s) needs far more than the fifth of a
    # core left to the generator, whatever the machine's speed. All of them at the lowest
    # priority: they starve each other, never the suite's other tests on that core.
    low = ("taskset", "-c", "0", "nice", "-n", "19")
    burners = [subprocess.Popen([*low, sys.executable, "-c",
                                 "import time\nend = time.time() + 120\n"
                                 "while time.time() < end: pass"]) for _ in range(4)]
    try:
        doc = swarm(reference_service, shape_file(tmp_path, [(8, 100, 100)]),
                    think_scale=0.005, command_prefix=low)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert doc["valid"] is False, doc["generator"]
    assert doc["invalid_reasons"]
    # Late replies may be refused (the customer left); that is reported, never left unread.
    assert not [e for e in doc["connection_events"] if "unhandled" in e or "Locust wrote" in e]


def test_customers_whose_connection_drops_mid_conversation_lose_nothing(
        reference_service: ServiceProcess, tmp_path: Path) -> None:
    doc = swarm(reference_service, shape_file(tmp_path, [(6, 15, 15)]),
                extra_locust_args=("--cp-reconnect-share", "1"))
    stats = reference_service.stats()
    drops = [e for e in doc["connection_events"] if "dropped its connection" in e]
    assert drops, doc["connection_events"]
    assert any("resumed" in e for e in doc["connection_events"])
    assert doc["sent"] == stats["accepted"] + stats["replies"] == doc["delivered"] + doc["late"]
    assert doc["lost"] == 0 and doc["duplicate"] == 0 and doc["reordered"] == 0


def test_agent_replies_are_measured_on_the_way_back_to_the_customer(
        reference_service: ServiceProcess, tmp_path: Path) -> None:
    doc = swarm(reference_service, shape_file(tmp_path, [(6, 10, 10)]), workers=2)
    stats = reference_service.stats()
    # shopper.yaml: 3 of 5 steps expect a reply, answered by the probe agents on worker 0
    # and received by customers on both workers.
    customer_messages = stats["accepted"]
    assert stats["replies"] > 0
    assert doc["sent"] == customer_messages + stats["replies"]
    assert doc["delivered"] + doc["late"] == doc["sent"], doc["connection_events"]
    assert doc["lost"] == 0 and doc["misrouted"] == 0


def test_a_swarm_whose_p99_is_above_its_threshold_is_a_warning(
        reference_service: ServiceProcess, tmp_path: Path) -> None:
    """--p99-warning-ms reaches the master through Locust's options: every push held 300 ms
    by the service (its counter says so), nothing late against the 2 s SLA, and still a
    WARNING, because p99 is above 100 ms."""
    reference_service.ok("POST", "/admin/faults", {"delay_ms": 300})
    doc = swarm(reference_service, shape_file(tmp_path, [(4, 5, 5)]), p99_warning_ms=100.0)
    assert reference_service.stats()["delayed"] > 0
    assert doc["late"] == doc["lost"] == 0 and doc["latency_ms"]["p99"] > 300, doc
    assert doc["p99_warning_ms"] == 100.0 and doc["status"] == "WARNING", doc["status"]


def test_swarm_whose_agents_cannot_log_in_is_critical_not_ok(
        reference_service: ServiceProcess, tmp_path: Path) -> None:
    config = tmp_path / "target.yaml"
    config.write_text("agents:\n  - {id: probe-1, token: stolen}\n")
    doc = swarm(reference_service, shape_file(tmp_path, [(3, 3, 3)]), config=config)
    assert doc["status"] == "CRITICAL"
    assert doc["diagnoses"][0]["outcome"] == "run"
    assert doc["diagnoses"][0]["cause"] == "auth.rejected"


def _time_namespaces_work() -> bool:
    try:
        return subprocess.run(["unshare", "--fork", "--time", "--monotonic", "1", "true"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _time_namespaces_work(), reason="needs root and time namespaces")
@pytest.mark.alone
def test_a_worker_on_another_clock_is_measured_through_its_estimated_offset(
        reference_service: ServiceProcess, tmp_path: Path) -> None:
    # Two workers the way separate hosts run them (`locust --worker`), one in its own time
    # namespace: its monotonic clock is 5,000 s ahead, as a second machine's would differ.
    # Without the offset every message between the two workers would be off by 5,000 s.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    json_path = tmp_path / "summary.json"
    options = SwarmOptions(target=reference_service.base_url,
                           shape=str(shape_file(tmp_path, [(6, 20, 20)])), think_scale=0.1,
                           admin_token=reference_service.admin_token, deadline_ms=3000.0)
    master = [*options.locust_command(json_path), "--master", "--expect-workers", "2",
              "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port)]
    worker = [sys.executable, "-m", "locust", "-f", master[master.index("-f") + 1],
              "--worker", "--master-host", "127.0.0.1", "--master-port", str(port),
              "--loglevel", "WARNING"]
    procs = [subprocess.Popen(master, stdin=subprocess.DEVNULL),
             subprocess.Popen(worker, stdin=subprocess.DEVNULL),
             subprocess.Popen(["unshare", "--fork", "--time", "--monotonic", "5000", *worker],
                              stdin=subprocess.DEVNULL)]
    try:
        for proc in procs:
            proc.wait(timeout=scaled(240))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    doc = json.loads(json_path.read_text())
    clocks = doc["clock"]["workers"]
    shifted = [w for w, c in clocks.items() if not c["shared_clock"]]
    assert len(clocks) == 2 and len(shifted) == 1, clocks
    estimate = clocks[shifted[0]]
    assert abs(estimate["offset_ms"] - 5_000_000) <= estimate["uncertainty_ms"] + 1
    assert 0 < doc["clock"]["uncertainty_ms"] < 500  # loopback round trips, even on a busy host
    stats = reference_service.stats()
    assert doc["sent"] == stats["accepted"] + stats["replies"] == doc["delivered"] + doc["late"]
    assert doc["lost"] == 0 and doc["valid"] is True, doc["invalid_reasons"]
    # Loopback latencies, not thousands of seconds either way.
    assert 0 <= doc["latency_ms"]["p50"] <= doc["latency_ms"]["max"] < 3000
    assert all(g["sends"] > 0 for g in doc["generator"].values())
