"""Canary Prometheus metrics (issue 6, item 4): the config section, the metric values, the
node_exporter textfile, label and secret hygiene, and a push to a real Pushgateway
(the Debian package prometheus-pushgateway) checked by scraping it."""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from chatprobe.canary.metrics import (
    CHECK_LABELS,
    LATENCY_BUCKETS_S,
    PrometheusConfig,
    build_registry,
    export,
    parse_prometheus_config,
    safe_target,
)
from chatprobe.canary.model import CanaryRun, CheckResult
from chatprobe.errors import HarnessError
from chatprobe.verdict import Status
from tests.conftest import ROOT, scaled, stop_process
from tests.servers import free_port, require_binary, wait_for_port

T0 = 1_700_000_000.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def check(agent: str = "agent1", channel: str = "web", kind: str = "receive",
          status: Status = Status.OK, target: str = "shop-a", **changes: Any) -> CheckResult:
    values: dict[str, Any] = {"latency_ms": 150.0 if status is Status.OK else None,
                              "started": T0 + 0.1, "duration_s": 0.4}
    values.update(changes)
    return CheckResult(target, agent, channel, kind, status, **values)


def sample_run(run_id: str = "run-20240506-0001") -> CanaryRun:
    return CanaryRun(run_id, T0, [
        check(kind="receive", latency_ms=120.0, started=T0 + 0.1, duration_s=0.3),
        check(kind="reply", latency_ms=180.0, started=T0 + 0.5, duration_s=0.3),
        check(kind="latency", status=Status.WARNING, latency_ms=4200.0, started=T0 + 0.9,
              duration_s=4.3),
        check(agent="agent2", channel="app", status=Status.CRITICAL,
              cause="permission.receive_off", detail="agent2 received nothing in 2 s",
              started=T0 + 0.1, duration_s=2.0),
        check(target="shop-b", profile="mobile-3g", latency_ms=900.0, started=T0 + 0.2,
              duration_s=1.0),
    ], duration_s=5.5)


