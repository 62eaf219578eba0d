"""`chatprobe canary` end to end against the real reference service (and a server that hangs):
exit codes, status line, diagnoses, time budget, the run lock, history and config errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from chatprobe.canary.checks import SYNTHETIC_MARK
from chatprobe.canary.config import load_canary
from chatprobe.canary.history import HistoryStore, render_history
from chatprobe.canary.model import CanaryRun, CheckResult
from chatprobe.errors import HarnessError
from chatprobe.verdict import Status
from tests.conftest import ROOT, ServiceProcess, scaled, stop_process

TARGET_CONFIG = ROOT / "fixtures" / "targets" / "reference.yaml"
ADMIN_ENV = "CHATPROBE_TEST_CANARY_ADMIN"


def write_config(folder: Path, url: str, **changes: Any) -> Path:
    """A canary config for tests: short thresholds and idle period, its own state files."""
    document: dict[str, Any] = {
        "budget_s": 30,
        "thresholds": {"warning_ms": 1000, "critical_ms": 2000},
        "idle_s": 0.2,
        "history": str(folder / "history.sqlite3"),
        "targets": [{"name": "shop", "url": url, "config": str(TARGET_CONFIG),
                     "admin_token_env": ADMIN_ENV}],
    }
    document.update(changes)
    path = folder / "canary.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def canary(config: Path, *args: str, admin_token: str | None = None,
           timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if admin_token is not None:
        env[ADMIN_ENV] = admin_token
    return subprocess.run([sys.executable, "-m", "chatprobe.cli", "canary", "--config",
                           str(config), *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=scaled(timeout_s), stdin=subprocess.DEVNULL)


def checks_of(json_path: Path) -> dict[str, dict[str, Any]]:
    document = json.loads(json_path.read_text(encoding="utf-8"))
    return {check["check"]: check for check in document["checks"]}


def test_a_healthy_target_passes_every_check_with_one_status_line(
        reference_service: ServiceProcess, tmp_path: Path) -> None:
    config = write_config(tmp_path, reference_service.base_url)
    started = time.monotonic()
    result = canary(config, "--json", str(tmp_path / "run.json"),
                    admin_token=reference_service.admin_token)
    wall_s = time.monotonic() - started
    print(f"healthy canary run: {wall_s:.2f} s wall time (8 checks, 2 agents)")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("CHATPROBE CANARY OK - 8/8 checks OK")
    checks = checks_of(tmp_path / "run.json")
    assert sorted(checks) == sorted(load_canary(config).check_ids())
    assert {c["status"] for c in checks.values()} == {"OK"}
    assert all(c["latency_ms"] is not None for c in checks.values())
    store = HistoryStore(tmp_path / "history.sqlite3")
    try:
        assert store.run_count() == 1
    finally:
        store.close()


def test_canary_messages_are_marked_synthetic_and_their_conversations_closed(
        reference_service: ServiceProcess, tmp_path: Path) -> None:
    config = write_config(tmp_path, reference_service.base_url)
    assert canary(config, admin_token=reference_service.admin_token).returncode == 0
    db = reference_service.db
    import sqlite3

    with sqlite3.connect(db) as connection:
        texts = [row[0] for row in connection.execute("SELECT text FROM messages")]
        states = {row[0] for row in connection.execute("SELECT state FROM conversations")}
    assert texts and all(SYNTHETIC_MARK in text for text in texts)
    assert states == {"closed"}


AdminCall = tuple[str, str, dict[str, Any]]
FAILURES: dict[str, tuple[list[AdminCall], str]] = {
    # name: (admin calls that break the shop, the cause the canary must name)
    "agent offline": ([("PATCH", "/admin/shops/demo/agents/probe-1",
                        {"presence": "offline"})], "presence.not_online"),
    "permission removed": ([("PATCH", "/admin/shops/demo/agents/probe-1",
                             {"receive_messages": False})], "permission.receive_off"),
    "filtered keyword": ([("PATCH", "/admin/shops/demo",
                           {"filters": [{"keyword": "synthetic test message",
                                         "action": "block"}]})], "filter.blocked"),
    "push paused": ([("POST", "/admin/faults", {"pause_push": True})], "push.stalled"),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_each_platform_failure_is_critical_with_its_diagnosis(
        reference_service: ServiceProcess, tmp_path: Path, failure: str) -> None:
    calls, cause = FAILURES[failure]
    for method, path, body in calls:
        reference_service.ok(method, path, body)
    config = write_config(tmp_path, reference_service.base_url)
    result = canary(config, "--json", str(tmp_path / "run.json"),
                    admin_token=reference_service.admin_token)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout.startswith("CHATPROBE CANARY CRITICAL - ")
    assert cause in result.stdout
    checks = checks_of(tmp_path / "run.json")
    receive = checks["shop/probe-1/web/receive"]
    assert (receive["status"], receive["cause"]) == ("CRITICAL", cause)
    if failure in ("agent offline", "permission removed"):
        # The other sub-account is fine: the check names the broken one, not the shop.
        assert checks["shop/probe-2/web/receive"]["status"] == "OK"


def test_a_service_that_is_down_is_critical_and_named(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    config = write_config(tmp_path, f"http://127.0.0.1:{port}")
    result = canary(config, "--json", str(tmp_path / "run.json"))
    assert result.returncode == 2, result.stdout + result.stderr
    checks = checks_of(tmp_path / "run.json")
    assert {c["cause"] for c in checks.values()} == {"transport.unreachable"}
    assert "transport.unreachable" in result.stdout


@pytest.fixture
def hanging_server() -> Iterator[int]:
    """Accepts connections and never says a word (a wedged service behind its port)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(scaled(5))
        for connection in held:
            connection.close()
        server.close()


