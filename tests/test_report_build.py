"""`chatprobe report`: the single-file Allure 3 report built from real result files, opened in
a real headless Chromium (its own --dump-dom and --screenshot), its history trend and what it
does with masked parameters.

Needs Node.js + npm (Allure 3 is installed from the npm registry on first use into
reports/node_modules) and Debian's chromium; without them these tests are skipped, or fail
in CI. Screenshots are kept under the test's tmp_path and copied to reports/artifacts/
(git-ignored).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, NoReturn

import pytest

from chatprobe import __version__
from chatprobe.errors import HarnessError
from chatprobe.report.build import (
    ALLURE_VERSION,
    MARKER,
    _clear_killed_build,
    build_report,
    default_history_path,
    ensure_allure,
)
from chatprobe.report.categories import HARNESS, PLATFORM, allure_categories, message
from chatprobe.report.command import add_report_parser, cmd_report
from tests.conftest import ROOT, scaled
from tests.servers import require_binary

ARTIFACTS = ROOT / "reports" / "artifacts"
SECRET = "sk-chatprobe-7f3a9e1c-not-for-reports"
ADMIN_TOKEN = "admin-4c1d22b0-hidden-from-reports"
SIGNING_KEY = "stampkey-91e0aa57-masked-step-param"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                  # Virtual time: the single-file app decodes its embedded data and renders
                  # before Chromium dumps the DOM; idle time passes instantly.
                  "--virtual-time-budget=15000")


def skip_or_fail(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def require_allure() -> None:
    if shutil.which("node") is None:
        skip_or_fail("node is not installed (bash dev.sh test installs nodejs and npm)")
    try:
        ensure_allure()
    except HarnessError as exc:
        skip_or_fail(f"Allure 3 is not installed and could not be: {exc}")


# --- realistic result files ------------------------------------------------------------------

def _result(directory: Path, name: str, status: str, text: str, *,
            parameters: list[dict[str, Any]] | None = None,
            steps: list[dict[str, Any]] | None = None,
            attachments: list[dict[str, str]] | None = None) -> str:
    now_ms = int(time.time() * 1000)
    result = {
        "uuid": str(uuid.uuid4()),
        "name": name,
        "fullName": f"chatprobe.probe::{name}",
        "testCaseId": name,
        "status": status,
        "statusDetails": {"message": text, "trace": ""},
        "stage": "finished",
        "start": now_ms - 30_000,
        "stop": now_ms,
        "labels": [{"name": "epic", "value": "delivery"},
                   {"name": "feature", "value": "probe"},
                   {"name": "story", "value": "http://127.0.0.1:8765"},
                   {"name": "suite", "value": "chatprobe probe"},
                   {"name": "severity", "value": "critical" if status != "passed" else "normal"}],
        "parameters": [{"name": "target", "value": "http://127.0.0.1:8765"},
                       {"name": "run", "value": str(uuid.uuid4()), "excluded": True},
                       *(parameters or [])],
        "steps": steps or [],
        "attachments": attachments or [],
    }
    (directory / f"{result['uuid']}-result.json").write_text(json.dumps(result, indent=2))
    return name


def write_results(directory: Path, *, extra_parameters: list[dict[str, Any]] | None = None,
                  steps: list[dict[str, Any]] | None = None) -> None:
    """A passed probe, one that lost 7 messages (platform loss) and one the harness broke."""
    directory.mkdir(parents=True, exist_ok=True)
    _result(directory, "probe clean", "passed", "")
    evidence = f"{uuid.uuid4()}-attachment.json"
    (directory / evidence).write_text(json.dumps({"lost": [
        {"stamp": f"cp1-{n:04d}", "message_id": f"m-{n}", "agent": "probe-1",
         "hops": {"sent": 1000.0 + n, "acked": 1003.1 + n, "assigned": 1004.0 + n}}
        for n in range(7)]}))
    _result(directory, "probe lossy-wifi", "failed",
            message(PLATFORM, "sent 200, delivered 193, late 0, lost 7; p99 412.5 ms\n"
                    "lost x7: the service accepted the message but never pushed it"),
            parameters=[{"name": "profile", "value": "lossy-wifi"}, *(extra_parameters or [])],
            steps=steps, attachments=[{"name": "lost messages", "source": evidence,
                                       "type": "application/json"}])
    _result(directory, "probe vpn-overseas", "broken",
            message(HARNESS, "the fault proxy could not bind 127.0.0.1:0"))
    (directory / "environment.properties").write_text(
        "target=http://127.0.0.1:8765\nprofiles=clean,lossy-wifi,vpn-overseas\n")
    (directory / "executor.json").write_text(json.dumps(
        {"name": "chatprobe canary", "type": "cron", "buildName": "canary run 42",
         "buildOrder": 42}))


# --- reading a built report ----------------------------------------------------------------

def embedded_files(index: Path) -> dict[str, bytes]:
    """The report's data files, which the single-file page embeds base64-encoded."""
    found = re.findall(r'\bd\("([^"]+)","([^"]*)"\)', index.read_text(encoding="utf-8"))
    return {name: base64.b64decode(value) for name, value in found}


