"""Allure result files of probe and swarm runs: evidence, categories, SLO results, plots and
no secrets (real runs against the reference service; the report itself is built in
test_report_build.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from chatprobe.histogram import LatencyHistogram
from chatprobe.report.categories import PLATFORM, allure_categories, category_of
from chatprobe.report.plots import swarm_plots
from tests.conftest import ROOT, ServiceProcess, scaled

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKENS = ("demo-probe-1-token", "demo-probe-2-token")


def chatprobe(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatprobe.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=scaled(timeout_s),
                          stdin=subprocess.DEVNULL)


def results_in(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(directory.glob("*-result.json"))]


def category_matching(message: str) -> list[str]:
    """Which category rules (as Allure applies them) match a failed result's message."""
    return [rule["name"] for rule in allure_categories()
            if "failed" in rule["matchedStatuses"]
            and re.fullmatch(rule["messageRegex"], message)]


def assert_no_secrets(directory: Path, secrets: tuple[str, ...]) -> None:
    for path in directory.iterdir():
        content = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in content, f"{secret} leaked into {path.name}"


def test_a_probe_with_injected_loss_shows_each_lost_message_as_platform_loss(
        reference_service: ServiceProcess, tmp_path: Path) -> None:
    reference_service.ok("POST", "/admin/faults", {"drop": 0.1, "seed": 7})
    allure = tmp_path / "allure"
    result = chatprobe("probe", "--target", reference_service.base_url, "--messages", "100",
                       "--customers", "4", "--admin-token", reference_service.admin_token,
                       "--deadline-ms", "2000", "--sla-ms", "1000", "--alluredir", str(allure),
                       "--json", str(tmp_path / "run.json"), "--quiet")
    assert result.returncode == 2, result.stdout + result.stderr
    doc = json.loads((tmp_path / "run.json").read_text())
    dropped = reference_service.stats()["dropped"]
    assert doc["lost"] == dropped > 0
    (found,) = results_in(allure)
    assert found["status"] == "failed"
    assert found["statusDetails"]["message"].startswith(f"[{PLATFORM}] ")
    assert category_matching(found["statusDetails"]["message"]) == [PLATFORM]
    assert f"lost {dropped}" in found["statusDetails"]["message"]
    # One step per lost message (up to the evidence limit), each with its stamp, the
    # platform's message id and its hops.
    lost_steps = [step for step in found["steps"] if step["name"].startswith("lost ")]
    assert len(lost_steps) == min(dropped, 20)
    for step in lost_steps:
        parameters = {p["name"]: p["value"] for p in step["parameters"]}
        assert parameters["stamp"].startswith(f"cp:{doc['run']}:")
        assert parameters["server message id"].isdigit()
        assert parameters["cause"] == "push.lost"
        assert parameters["platform status"] == "dropped"
        hops = [hop["name"] for hop in step["steps"]]
        assert hops[0] == "planned send: +0.0 ms" and hops[-1] == "received: never"
        assert hops[2].startswith("acked by the platform: +")
        # The frames around it: the customer's own send of this very message is among them.
        (frames,) = [a for a in step["attachments"] if a["name"] == "frames around it.txt"]
        named = re.fullmatch(r"lost (c\d+) #(\d+): .*", step["name"])
        assert named is not None, step["name"]
        conversation, seq = named.groups()
        assert (f'"client_msg_id":"{doc["run"]}-{conversation}-{seq}"'
                in (allure / frames["source"]).read_text())
    names = {a["name"] for a in found["attachments"]}
    assert {"lost and late messages.html", "summary.json", "configuration.json"} <= names
    for attachment in found["attachments"]:
        assert (allure / attachment["source"]).is_file()
    assert (allure / "categories.json").is_file() and (allure / "environment.properties").is_file()
    assert_no_secrets(allure, (*TOKENS, reference_service.admin_token))


def test_category_of_every_cause_is_one_of_the_five() -> None:
    from chatprobe.diagnosis import Cause

    names = {rule["name"] for rule in allure_categories()}
    assert len(names) == 5
    for cause in Cause:
        assert category_of(cause) in names
    assert category_of("transport.unreachable") == "network/firewall"
    assert category_of("permission.receive_off") == "permission/routing"
    assert category_of("sla.slow") == "SLA breach"
    assert category_of(None, broken=True) == "harness error"


def synthetic_swarm_doc(profile: str, slow_ms: float) -> dict[str, Any]:
    histogram = LatencyHistogram()
    for value in range(1, 1001):
        histogram.record_us(int(value * slow_ms))
    return {"profile": profile, "sla_ms": 3000, "lost": 3, "late": 1,
            "latency_histogram": histogram.encode(),
            "timeseries": [{"t_s": t * 2.0, "users": 10 * t, "p50_ms": slow_ms,
                            "p99_ms": 3 * slow_ms, "lost": t % 2, "late": 0}
                           for t in range(10)]}


def test_swarm_plots_are_png_images() -> None:
    plots = swarm_plots([synthetic_swarm_doc("clean", 10), synthetic_swarm_doc("mobile-3g",
                                                                               300)])
    assert set(plots) == {"latency and load over time.png", "lost and late over time.png",
                          "latency per network profile.png"}
    for png in plots.values():
        assert png.startswith(PNG_MAGIC) and len(png) > 5000