def test_a_hanging_service_is_critical_within_the_budget(hanging_server: int,
                                                          tmp_path: Path) -> None:
    budget_s = 20.0
    config = write_config(tmp_path, f"http://127.0.0.1:{hanging_server}", budget_s=budget_s)
    started = time.monotonic()
    result = canary(config, "--json", str(tmp_path / "run.json"))
    wall_s = time.monotonic() - started
    print(f"hanging target: canary ended after {wall_s:.1f} s (budget {budget_s:g} s)")
    assert result.returncode == 2, result.stdout + result.stderr
    checks = checks_of(tmp_path / "run.json")
    assert {c["cause"] for c in checks.values()} == {"transport.unreachable"}
    assert "hangs" in checks["shop/probe-1/web/receive"]["detail"]
    # The budget is the canary's own promise (the suite is killed at it), not a guess
    # about this machine's speed.
    document = json.loads((tmp_path / "run.json").read_text())
    assert document["duration_s"] < budget_s


def test_a_budget_too_short_for_the_checks_is_unknown_not_critical(
        reference_service: ServiceProcess, tmp_path: Path) -> None:
    # Two agents each idle 3 s cannot fit into 4 s (minus the reserve): the checks that
    # did not run are UNKNOWN (a harness limit), and nothing claims the target failed.
    config = write_config(tmp_path, reference_service.base_url, budget_s=4, idle_s=3)
    result = canary(config, "--json", str(tmp_path / "run.json"))
    assert result.returncode == 3, result.stdout + result.stderr
    statuses = {c["status"] for c in checks_of(tmp_path / "run.json").values()}
    assert "UNKNOWN" in statuses and "CRITICAL" not in statuses