def samples(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float | None:
    """The sample whose labels include ``labels`` (the Pushgateway adds job and instance)."""
    wanted = set(labels.items())
    matches = [v for (n, have), v in found.items() if n == name and wanted <= have]
    assert len(matches) <= 1, (name, labels, matches)
    return matches[0] if matches else None


def check_labels(agent: str = "agent1", channel: str = "web", kind: str = "receive",
                 target: str = "shop-a", profile: str = "") -> dict[str, str]:
    return {"target": target, "agent": agent, "channel": channel, "kind": kind,
            "profile": profile}


def assert_sample_run_metrics(found: Samples) -> None:
    """What sample_run() must export, wherever it ended up (textfile or Pushgateway)."""
    assert value(found, "probe_success", target="shop-a", profile="") == 0
    assert value(found, "probe_success", target="shop-b", profile="mobile-3g") == 1
    # shop-a's checks ran from T0+0.1 to T0+5.2 (the latency check's end).
    duration = value(found, "probe_duration_seconds", target="shop-a", profile="")
    assert duration == pytest.approx(5.1)
    assert value(found, "chatprobe_check_success", **check_labels(kind="latency")) == 1
    assert value(found, "chatprobe_check_status", **check_labels(kind="latency")) == 1
    assert value(found, "chatprobe_check_success", **check_labels("agent2", "app")) == 0
    assert value(found, "chatprobe_check_status", **check_labels("agent2", "app")) == 2
    assert value(found, "chatprobe_check_failure_info", cause="permission.receive_off",
                 **check_labels("agent2", "app")) == 1
    assert value(found, "chatprobe_check_latency_seconds",
                 **check_labels(kind="latency")) == pytest.approx(4.2)
    assert value(found, "chatprobe_check_latency_seconds", **check_labels("agent2", "app")) \
        is None
    path = {"target": "shop-a", "agent": "agent1", "channel": "web", "profile": ""}
    assert value(found, "chatprobe_delivery_latency_seconds_count", **path) == 3
    assert value(found, "chatprobe_delivery_latency_seconds_sum", **path) == pytest.approx(4.5)
    assert value(found, "chatprobe_delivery_latency_seconds_bucket", le="3", **path) == 2
    assert value(found, "chatprobe_delivery_latency_seconds_bucket", le="5", **path) == 3
    assert value(found, "chatprobe_delivery_latency_seconds_bucket", le="+Inf", **path) == 3
    assert value(found, "chatprobe_late_messages", **path) == 1
    assert value(found, "chatprobe_lost_messages", **path) == 0
    assert value(found, "chatprobe_lost_messages", target="shop-a", agent="agent2",
                 channel="app", profile="") == 1
    assert value(found, "chatprobe_availability_ratio", target="shop-a") == 0.995
    assert value(found, "chatprobe_canary_last_run_timestamp_seconds") == T0 + 5.5
    assert value(found, "chatprobe_canary_status") == 2
    assert value(found, "chatprobe_canary_checks", status="CRITICAL") == 1
    assert value(found, "chatprobe_canary_host_broken") == 0


AVAILABILITY = {"shop-a": 0.995, "shop-b": 1.0}


# -- config --------------------------------------------------------------------------------


def test_parse_config() -> None:
    assert parse_prometheus_config(None, "c.yaml: prometheus") is None
    both = parse_prometheus_config(
        {"textfile": "/var/lib/node_exporter/textfile/chatprobe.prom",
         "pushgateway": "http://pgw.example:9091", "job": "canary-eu",
         "grouping": {"instance": "canary-eu-1"}, "timeout_s": 2},
        "c.yaml: prometheus")
    assert both == PrometheusConfig(
        textfile=Path("/var/lib/node_exporter/textfile/chatprobe.prom"),
        pushgateway="http://pgw.example:9091", job="canary-eu",
        grouping=(("instance", "canary-eu-1"),), timeout_s=2.0)
    only_file = parse_prometheus_config({"textfile": "out/chatprobe.prom"}, "s",
                                        base=Path("/etc/chatprobe"))
    assert only_file == PrometheusConfig(textfile=Path("/etc/chatprobe/out/chatprobe.prom"))
    only_push = parse_prometheus_config({"pushgateway": "https://pgw.example"}, "s")
    assert only_push is not None and only_push.textfile is None
    assert only_push.job == "chatprobe_canary" and only_push.timeout_s == 5.0


@pytest.mark.parametrize(("document", "field"), [
    ("textfile", "must be a mapping"),
    ({}, "'textfile' and/or 'pushgateway'"),
    ({"job": "x"}, "'textfile' and/or 'pushgateway'"),
    ({"textfile": "/tmp/metrics.txt"}, "'textfile'"),
    ({"textfile": 5}, "'textfile'"),
    ({"pushgateway": "pgw:9091"}, "'pushgateway'"),
    ({"pushgateway": "ftp://pgw"}, "'pushgateway'"),
    ({"pushgateway": "http://[::1"}, "'pushgateway'"),
    ({"textfile": "/t/x.prom", "job": ""}, "'job'"),
    ({"textfile": "/t/x.prom", "job": "a/b"}, "'job'"),
    ({"textfile": "/t/x.prom", "grouping": {"job": "x"}}, "'grouping'"),
    ({"textfile": "/t/x.prom", "grouping": {"bad-name": "x"}}, "'grouping'"),
    ({"textfile": "/t/x.prom", "grouping": ["instance"]}, "'grouping'"),
    ({"textfile": "/t/x.prom", "timeout_s": 0}, "'timeout_s'"),
    ({"textfile": "/t/x.prom", "timeout_s": True}, "'timeout_s'"),
    ({"textfile": "/t/x.prom", "textfiles": "/t/y.prom"}, "unknown field(s) textfiles"),
])
def test_parse_config_rejects(document: Any, field: str) -> None:
    with pytest.raises(HarnessError) as raised:
        parse_prometheus_config(document, "canary.yaml: prometheus")
    message = str(raised.value)
    assert message.startswith("canary.yaml: prometheus: ") and field in message
    assert "\n" not in message


def test_pushgateway_password_is_not_in_config_errors() -> None:
    with pytest.raises(HarnessError) as raised:
        parse_prometheus_config({"pushgateway": "pgw://user:hunter2@pgw"}, "s")
    assert "hunter2" not in str(raised.value)


# -- metric values -------------------------------------------------------------------------


def test_metrics_of_a_run() -> None:
    text = generate_latest(build_registry(sample_run(), AVAILABILITY)).decode()
    assert_sample_run_metrics(samples(text))


def test_latency_buckets_straddle_the_thresholds() -> None:
    # The 3 s warning and 12 s critical thresholds are bucket edges, with resolution below.
    assert 3.0 in LATENCY_BUCKETS_S and 12.0 in LATENCY_BUCKETS_S
    assert sum(1 for edge in LATENCY_BUCKETS_S if edge < 3.0) >= 4
    assert list(LATENCY_BUCKETS_S) == sorted(LATENCY_BUCKETS_S)


def test_host_broken_leaves_out_target_metrics() -> None:
    run = CanaryRun("r", T0, [check(status=Status.CRITICAL, cause="transport.unreachable")],
                    duration_s=1.0, host_broken=True)
    found = samples(generate_latest(build_registry(run, AVAILABILITY)).decode())
    # Nothing that a target rule could page on; the canary's own state is there.
    names = {name for name, _ in found}
    assert not names & {"probe_success", "chatprobe_check_success", "chatprobe_check_status",
                        "chatprobe_lost_messages"}
    assert value(found, "chatprobe_canary_host_broken") == 1
    assert value(found, "chatprobe_canary_status") == 3
    assert value(found, "chatprobe_canary_last_run_timestamp_seconds") == T0 + 1.0


def test_duplicate_checks_give_one_series_the_worse_one() -> None:
    run = CanaryRun("r", T0, [check(), check(status=Status.CRITICAL, cause="push.disabled"),
                              check()], duration_s=1.0)
    found = samples(generate_latest(build_registry(run, {})).decode())
    assert value(found, "chatprobe_check_status", **check_labels()) == 2


# -- label and secret hygiene --------------------------------------------------------------


def test_labels_are_bounded_and_carry_no_secrets() -> None:
    target = "wss://probe:hunter2@chat.example.com/ws?token=tok-s3cret#frag"
    run = CanaryRun("run-8f3a2c", T0, [
        check(target=target, status=Status.CRITICAL, cause="auth.rejected",
              detail="login with token tok-s3cret refused for message m-77123"),
        check(target=target, kind="latency", latency_ms=80.0),
        check(target=target, kind="idle", status=Status.UNKNOWN,
              cause="something a future check invents", detail="free text"),
    ], duration_s=2.0, harness_error="config token tok-s3cret unreadable")
    text = generate_latest(build_registry(run, {target: 0.5})).decode()
    for secret in ("hunter2", "tok-s3cret", "run-8f3a2c", "m-77123", "free text", "frag",
                   "probe@", "refused"):
        assert secret not in text, secret
    allowed = {*CHECK_LABELS, "cause", "le", "status"}
    values: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert set(sample.labels) <= allowed, (sample.name, sample.labels)
            for label, label_value in sample.labels.items():
                values.setdefault(label, set()).add(label_value)
    assert values["target"] == {"wss://chat.example.com/ws"}
    # A cause that is not a known diagnosis cannot grow the label set.
    assert values["cause"] == {"auth.rejected", "other"}


def test_safe_target() -> None:
    assert safe_target("shop-a") == "shop-a"
    assert safe_target("https://u:p@h.example:8443/x?key=1") == "https://h.example:8443/x"
    assert safe_target("http://[::1/x?key=1") == "http://[::1/x"


# -- textfile ------------------------------------------------------------------------------


def test_textfile_is_written_whole_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "chatprobe.prom"
    config = PrometheusConfig(textfile=path)
    assert export(sample_run(), AVAILABILITY, config) == []
    assert_sample_run_metrics(samples(path.read_text()))
    # The next run replaces the file: a check that did not run leaves no stale series.
    shorter = CanaryRun("run-2", T0 + 60, [check(target="shop-b", profile="mobile-3g")],
                        duration_s=1.0)
    assert export(shorter, {}, config) == []
    found = samples(path.read_text())
    assert value(found, "probe_success", target="shop-a") is None
    assert value(found, "probe_success", target="shop-b") == 1
    assert value(found, "chatprobe_canary_last_run_timestamp_seconds") == T0 + 61
    # write_to_textfile renames its temporary file into place: nothing else is left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["chatprobe.prom"]


def test_textfile_problem_is_a_line_not_an_exception(tmp_path: Path) -> None:
    config = PrometheusConfig(textfile=tmp_path / "missing-dir" / "chatprobe.prom")
    problems = export(sample_run(), AVAILABILITY, config)
    assert len(problems) == 1 and "\n" not in problems[0]
    assert problems[0].startswith(f"prometheus textfile {config.textfile}: ")


# -- Pushgateway ---------------------------------------------------------------------------


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    """A real Pushgateway on a free loopback port, in memory. Debian's build persists to
    /var/lib/prometheus/pushgateway.data unless told otherwise, which would share metrics
    between tests (and with the system's own Pushgateway)."""
    binary = require_binary("prometheus-pushgateway")
    port = free_port()
    log = tmp_path / "pushgateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}",
                                 "--persistence.file="],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, "prometheus-pushgateway", log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(f"{url}/metrics", timeout=scaled(10)) as response:
        return samples(response.read().decode())


