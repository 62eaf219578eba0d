"""Secrets come from environment variables or files, never need the command line (where ps
shows them to every user), and the harness never puts them there itself (issue 8 item 2);
no output of a probe, swarm, canary or report run holds them, error messages included."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import psutil
import pytest
import yaml

from chatprobe.config import ADMIN_TOKEN_ENV, parse_target
from chatprobe.errors import HarnessError
from chatprobe.swarm.runner import STAMP_KEY_ENV, SwarmOptions
from tests.conftest import ROOT, ServiceProcess, capture_stamp_keys, scaled


def test_tokens_come_from_the_file_an_environment_variable_or_a_file_of_their_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "probe-2.token").write_text("from-a-file\n", encoding="utf-8")
    (tmp_path / "admin.token").write_text("admin-from-a-file", encoding="utf-8")
    monkeypatch.setenv("PROBE_1_TOKEN", "from-the-environment")
    config = parse_target({"agents": [{"id": "probe-1", "token_env": "PROBE_1_TOKEN"},
                                      {"id": "probe-2", "token_file": "probe-2.token"},
                                      {"id": "probe-3", "token": "in-the-file"}],
                           "admin_token_file": "admin.token"},
                          str(tmp_path / "target.yaml"))
    assert [a.token for a in config.agents] == ["from-the-environment", "from-a-file",
                                                "in-the-file"]
    assert config.admin_token == "admin-from-a-file"


@pytest.mark.parametrize("agent, message", [
    ({"id": "a", "token_env": "NO_SUCH_VARIABLE_HERE"},
     "environment variable NO_SUCH_VARIABLE_HERE (for 'token') is not set"),
    ({"id": "a", "token_file": "missing.token"}, "cannot read the 'token' file"),
    ({"id": "a", "token": "x", "token_env": "Y"}, "give one of token, token_env"),
    ({"id": "a"}, "needs 'token', 'token_env' or 'token_file'"),
])
def test_a_secret_that_cannot_be_found_is_a_one_line_error(tmp_path: Path,
                                                          agent: dict[str, str],
                                                          message: str) -> None:
    with pytest.raises(HarnessError) as caught:
        parse_target({"agents": [agent]}, str(tmp_path / "target.yaml"))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_swarm_hands_the_admin_token_to_locust_off_the_command_line(
        tmp_path: Path) -> None:
    options = SwarmOptions(target="http://127.0.0.1:9", admin_token="s3cret-admin")
    assert not any("s3cret-admin" in part for part in options.locust_command(tmp_path / "x"))
    assert options.locust_environment()[ADMIN_TOKEN_ENV] == "s3cret-admin"


def test_no_process_of_a_swarm_shows_the_admin_token(reference_service: ServiceProcess,
                                                     tmp_path: Path) -> None:
    shape = tmp_path / "shape.yaml"
    shape.write_text("stages:\n  - {duration: 3, users: 4, spawn_rate: 4}\n")
    env = {**os.environ, ADMIN_TOKEN_ENV: reference_service.admin_token}
    proc = subprocess.Popen([sys.executable, "-m", "chatprobe.cli", "swarm", "--target",
                             reference_service.base_url, "--shape", str(shape),
                             "--think-scale", "0.1",
                             "--workers", "2", "--json", str(tmp_path / "out.json")],
                            cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, str] = {}
    tokens: dict[int, str | None] = {}
    try:
        deadline = time.monotonic() + scaled(60)
        # Watch every process of the run (master and workers) until it ends.
        while proc.poll() is None and time.monotonic() < deadline:
            for child in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(
                    recursive=True)]:
                try:
                    seen[child.pid] = " ".join(child.cmdline())
                    tokens[child.pid] = child.environ().get(ADMIN_TOKEN_ENV)
                except psutil.Error:
                    continue
            time.sleep(0.05)
        assert proc.wait(timeout=scaled(120)) in (0, 1, 3)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sum("locust" in line for line in seen.values()) >= 2, seen  # master + workers
    assert not [line for line in seen.values() if reference_service.admin_token in line]
    # ... and the token did reach Locust's processes, through their environment.
    locust = [pid for pid, line in seen.items() if "locust" in line]
    assert {tokens[pid] for pid in locust} == {reference_service.admin_token}
    assert json.loads((tmp_path / "out.json").read_text())["sent"] > 0


# -- every output of every kind of run, grepped for the secrets it used ----------------------

AGENT_1 = "p1-AgentSecret+7Rq2/Zx4Vw"
AGENT_2 = "p2-AgentSecret+9Lm4/Kv8Tn"
ADMIN = "adm-AdminSecret+3Tw8/Hy6Pe"
SWARM_STAMP_KEY = bytes.fromhex("5ca1ab1e0ddba11c0ffee0ddf00dfeed")
WRONG = "wrong-AgentSecret+5Ns1/Jd2Qc"
AGENT_1_ENV = "CHATPROBE_TEST_LEAK_AGENT_1"
WRONG_ENV = "CHATPROBE_TEST_LEAK_WRONG"
CANARY_ADMIN_ENV = "CHATPROBE_TEST_LEAK_ADMIN"


def encodings(secret: bytes) -> dict[str, bytes]:
    """The forms a secret could take in an output: as it is, URL-quoted, JSON-escaped, hex,
    and base64 (standard and URL-safe) at each of the three alignments it could have inside
    a longer base64 text (the characters that depend on its neighbours cut off)."""
    forms = {"raw": secret, "url-quoted": urllib.parse.quote(secret, safe="").encode(),
             "url-quoted path": urllib.parse.quote(secret).encode(),
             "form-quoted": urllib.parse.quote_plus(secret).encode(),
             "json-escaped": secret.replace(b"/", b"\\/"), "hex": secret.hex().encode()}
    for shift, cut in ((0, 0), (1, 2), (2, 3)):
        for name, encode in (("base64", base64.b64encode),
                             ("base64url", base64.urlsafe_b64encode)):
            forms[f"{name}+{shift}"] = encode(b"\0" * shift + secret)[cut:-4]
    return forms


def write_target(folder: Path, name: str, agent_1_env: str) -> Path:
    """A target config whose secrets all live outside it: one token in an environment
    variable, one in a file; the admin token comes from the environment too."""
    (folder / "probe-2.token").write_text(AGENT_2 + "\n", encoding="utf-8")
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "protocol": "reference", "shop": "demo", "channels": ["web"],
        "agents": [{"id": "probe-1", "token_env": agent_1_env},
                   {"id": "probe-2", "token_file": "probe-2.token"}],
        "sla_ms": 1000, "deadline_ms": 2000}), encoding="utf-8")
    return path


def write_canary(folder: Path, out: Path, url: str, target: Path, allure: Path) -> Path:
    path = folder / f"canary-{target.stem}.yaml"
    path.write_text(yaml.safe_dump({
        "budget_s": 30, "idle_s": 0.2, "thresholds": {"warning_ms": 1000, "critical_ms": 2000},
        "history": str(out / "canary-history.sqlite3"),
        "prometheus": {"textfile": str(out / "metrics" / "chatprobe.prom")},
        "alluredir": str(allure),
        "targets": [{"name": "shop", "url": url, "config": str(target),
                     "admin_token_env": CANARY_ADMIN_ENV}]}), encoding="utf-8")
    return path


def test_no_output_of_a_probe_swarm_canary_or_report_run_holds_a_secret(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    from chatprobe.cli import main
    from chatprobe.stamp import StampCodec
    from tests.test_report_build import embedded_files, require_allure

    shop = tmp_path / "shop.yaml"
    shop.write_text((ROOT / "fixtures" / "shops" / "demo.yaml").read_text(encoding="utf-8")
                    .replace("demo-probe-1-token", AGENT_1)
                    .replace("demo-probe-2-token", AGENT_2), encoding="utf-8")
    service = ServiceProcess(tmp_path / "service.sqlite3", config=shop)
    service.admin_token = ADMIN
    service.start()
    out = tmp_path / "out"  # every file any run below writes
    (out / "metrics").mkdir(parents=True)  # node_exporter's textfile folder
    allure = out / "allure-results"
    target = write_target(tmp_path, "target", AGENT_1_ENV)
    wrong = write_target(tmp_path, "wrong-target", WRONG_ENV)
    environment = {AGENT_1_ENV: AGENT_1, WRONG_ENV: WRONG, ADMIN_TOKEN_ENV: ADMIN,
                   CANARY_ADMIN_ENV: ADMIN}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    outputs: dict[str, bytes] = {}  # where -> what it holds

    def run(name: str, *args: str, codes: tuple[int, ...]) -> None:
        result = subprocess.run([sys.executable, "-m", "chatprobe.cli", *args],
                                capture_output=True, cwd=ROOT, timeout=scaled(150),
                                stdin=subprocess.DEVNULL)
        outputs[f"{name} stdout"], outputs[f"{name} stderr"] = result.stdout, result.stderr
        assert result.returncode in codes, (name, result.stdout, result.stderr)

    try:
        # The canary first: a canary run clears its Allure folder of earlier results.
        run("canary", "canary", "--config",
            str(write_canary(tmp_path, out, service.base_url, target, allure)),
            "--json", str(out / "canary.json"), codes=(0,))
        run("canary, wrong token", "canary", "--config",
            str(write_canary(tmp_path, out, service.base_url, wrong, out / "allure-wrong")),
            "--json", str(out / "canary-wrong.json"), codes=(2,))
        # The probe in this process, so that the test knows the run's stamp key.
        stamp_keys = capture_stamp_keys(monkeypatch)  # only this run starts in-process
        capfd.readouterr()
        code = main(["probe", "--target", service.base_url, "--config", str(target),
                     "--messages", "20", "--customers", "2", "--json", str(out / "probe.json"),
                     "--alluredir", str(allure)])
        captured = capfd.readouterr()
        outputs["probe stdout"] = captured.out.encode()
        outputs["probe stderr"] = captured.err.encode()
        assert code == 0, captured
        run("probe, wrong token", "probe", "--target", service.base_url, "--config",
            str(wrong), "--messages", "5", "--customers", "1", "--json",
            str(out / "probe-wrong.json"), "--alluredir", str(allure), codes=(2,))
        shape = tmp_path / "shape.yaml"
        shape.write_text("name: tiny\nstages:\n  - {duration: 3, users: 3, spawn_rate: 3}\n",
                         encoding="utf-8")
        # The swarm's stamp key is made in the Locust master unless the environment names
        # one: named here, so that it can be looked for like the others.
        monkeypatch.setenv(STAMP_KEY_ENV, SWARM_STAMP_KEY.hex())
        run("swarm", "swarm", "--target", service.base_url, "--config", str(target),
            "--shape", str(shape), "--think-scale", "0.1", "--json", str(out / "swarm.json"),
            "--alluredir", str(allure), "--csv", str(out / "locust" / "swarm"), codes=(0, 1))
    finally:
        service.stop()
    # The runs did use the secrets: the agents logged in with the right tokens, and the
    # wrong token was refused (its error messages are among the outputs grepped).
    assert json.loads((out / "probe.json").read_text())["delivered"] == 20
    swarm_run = json.loads((out / "swarm.json").read_text())
    assert swarm_run["delivered"] > 0
    # ... and the swarm signed its stamps with that key: the service's own store says so.
    swarm_codec = StampCodec(swarm_run["run"], SWARM_STAMP_KEY)
    with sqlite3.connect(tmp_path / "service.sqlite3") as db:
        texts = [text for (text,) in db.execute("SELECT text FROM messages")]
    signed = [p for p in map(swarm_codec.parse, texts) if p is not None and not p.foreign]
    assert signed and all(p.valid for p in signed), len(signed)
    refused = json.loads((out / "probe-wrong.json").read_text())["diagnoses"][0]
    assert refused["cause"] == "auth.rejected", refused
    causes = {check["cause"] for check in
              json.loads((out / "canary-wrong.json").read_text())["checks"]}
    assert "auth.rejected" in causes, causes
    assert len(stamp_keys) == 1

    require_allure()
    report = out / "report"
    run("report", "report", "--results", str(allure), "--output", str(report), "--history",
        str(out / "report-history.jsonl"), codes=(0,))
    index = report / "index.html"
    assert index.is_file()
    files = [path for path in out.rglob("*") if path.is_file()]
    for path in files:
        outputs[str(path.relative_to(out))] = path.read_bytes()
    # The single-file report embeds its data base64-encoded: look inside that too.
    for name, content in embedded_files(index).items():
        outputs[f"report, embedded {name}"] = content
    kinds = {path.suffix for path in files}
    assert {".json", ".html", ".prom", ".sqlite3", ".csv", ".jsonl"} <= kinds, kinds
    assert any(path.name.endswith("-result.json") for path in files)

    secrets = {"agent token 1": AGENT_1.encode(), "agent token 2": AGENT_2.encode(),
               "admin token": ADMIN.encode(), "wrong agent token": WRONG.encode(),
               "stamp key": stamp_keys[0], "swarm's stamp key": SWARM_STAMP_KEY}
    leaks = [f"the {what} ({form}) in {where}"
             for what, secret in secrets.items()
             for form, encoded in encodings(secret).items()
             for where, content in outputs.items() if encoded in content]
    assert not leaks, leaks


@pytest.mark.parametrize("value, message", [
    ("not-hex", "must be hex digits"), ("00ff", "must be 16 to 128 hex digits"),
    ("ab" * 65, "must be 16 to 128 hex digits")])
def test_a_bad_swarm_stamp_key_is_a_one_line_error(
        monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    from tests.test_cli import assert_one_line_error, chatprobe

    monkeypatch.setenv(STAMP_KEY_ENV, value)
    # Checked before Locust starts: nothing listens at the target, nothing is sent.
    result = chatprobe("swarm", "--target", "http://127.0.0.1:9", "--shape", "midnight-spike")
    assert_one_line_error(result, 3, f"${STAMP_KEY_ENV} {message}")
