"""The canary suite's engine, shared by probes/ (pytest) and `chatprobe canary`: runs every
target's checks once, side by side, when the first test asks, records every result as soon as it
is known (a JSON line, synced, so a run killed at its budget keeps what it measured), and
reports each result to pytest and Allure.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import pytest

from chatprobe.canary.checks import CheckSettings, check_target
from chatprobe.canary.config import CanaryConfig
from chatprobe.canary.model import CheckResult
from chatprobe.report.categories import category_of, message
from chatprobe.verdict import Status


class CanarySuite:
    """Runs each target's checks once, when its first test asks, and hands out results."""

    def __init__(self, config: CanaryConfig, results_path: str | None, deadline: float,
                 run_id: str) -> None:
        self.config = config
        self.results_path = results_path
        self.deadline = deadline
        self.run_id = run_id
        self.results: dict[str, CheckResult] = {}
        self.ran = False

    def _record(self, result: CheckResult) -> None:
        self.results[result.check_id] = result
        if self.results_path:
            with open(self.results_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(result.to_json()) + "\n")
                handle.flush()
                os.fsync(handle.fileno())

    def result(self, check_id: str) -> CheckResult:
        if not self.ran:
            self.ran = True  # once, whatever happens: never a second round of messages
            asyncio.run(self._run_all())
        found = self.results.get(check_id)
        if found is None:
            raise AssertionError(f"{check_id}: the target's checks ended without a result")
        return found

    async def _run_all(self) -> None:
        """Every target at once (they are independent; the run takes as long as the slowest
        one, not their sum), each target's agents one after the other."""
        settings = CheckSettings(
            self.config.warning_ms, self.config.critical_ms, self.config.idle_s,
            # The deadline is wall-clock (it crosses processes); the checks count in
            # monotonic time.
            time.monotonic() + self.deadline - time.time(), self.config.tls_warn_days)
        outcomes = await asyncio.gather(
            *(check_target(target, settings, self.run_id, self._record)
              for target in self.config.targets), return_exceptions=True)
        for target, outcome in zip(self.config.targets, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                # A harness fault in one target's checks: its unfinished checks could not
                # be judged (UNKNOWN); the other targets' results stand.
                why = f"not judged: harness error {type(outcome).__name__}: {outcome}"
                for check_id in target.check_ids():
                    if check_id not in self.results:
                        self._record(CheckResult.unjudged(check_id, why))


def report(result: CheckResult) -> None:
    """Allure labels that line runs of the same check up in history, then the verdict."""
    try:
        import allure

        # allure-pytest has no type hints.
        dynamic: Any = allure.dynamic
        levels: Any = allure.severity_level
        dynamic.epic(result.target)
        dynamic.feature(result.agent)
        dynamic.story(result.channel)
        dynamic.tag(result.kind)
        dynamic.severity(levels.CRITICAL if result.kind == "receive" else levels.NORMAL)
        if result.profile:
            dynamic.parameter("profile", result.profile)
        if result.latency_ms is not None:
            # Volatile: excluded from the history key so runs of one check line up.
            dynamic.parameter("latency_ms", round(result.latency_ms, 1), excluded=True)
        attach: Any = allure.attach
        attach(json.dumps(result.to_json(), indent=2), name="check result",
               attachment_type=allure.attachment_type.JSON)
    except ImportError:  # allure-pytest is optional for a hand run
        pass
    if result.status is Status.UNKNOWN:
        pytest.skip(result.detail)
    if result.status is Status.CRITICAL:
        # The category prefix sorts the failure in the report (chatprobe.report.categories).
        pytest.fail(message(category_of(result.cause), result.line()), pytrace=False)
    if result.status is Status.WARNING:
        import warnings

        warnings.warn(result.line(), stacklevel=1)