def test_push_to_a_real_pushgateway(pushgateway: str) -> None:
    config = PrometheusConfig(pushgateway=pushgateway, job="chatprobe_canary",
                              grouping=(("instance", "canary-test"),), timeout_s=scaled(5))
    assert export(sample_run(), AVAILABILITY, config) == []
    found = scrape(pushgateway)
    assert_sample_run_metrics(found)
    grouped = {"job": "chatprobe_canary", "instance": "canary-test"}
    assert value(found, "probe_success", target="shop-a", **grouped) == 0
    assert value(found, "push_time_seconds", **grouped) is not None
    assert value(found, "push_failure_time_seconds", **grouped) == 0

    # The next run replaces the group (PUT): the checks it did not run disappear.
    shorter = CanaryRun("run-2", T0 + 60, [check(target="shop-b", profile="mobile-3g")],
                        duration_s=1.0)
    assert export(shorter, {}, config) == []
    found = scrape(pushgateway)
    assert value(found, "probe_success", target="shop-a", **grouped) is None
    assert value(found, "probe_success", target="shop-b", **grouped) == 1
    assert value(found, "chatprobe_canary_last_run_timestamp_seconds", **grouped) == T0 + 61


def test_textfile_and_pushgateway_together(pushgateway: str, tmp_path: Path) -> None:
    config = PrometheusConfig(textfile=tmp_path / "c.prom", pushgateway=pushgateway,
                              timeout_s=scaled(5))
    assert export(sample_run(), AVAILABILITY, config) == []
    assert_sample_run_metrics(samples((tmp_path / "c.prom").read_text()))
    assert value(scrape(pushgateway), "probe_success", job="chatprobe_canary",
                 target="shop-b") == 1