def result_ids(index: Path) -> dict[str, str]:
    """Test name -> the id Allure gives its result (the page's #/<id> route)."""
    by_id = json.loads((index.parent / "test-results.json").read_text())["byId"]
    return {entry["name"]: result_id for result_id, entry in by_id.items()}


def render(pages: dict[str, Path], work: Path) -> dict[str, str]:
    """Open each URL in its own headless Chromium, all at once (start-up dominates); the
    rendered DOM of each as visible text. Keeps each screenshot (the URL's value) and a copy
    in reports/artifacts/."""
    chromium = require_binary("chromium")
    running: dict[str, subprocess.Popen[str]] = {}
    try:
        for url, screenshot in pages.items():
            profile = work / f"chromium-{uuid.uuid4().hex[:8]}"
            profile.mkdir(parents=True)
            command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                       f"--screenshot={screenshot}", "--dump-dom", url]
            # Its own session: the renderer and GPU helpers go with it whatever happens.
            running[url] = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        texts = {}
        for url, proc in running.items():
            try:
                dom, _ = proc.communicate(timeout=scaled(60))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"chromium did not render {url} in time") from None
            assert proc.returncode == 0, f"chromium exited with {proc.returncode} on {url}"
            texts[url] = visible_text(dom)
    finally:
        for proc in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=scaled(10))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for screenshot in pages.values():
        assert screenshot.is_file() and screenshot.stat().st_size > 0, f"no {screenshot.name}"
        shutil.copy(screenshot, ARTIFACTS / screenshot.name)
    return texts


def visible_text(dom: str) -> str:
    body = dom[dom.find("<body"):]
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", body, flags=re.DOTALL)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body)))


# --- tests ---------------------------------------------------------------------------------

def test_the_browser_shows_the_runs_numbers_categories_and_environment(tmp_path: Path) -> None:
    require_allure()
    results = tmp_path / "allure-results"
    write_results(results)
    index = build_report(results, tmp_path / "report")
    raw = index.read_text(encoding="utf-8")
    # The numbers are only in base64 data: any found in the page below were rendered by JS.
    assert "lost 7" not in raw and "Category:" not in raw
    assert "googletagmanager" not in raw  # no call-outs from a report opened from disk
    ids = result_ids(index)

    failed_url = f"{index.as_uri()}#/{ids['probe lossy-wifi']}"
    categories_url = f"{index.as_uri()}#/categories"
    pages = render({failed_url: tmp_path / "report-failed-probe.png",
                    categories_url: tmp_path / "report-categories.png",
                    index.as_uri(): tmp_path / "report-overview.png"}, tmp_path)
    failed, categories, overview = pages[failed_url], pages[categories_url], pages[index.as_uri()]
    assert "lost 7" in failed and "p99 412.5 ms" in failed, failed[:2000]
    assert f"Category: {PLATFORM}" in failed, failed[:2000]
    assert "lossy-wifi" in failed
    assert PLATFORM in categories and HARNESS in categories, categories[:2000]
    # environment.properties and executor.json (Metadata), allurerc variables (Variables)
    assert "clean,lossy-wifi,vpn-overseas" in overview, overview[:2000]
    assert "canary run 42" in overview and "chatprobe canary" in overview
    assert f"chatprobe {__version__}" in overview, overview[:2000]
    for name in ("probe clean", "probe lossy-wifi", "probe vpn-overseas"):
        assert name in overview