def test_a_swarm_across_two_profiles_gives_one_result_per_profile_and_slo_with_plots(
        reference_service: ServiceProcess, tmp_path: Path) -> None:
    slow = tmp_path / "slow.yaml"
    slow.write_text("name: slow\nup: {latency_ms: 40}\n", encoding="utf-8")
    allure = tmp_path / "allure"
    result = chatprobe("swarm", "--target", reference_service.base_url, "--shape",
                       "pre-heat", "--duration", "4", "--think-scale", "0.2",
                       "--deadline-ms", "3000", "--profile", f"clean,{slow}",
                       "--admin-token", reference_service.admin_token,
                       "--alluredir", str(allure), timeout_s=300)
    assert result.returncode in (0, 1, 3), result.stdout + result.stderr[-3000:]
    found = results_in(allure)
    keys = {(p["name"], p["value"]) for r in found for p in r["parameters"]
            if p["name"] in ("network profile", "SLO")}
    assert len(found) == 6
    assert {(r["name"]) for r in found} == {
        f"pre-heat [{profile}]: {slo}" for profile in ("clean", "slow")
        for slo in ("p99 latency", "loss", "availability")}
    assert ("network profile", "slow") in keys and ("SLO", "availability") in keys
    for found_result in found:
        pngs = [a for a in found_result["attachments"] if a["type"] == "image/png"]
        assert len(pngs) == 3
        for attachment in pngs:
            assert (allure / attachment["source"]).read_bytes().startswith(PNG_MAGIC)
        # Runs of the same scenario, profile and SLO share a history id; runs differ.
        run_parameter = [p for p in found_result["parameters"] if p["name"] == "run"]
        assert run_parameter and run_parameter[0]["excluded"] is True
    assert len({r["historyId"] for r in found}) == 6
    assert_no_secrets(allure, (*TOKENS, reference_service.admin_token))


def test_credentials_in_frames_are_masked() -> None:
    from chatprobe.redact import mask_secrets, public_url

    frame = '{"type":"hello","role":"agent","agent":"probe-1","token":"demo-probe-1-token"}'
    assert mask_secrets(frame) == ('{"type":"hello","role":"agent","agent":"probe-1",'
                                   '"token":"******"}')
    assert "s3cret" not in mask_secrets('{"Password": "s3cret", "x": 1}')
    assert public_url("https://user:pw@chat.example:8443/ws?token=abc#x") == (
        "https://chat.example:8443/ws")


def test_the_configuration_attached_masks_secrets_at_any_depth() -> None:
    from chatprobe.config import load_target
    from chatprobe.redact import scrub
    from chatprobe.report.results import masked_config

    for name in ("reference", "prosody", "synapse"):
        config = load_target(ROOT / "fixtures" / "targets" / f"{name}.yaml")
        masked = json.dumps(masked_config(config))
        for agent in config.agents:
            assert agent.token not in masked, name
        assert "customer-secret" not in masked and "secret" not in masked.replace(
            "******", ""), (name, masked)
    # A frame inside a document keeps its shape, loses its credential.
    frame = {"frames": [{"frame": '{"type":"hello","token":"abc123"}'}]}
    assert "abc123" not in json.dumps(scrub(frame))


def test_a_warning_whose_loss_the_probe_could_have_made_says_so_in_its_result() -> None:
    from chatprobe.report.results import run_status

    doc = {"status": "WARNING", "sent": 10, "delivered": 8, "late": 1, "lost": 1,
           "sla_ms": 3000.0, "latency_ms": {"p99": 3500.0}, "diagnoses": [],
           "own_delay_note": "its 1 lost messages all turned up: the loss may be its own"}
    status, text = run_status(doc)
    assert status == "failed" and "the loss may be its own" in text


def test_a_run_whose_only_fault_is_its_p99_is_an_sla_breach_not_platform_loss() -> None:
    from chatprobe.report.results import run_status

    doc = {"status": "WARNING", "sent": 50, "delivered": 50, "late": 0, "lost": 0,
           "sla_ms": 3000.0, "p99_warning_ms": 100.0, "latency_ms": {"p99": 300.0},
           "diagnoses": []}
    status, text = run_status(doc)
    assert status == "failed" and category_matching(text) == ["SLA breach"], text
    assert "above the 100 ms threshold" in text


def test_an_invalid_run_that_misrouted_a_message_fails_instead_of_breaking() -> None:
    from chatprobe.report.results import run_status

    doc = {"status": "CRITICAL", "sent": 50, "delivered": 48, "late": 0, "lost": 2,
           "misrouted": 1, "sla_ms": 3000.0, "latency_ms": {"p99": 30.0}, "valid": False,
           "invalid_reasons": ["worker w0: 900 of 50 sends more than 50 ms behind plan"],
           "diagnoses": [{"outcome": "lost", "cause": "push.lost", "explanation": "x"}]}
    status, text = run_status(doc)
    assert status == "failed" and "1 misrouted, 0 forged" in text, text
    assert category_matching(text) == ["permission/routing"], text  # not the loss's
    status, text = run_status(doc | {"misrouted": 0})
    assert status == "broken" and "generator was the bottleneck" in text, text