def test_unreachable_pushgateway_is_a_problem_line() -> None:
    port = free_port()  # nothing listens there
    config = PrometheusConfig(pushgateway=f"http://canary:hunter2@127.0.0.1:{port}/",
                              timeout_s=scaled(2))
    problems = export(sample_run(), AVAILABILITY, config)
    assert len(problems) == 1 and "\n" not in problems[0], problems
    assert problems[0].startswith(f"prometheus pushgateway http://127.0.0.1:{port}/: ")
    assert "hunter2" not in problems[0]


def test_hanging_pushgateway_costs_only_its_timeout(tmp_path: Path) -> None:
    # A socket that accepts connections (the kernel's backlog) but never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        config = PrometheusConfig(textfile=tmp_path / "c.prom",
                                  pushgateway=f"http://127.0.0.1:{port}", timeout_s=0.5)
        began = time.monotonic()
        problems = export(sample_run(), AVAILABILITY, config)
        elapsed = time.monotonic() - began
    assert len(problems) == 1 and "timed out" in problems[0], problems
    assert elapsed < scaled(10), elapsed
    # The textfile was still written: one broken sink does not cost the other.
    assert_sample_run_metrics(samples((tmp_path / "c.prom").read_text()))


# -- the example alert rules ---------------------------------------------------------------


def test_example_alert_rules_use_only_metrics_we_export() -> None:
    document = yaml.safe_load((ROOT / "docs" / "alert-rules.yaml").read_text())
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} >= {
        "ChatprobeCheckFailing", "ChatprobeLatencyWarning", "ChatprobeLatencyCritical",
        "ChatprobeAvailabilityBelowTarget", "ChatprobeCanaryStale"}
    exported = {name for name, _ in samples(
        generate_latest(build_registry(sample_run(), AVAILABILITY)).decode())}
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in ("page", "ticket"), rule
        text = " ".join([rule["expr"], *rule.get("annotations", {}).values()])
        # Metric names, not label values such as job="chatprobe_canary".
        used = set(re.findall(r'\b(?:probe|chatprobe)_[a-z_]+\b(?!")', text))
        assert used, rule["alert"]
        assert used <= exported, (rule["alert"], used - exported)