def test_three_builds_give_a_three_point_trend(tmp_path: Path) -> None:
    require_allure()
    results = tmp_path / "allure-results"
    write_results(results)
    history = tmp_path / "trend.jsonl"
    for _ in range(3):
        index = build_report(results, tmp_path / "report", history=history)
    runs = [json.loads(line) for line in history.read_text().splitlines()]
    assert len(runs) == 3 and len({run["uuid"] for run in runs}) == 3
    charts = json.loads(embedded_files(index)["widgets/charts.json"])
    (dynamics,) = [chart for chart in charts["general"].values()
                   if chart["type"] == "statusDynamics"]
    assert len(dynamics["data"]) == 3  # two earlier builds + this one
    ids = result_ids(index)
    url = f"{index.as_uri()}#/{ids['probe lossy-wifi']}/history"
    charts_url = f"{index.as_uri()}#/charts"
    pages = render({url: tmp_path / "report-history.png",
                    charts_url: tmp_path / "report-trend.png"}, tmp_path)
    page, charts_page = pages[url], pages[charts_url]
    assert re.search(r"\bHistory 2\b", page), page[:2000]  # the two earlier runs
    assert "Status dynamics" in charts_page and "Latest" in charts_page, charts_page[:2000]


def test_masked_and_hidden_parameters_do_not_reach_the_report(tmp_path: Path) -> None:
    require_allure()
    results = tmp_path / "allure-results"
    now_ms = int(time.time() * 1000)
    write_results(results, extra_parameters=[
        {"name": "agent token", "value": SECRET, "mode": "masked"},
        {"name": "admin token", "value": ADMIN_TOKEN, "mode": "hidden"},
    ], steps=[{"name": "sign stamps", "status": "passed", "stage": "finished",
               "start": now_ms - 20_000, "stop": now_ms - 19_000,
               "parameters": [{"name": "signing key", "value": SIGNING_KEY,
                               "mode": "masked", "excluded": True}]}])
    history = tmp_path / "history.jsonl"
    index = build_report(results, tmp_path / "report", history=history)

    data = embedded_files(index)
    assert data, "the single-file report embeds no data"
    places = {f"embedded {name}": content for name, content in data.items()}
    places |= {path.name: path.read_bytes() for path in index.parent.iterdir()}
    places["history"] = history.read_bytes()
    for secret in (SECRET, ADMIN_TOKEN, SIGNING_KEY):
        leaks = [place for place, content in places.items() if secret.encode() in content]
        assert not leaks, f"{secret} leaked into {leaks}"

    ids = result_ids(index)
    shown = json.loads(data[f"data/test-results/{ids['probe lossy-wifi']}.json"])
    parameters = {p["name"]: p["value"] for p in shown["parameters"]}
    assert parameters["agent token"] == "<masked>"  # masked: name kept, value replaced
    assert "admin token" not in parameters  # hidden: left out entirely
    (step,) = [s for s in shown["steps"] if s.get("name") == "sign stamps"]
    assert {p["name"]: p["value"] for p in step["parameters"]} == {"signing key": "<masked>"}


def report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatprobe")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_the_command_prints_the_url_rebuilds_in_place_and_bounds_the_history(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_allure()
    # Allure takes result folders as glob patterns; this name must still be read literally.
    results = tmp_path / "runs[1] {a,b}*"
    write_results(results)
    before = {path.name for path in results.iterdir()}
    output = tmp_path / "site" / "report"
    args = report_parser().parse_args(["report", "--results", str(results),
                                       "--output", str(output), "--history-limit", "1"])
    for _ in range(2):  # the second build replaces the first
        assert cmd_report(args) == 0
        printed = capsys.readouterr().out.strip()
        assert printed == f"chatprobe report: {(output / 'index.html').as_uri()}"
    assert sorted(path.name for path in output.iterdir()) == sorted(
        [MARKER, "index.html", "summary.json", "test-results.json"])
    # The history is bounded: the limit of 1 kept only the newest build.
    (kept,) = default_history_path(output).read_text().splitlines()
    report_id = json.loads((output / "summary.json").read_text())["meta"]["reportId"]
    assert json.loads(kept)["uuid"] == report_id
    # Only categories.json (for Allure 2) is added to the results; the allurerc is not.
    assert {path.name for path in results.iterdir()} - before == {"categories.json"}
    assert json.loads((results / "categories.json").read_text()) == allure_categories()
    # Nothing left behind next to the report but the history and the lock files.
    leftovers = {path.name for path in output.parent.iterdir()} - {"report"}
    assert leftovers == {"report-history.jsonl", ".report.lock", "report-history.jsonl.lock"}