def test_a_second_run_while_one_is_running_exits_3_at_once(hanging_server: int,
                                                            tmp_path: Path) -> None:
    config = write_config(tmp_path, f"http://127.0.0.1:{hanging_server}", budget_s=15)
    lock = tmp_path / "history.sqlite3.lock"
    first = subprocess.Popen([sys.executable, "-m", "chatprobe.cli", "canary", "--config",
                              str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + scaled(20)
        # The first run holds the lock once it has written its pid there.
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.02)
        second = canary(config)
        assert first.poll() is None, "the second run waited for the first"
        assert second.returncode == 3
        assert second.stdout.splitlines() == [
            f"CHATPROBE CANARY UNKNOWN - another canary run is in progress (pid {first.pid} "
            f"holds {lock}); this one did not start"]
    finally:
        stop_process(first, timeout=30)


@pytest.mark.parametrize("content, message", [
    ("targets: []\n", "'targets' must be a non-empty list"),
    ("targets: [{name: a, url: ftp://x}]\n", "'url' must be an http(s):// or ws(s):// URL"),
    ("targets: [{name: a, url: 'http://127.0.0.1:1', checks: [ping]}]\n",
     "unknown check(s) ping"),
    ("budget_s: -1\ntargets: [{name: a, url: 'http://127.0.0.1:1'}]\n",
     "'budget_s' must be a number"),
    ("bogus: 1\ntargets: [{name: a, url: 'http://127.0.0.1:1'}]\n", "unknown field(s) bogus"),
])
def test_a_bad_config_is_unknown_in_one_line(tmp_path: Path, content: str,
                                             message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content, encoding="utf-8")
    result = canary(path)
    assert result.returncode == 3
    assert len(result.stdout.splitlines()) == 1
    assert result.stdout.startswith("CHATPROBE CANARY UNKNOWN - ") and message in result.stdout
    assert "Traceback" not in result.stderr


def test_a_missing_config_is_unknown_in_one_line(tmp_path: Path) -> None:
    result = canary(tmp_path / "nowhere.yaml")
    assert result.returncode == 3
    assert result.stdout.strip() == ("CHATPROBE CANARY UNKNOWN - cannot read canary config "
                                     f"{tmp_path / 'nowhere.yaml'}")


# -- history ------------------------------------------------------------------------------

def run_at(started: float, failing: set[str], host_broken: bool = False) -> CanaryRun:
    """A run of two targets with two checks each; the named targets' receive check fails."""
    results = []
    for target in ("north", "south"):
        bad = target in failing
        results.append(CheckResult(target, "probe-1", "web", "receive",
                                   Status.CRITICAL if bad else Status.OK,
                                   "push.disabled" if bad else None,
                                   "push switch off" if bad else "", None, "", started))
        results.append(CheckResult(target, "probe-1", "web", "latency",
                                   Status.CRITICAL if bad else Status.OK, None, "",
                                   None if bad else 100.0 + started % 7, "", started))
    return CanaryRun(f"run{int(started)}", started, results, 1.0, host_broken=host_broken)


def test_history_gives_availability_and_latency_per_window(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    store = HistoryStore(tmp_path / "history.sqlite3")
    try:
        # 100 runs a minute apart, the newest first: south fails in 6 of the last 60 (the
        # last hour) and in 10 of all 100 (the last day); north never fails; 3 runs where
        # only the canary's host was broken count for nobody.
        for minute in range(100):
            started = now - 30 - minute * 60
            failing = {"south"} if (minute % 10 == 0 or minute in (61, 62, 63, 64)) else set()
            store.append(run_at(started, failing))
        for minute in (5, 6, 7):
            store.append(run_at(now - 45 - minute * 60, {"north", "south"}, host_broken=True))
        hour = {f.target: f for f in store.figures(now - 3600, "last hour")}
        day = {f.target: f for f in store.figures(now - 86400, "last day")}
    finally:
        store.close()
    assert (hour["north"].runs, hour["north"].available) == (60, 60)
    assert (hour["south"].runs, hour["south"].available) == (60, 54)
    assert (day["south"].runs, day["south"].available) == (100, 86)
    assert day["north"].availability == 1.0
    assert hour["north"].p50_ms is not None and 100 <= hour["north"].p50_ms < 107


def test_history_command_prints_figures_failures_and_detects_a_stale_canary(
        tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    store = HistoryStore(path)
    now = time.time()
    try:
        store.append(run_at(now - 600, {"south"}))
        store.append(run_at(now - 30, set()))
        text, stale = render_history(store, now, 180)
    finally:
        store.close()
    assert not stale
    assert "push.disabled (push switch off)" in text
    assert "south" in text and "50.00 %" in text
    fresh = subprocess.run([sys.executable, "-m", "chatprobe.cli", "history", "--db", str(path)],
                           capture_output=True, text=True, cwd=ROOT, timeout=scaled(60))
    assert fresh.returncode == 0, fresh.stderr
    assert "STALE" not in fresh.stdout
    stale_run = subprocess.run([sys.executable, "-m", "chatprobe.cli", "history", "--db",
                                str(path), "--stale-after", "10"], capture_output=True,
                               text=True, cwd=ROOT, timeout=scaled(60))
    assert stale_run.returncode == 2
    assert "STALE: no run for" in stale_run.stdout


WRITER = """
import sys, time
from chatprobe.canary.history import HistoryStore
from tests.test_canary import run_at
store = HistoryStore(__import__("pathlib").Path(sys.argv[1]))
print("writing", flush=True)
for i in range(100000):
    run = run_at(time.time(), {"south"} if i % 3 == 0 else set())
    run.results = run.results * 200  # big transactions: a kill lands inside one
    store.append(run)
"""


def test_a_store_its_creator_left_without_tables_reads_as_empty(tmp_path: Path) -> None:
    # A canary killed between creating the file and writing the schema (seen in the
    # twenty-kills test) leaves a database with no tables.
    import sqlite3

    path = tmp_path / "history.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
    store = HistoryStore(path, read_only=True)
    try:
        assert store.run_count() == 0
    finally:
        store.close()
    (tmp_path / "not-a-store").write_text("not sqlite at all " * 100)
    with pytest.raises(HarnessError, match="cannot open the canary history"):
        HistoryStore(tmp_path / "not-a-store", read_only=True)


def test_a_run_killed_while_writing_leaves_a_readable_store(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    for attempt in range(3):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)],
                                  stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "writing"
        deadline = time.monotonic() + scaled(30)
        # Kill it once some runs are in, i.e. in the middle of its stream of writes.
        while True:
            store = HistoryStore(path)
            try:
                count = store.run_count()
            finally:
                store.close()
            if count >= 5 * (attempt + 1) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        writer.kill()
        writer.wait(timeout=scaled(10))
        import sqlite3

        with sqlite3.connect(path) as connection:
            assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            sizes = {row[0] for row in connection.execute(
                "SELECT COUNT(c.rowid) FROM runs r JOIN checks c ON c.run = r.id "
                "GROUP BY r.id")}
        # Every run is whole: a kill never leaves a run with part of its checks.
        assert sizes == {800}
        store = HistoryStore(path)
        try:
            assert render_history(store, time.time(), 180)[0]
        finally:
            store.close()


def test_a_customer_behind_a_slow_network_profile_gives_a_latency_warning(
        reference_service: ServiceProcess, tmp_path: Path) -> None:
    # 1.2 s on the customer's uplink: above the 1 s warning, below the 2 s critical.
    profile = tmp_path / "slow-uplink.yaml"
    profile.write_text("name: slow-uplink\nup: {latency_ms: 1200}\n", encoding="utf-8")
    config = write_config(tmp_path, reference_service.base_url, idle_s=0)
    document = yaml.safe_load(config.read_text())
    document["targets"][0].update(profile=str(profile), agents=["probe-1"],
                                  checks=["receive", "latency"])
    config.write_text(yaml.safe_dump(document), encoding="utf-8")
    result = canary(config, "--json", str(tmp_path / "run.json"))
    assert result.returncode == 1, result.stdout + result.stderr
    checks = checks_of(tmp_path / "run.json")
    latency = checks["shop/probe-1/web/latency"]
    assert (latency["status"], latency["cause"], latency["profile"]) == (
        "WARNING", "sla.slow", "slow-uplink")
    assert latency["latency_ms"] >= 1200
    assert checks["shop/probe-1/web/receive"]["status"] == "OK"
    assert result.stdout.startswith("CHATPROBE CANARY WARNING - shop/probe-1/web latency")


def test_targets_run_side_by_side_and_write_allure_results(
        reference_service: ServiceProcess, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        down = sock.getsockname()[1]
    config = write_config(tmp_path, reference_service.base_url,
                          alluredir=str(tmp_path / "allure"))
    document = yaml.safe_load(config.read_text())
    document["targets"].append({"name": "gone", "url": f"http://127.0.0.1:{down}",
                                "config": str(TARGET_CONFIG), "agents": ["probe-1"]})
    config.write_text(yaml.safe_dump(document), encoding="utf-8")
    result = canary(config, "--json", str(tmp_path / "run.json"),
                    admin_token=reference_service.admin_token)
    assert result.returncode == 2, result.stdout + result.stderr
    checks = checks_of(tmp_path / "run.json")
    assert {c["status"] for k, c in checks.items() if k.startswith("shop/")} == {"OK"}, (
        result.stdout)
    assert {c["cause"] for k, c in checks.items() if k.startswith("gone/")} == {
        "transport.unreachable"}
    allure_results = [json.loads(p.read_text()) for p in (tmp_path / "allure").glob(
        "*-result.json")]
    assert len(allure_results) == len(checks)
    by_name = {r["name"]: r for r in allure_results}
    failed = [r for r in allure_results if r["status"] == "failed"]
    assert len(failed) == 4 and all(
        r["statusDetails"]["message"].startswith("Failed: [network/firewall] gone/probe-1/web/")
        and "transport.unreachable" in r["statusDetails"]["message"] for r in failed)
    assert all(any(a["name"] == "check result" for a in r["attachments"])
               for r in allure_results)
    from tests.test_report_results import category_matching

    assert all(category_matching(r["statusDetails"]["message"]) == ["network/firewall"]
               for r in failed)
    labels = {(label["name"], label["value"]) for r in by_name.values()
              for label in r["labels"]}
    assert {("epic", "shop"), ("epic", "gone"), ("feature", "probe-2"),
            ("story", "web")} <= labels


def test_repeated_runs_page_once_recover_once_and_export_metrics(
        reference_service: ServiceProcess, tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from tests.test_canary_alerts import Receiver

    hook = Receiver().start()
    try:
        config = write_config(tmp_path, reference_service.base_url, idle_s=0,
                              alert={"webhook": hook.url, "after_failures": 2},
                              prometheus={"textfile": "canary.prom"})
        agent = "/admin/shops/demo/agents/probe-1"
        reference_service.ok("PATCH", agent, {"receive_messages": False})
        codes = [canary(config).returncode for _ in range(3)]
        assert codes == [2, 2, 2]
        alerts = hook.drain()
        # Two checks of probe-1 fail (receive, latency); each pages once, at the 2nd run.
        assert sorted(a["body"]["check"] for a in alerts) == [
            "shop/probe-1/web/latency", "shop/probe-1/web/receive"]
        assert {a["body"]["event"] for a in alerts} == {"alert"}
        assert {a["body"]["cause"] for a in alerts} == {"permission.receive_off"}
        reference_service.ok("PATCH", agent, {"receive_messages": True})
        assert canary(config).returncode == 0
        recoveries = [hook.take(), hook.take()]
        assert {r["body"]["event"] for r in recoveries} == {"recovery"}
        assert hook.drain() == []
    finally:
        hook.stop()
    families = {f.name: f for f in text_string_to_metric_families(
        (tmp_path / "canary.prom").read_text())}
    success = {s.labels["target"]: s.value for s in families["probe_success"].samples}
    assert success == {"shop": 1.0}


def test_when_only_the_canary_host_is_broken_nobody_is_paged(tmp_path: Path) -> None:
    from tests.test_canary_alerts import Receiver

    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    hook = Receiver().start()
    try:
        config = write_config(tmp_path, f"http://127.0.0.1:{ports[0]}", idle_s=0,
                              control_url=f"http://127.0.0.1:{ports[1]}",
                              alert={"webhook": hook.url, "after_failures": 1})
        result = canary(config)
        assert result.returncode == 3, result.stdout
        assert "the canary's own host cannot reach" in result.stdout
        assert hook.drain() == []
    finally:
        hook.stop()


def test_the_demo_config_works_against_a_service_started_with_defaults(
        tmp_path: Path) -> None:
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", 8765)) == 0:
            message = "something already listens on 127.0.0.1:8765, the demo config's target"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    # Defaults as documented: port 8765, the demo shop; only the database is kept apart.
    service = ServiceProcess(tmp_path / "service.sqlite3", port=8765).start()
    try:
        env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
        result = subprocess.run([sys.executable, "-m", "chatprobe.cli", "canary", "--config",
                                 str(ROOT / "fixtures" / "canary-demo.yaml")],
                                capture_output=True, text=True, cwd=tmp_path, env=env,
                                timeout=scaled(90), stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith("CHATPROBE CANARY OK - 8/8 checks OK")
        assert (tmp_path / "state" / "chatprobe" / "canary.sqlite3").exists()
    finally:
        service.stop()


def test_each_run_replaces_the_previous_runs_allure_results(
        reference_service: ServiceProcess, tmp_path: Path) -> None:
    results = tmp_path / "allure"
    results.mkdir()
    (results / "notes.txt").write_text("not Allure's: stays", encoding="utf-8")
    config = write_config(tmp_path, reference_service.base_url, idle_s=0,
                          alluredir=str(results))
    counts = []
    for _ in range(2):
        assert canary(config).returncode == 0
        counts.append(len(list(results.glob("*-result.json"))))
    assert counts == [8, 8]
    assert (results / "notes.txt").read_text(encoding="utf-8") == "not Allure's: stays"


def test_checks_the_canary_could_not_judge_do_not_count_against_availability(
        tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "history.sqlite3")
    now = time.time()
    try:
        store.append(run_at(now - 120, set()))
        unjudged = run_at(now - 60, set())
        unjudged.results = [CheckResult.unjudged(r.check_id, "not run: budget")
                            for r in unjudged.results]
        store.append(unjudged)
        figures = {f.target: f for f in store.figures(now - 3600, "last hour")}
    finally:
        store.close()
    assert (figures["north"].runs, figures["north"].available) == (1, 1)
