"""The canary suite: one test per target/agent/channel/check of the canary config."""

from __future__ import annotations

from chatprobe.canary.suite import CanarySuite, report


def test_check(check_id: str, canary: CanarySuite) -> None:
    report(canary.result(check_id))