@pytest.mark.parametrize(("case", "expected"), [
    ("missing", "no Allure results at"),
    ("empty", "holds no Allure results"),
    ("file", "is not a directory"),
    ("inside", "must not be inside the results"),
    ("foreign", "refusing to replace"),
])
def test_bad_input_is_a_one_line_harness_error(tmp_path: Path, case: str,
                                               expected: str) -> None:
    results = tmp_path / "results"
    output = tmp_path / "report"
    if case == "empty":
        results.mkdir()
    elif case == "file":
        results.write_text("not a folder")
    elif case == "inside":
        write_results(results)
        output = results / "report"
    elif case == "foreign":
        write_results(results)
        output.mkdir()
        (output / "notes.txt").write_text("someone's work")
    args = report_parser().parse_args(["report", "--results", str(results),
                                       "--output", str(output)])
    with pytest.raises(HarnessError) as caught:
        cmd_report(args)
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    if case == "foreign":
        assert (output / "notes.txt").read_text() == "someone's work"


def _reports_copy(tmp_path: Path) -> Path:
    reports = tmp_path / "reports"
    reports.mkdir()
    for name in ("package.json", "package-lock.json"):
        shutil.copy(ROOT / "reports" / name, reports / name)
    return reports


def test_missing_npm_is_a_one_line_harness_error(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    node = shutil.which("node")
    if node is None:
        skip_or_fail("node is not installed (bash dev.sh test installs nodejs and npm)")
    reports = _reports_copy(tmp_path)
    tools = tmp_path / "bin"  # a PATH with node and without npm
    tools.mkdir()
    (tools / "node").symlink_to(node)
    monkeypatch.setenv("PATH", str(tools))
    with pytest.raises(HarnessError, match=r"^npm is not installed") as caught:
        ensure_allure(reports)
    assert "\n" not in str(caught.value)


def test_a_failing_npm_ci_is_a_one_line_harness_error(tmp_path: Path) -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        skip_or_fail("node and npm are not installed (bash dev.sh test installs them)")
    reports = _reports_copy(tmp_path)
    (reports / "package-lock.json").write_text("{ not a lock file")  # fails before any fetch
    with pytest.raises(HarnessError, match=r"^npm ci failed \(exit \d+\): ") as caught:
        ensure_allure(reports)
    assert "\n" not in str(caught.value) and str(reports / ".npm-install.log") in str(caught.value)
    assert not (reports / "node_modules" / "allure").exists()


def test_the_pinned_allure_is_the_version_the_build_expects() -> None:
    package = json.loads((ROOT / "reports" / "package.json").read_text())
    lock = json.loads((ROOT / "reports" / "package-lock.json").read_text())
    assert package["dependencies"] == {"allure": ALLURE_VERSION}  # exact, no range
    assert lock["packages"]["node_modules/allure"]["version"] == ALLURE_VERSION


def test_a_build_clears_what_a_killed_build_left_and_puts_the_old_report_back(
        tmp_path: Path) -> None:
    """Killed between its two renames, a build left no report: its finished new report
    (marker written last) goes in place, else the previous one renamed aside; the halves
    of killed builds go (the build lock is held); nothing of another report is touched."""
    output = tmp_path / "report[1]"  # a glob character in the name must not widen the sweep
    old = tmp_path / ".report[1].old-1a2b3c4d"
    old.mkdir()
    (old / "index.html").write_text("the previous report")
    unfinished = tmp_path / ".report[1].new-abcd1234"
    unfinished.mkdir()
    other = tmp_path / ".report1.new-abcd1234"  # another report's build, running
    other.mkdir()
    also_other = tmp_path / ".report[1].old-foo.new-abcd1234"  # report "report[1].old-foo"
    also_other.mkdir()
    _clear_killed_build(output)
    assert (output / "index.html").read_text() == "the previous report"
    assert not old.exists() and not unfinished.exists()
    assert other.is_dir() and also_other.is_dir()

    shutil.rmtree(output)
    old.mkdir()
    finished = tmp_path / ".report[1].new-efgh5678"
    finished.mkdir()
    (finished / "index.html").write_text("the new report")
    (finished / MARKER).write_text("{}")
    _clear_killed_build(output)
    assert (output / "index.html").read_text() == "the new report"
    assert not old.exists() and not finished.exists()
