"""From real runs to the rendered report: a probe with injected loss read in a browser, the
canary's trend across runs, and no secret anywhere in results or report."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from chatprobe.cli import main
from chatprobe.report.build import build_report
from chatprobe.report.categories import PLATFORM
from tests.conftest import ServiceProcess, capture_stamp_keys
from tests.test_canary import canary, write_config
from tests.test_report_build import embedded_files, render, require_allure, result_ids


def probe_with_loss(service: ServiceProcess, allure: Path, json_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], bytes]:
    """`chatprobe probe` in this process (so the test knows the run's stamp key) against a
    service that drops 10 % of the pushes."""
    service.ok("POST", "/admin/faults", {"drop": 0.1, "seed": 11})
    keys = capture_stamp_keys(monkeypatch)
    code = main(["probe", "--target", service.base_url, "--messages", "80", "--customers",
                 "4", "--admin-token", service.admin_token, "--deadline-ms", "2000",
                 "--sla-ms", "1000", "--alluredir", str(allure), "--json", str(json_path),
                 "--quiet"])
    assert code == 2
    return json.loads(json_path.read_text()), keys[0]


def test_a_probe_with_loss_reads_as_platform_loss_with_its_evidence_in_the_browser(
        reference_service: ServiceProcess, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    require_allure()
    allure = tmp_path / "allure"
    doc, _ = probe_with_loss(reference_service, allure, tmp_path / "run.json", monkeypatch)
    assert doc["lost"] > 0
    index = build_report(allure, tmp_path / "report")
    (name,) = result_ids(index)
    url = f"{index.as_uri()}#/{result_ids(index)[name]}"
    page = render({url: tmp_path / "report-probe-loss.png"}, tmp_path)[url]
    assert f"Category: {PLATFORM}" in page, page[:3000]
    assert f"lost {doc['lost']}" in page
    first = doc["examples"][0]
    # Each lost message is a step named by its stamp; its hops are the steps inside it.
    assert first["stamp"] in page, page[:3000]
    assert f"lost {first['conversation']} #{first['seq']}" in page


def test_three_canary_runs_give_a_three_point_trend(reference_service: ServiceProcess,
                                                    tmp_path: Path) -> None:
    require_allure()
    history = tmp_path / "trend.jsonl"
    for number in range(3):
        # Each run its own results folder, as cron should: the history carries the trend.
        results = tmp_path / f"results-{number}"
        config = write_config(tmp_path, reference_service.base_url, idle_s=0,
                              alluredir=str(results))
        assert canary(config).returncode == 0
        index = build_report(results, tmp_path / "report", history=history)
    runs = [json.loads(line) for line in history.read_text().splitlines()]
    assert len(runs) == 3
    charts = json.loads(embedded_files(index)["widgets/charts.json"])
    (dynamics,) = [chart for chart in charts["general"].values()
                   if chart["type"] == "statusDynamics"]
    assert len(dynamics["data"]) == 3


def test_no_secret_reaches_results_or_report(reference_service: ServiceProcess,
                                             tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    require_allure()
    allure = tmp_path / "allure"
    # The canary first: each of its runs clears the folder of earlier results.
    config = write_config(tmp_path, reference_service.base_url, idle_s=0,
                          alluredir=str(allure))
    assert canary(config, admin_token=reference_service.admin_token).returncode == 0
    _, stamp_key = probe_with_loss(reference_service, allure, tmp_path / "run.json",
                                   monkeypatch)
    assert len(list(allure.glob("*-result.json"))) == 8 + 1  # the canary's and the probe's
    index = build_report(allure, tmp_path / "report", history=tmp_path / "trend.jsonl")
    secrets = {"agent token": b"demo-probe-1-token", "agent token 2": b"demo-probe-2-token",
               "admin token": reference_service.admin_token.encode(),
               "stamp key (hex)": stamp_key.hex().encode(),
               "stamp key (base64)": base64.b64encode(stamp_key).rstrip(b"=")}
    files = [path for path in [*allure.iterdir(), *index.parent.iterdir(),
                               tmp_path / "trend.jsonl"] if path.is_file()]
    # The single-file report embeds its data base64-encoded: look inside that too.
    contents = [path.read_bytes() for path in files] + list(embedded_files(index).values())
    assert len(contents) > 10
    for what, secret in secrets.items():
        leaks = [content[:80] for content in contents if secret in content]
        assert not leaks, f"the {what} leaked: {leaks}"
    assert not re.search(rb"demo-[a-z0-9-]+-token", b"".join(contents))
