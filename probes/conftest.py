"""The canary suite's pytest wiring: its options and one test per configured check.

`chatprobe canary --config FILE` runs this suite in a child process with a hard time budget;
it can also run by hand: `pytest probes --canary-config FILE [--alluredir DIR]`. Each check's
result is appended to the results file (--canary-results) as soon as it is known, so a run
killed at its budget still keeps everything it measured.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from chatprobe.canary.config import CanaryConfig, load_canary
from chatprobe.canary.suite import CanarySuite
from chatprobe.errors import HarnessError
from chatprobe.paths import fixtures_dir


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chatprobe canary")
    group.addoption("--canary-config", default=os.environ.get(
        "CHATPROBE_CANARY_CONFIG", str(fixtures_dir() / "canary-demo.yaml")),
        help="canary config file (default: $CHATPROBE_CANARY_CONFIG or the demo config)")
    group.addoption("--canary-results", default=None,
                    help="append each check's result to this file as a JSON line")
    group.addoption("--canary-deadline", type=float, default=None,
                    help="unix time by which every check must be done (the run's budget)")
    group.addoption("--canary-run-id", default=None, help="the run's id (stamps, history)")


def _config(config: pytest.Config) -> CanaryConfig:
    try:
        return load_canary(Path(config.getoption("--canary-config")))
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "check_id" in metafunc.fixturenames:
        checks = _config(metafunc.config).check_ids()
        metafunc.parametrize("check_id", checks, ids=checks)


@pytest.fixture(scope="session")
def canary(request: pytest.FixtureRequest) -> CanarySuite:
    config = _config(request.config)
    deadline = request.config.getoption("--canary-deadline") or (
        time.time() + config.budget_s)
    run_id = request.config.getoption("--canary-run-id") or f"canary{int(time.time())}"
    return CanarySuite(config, request.config.getoption("--canary-results"), deadline,
                       run_id)
