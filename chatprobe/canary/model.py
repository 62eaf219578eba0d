"""What one canary run found: check results, the run's status and its one status line (pure).

A check is identified by ``target/agent/channel/kind`` (stable across runs, so history,
metrics and alerts line up); its status follows the Nagios convention of verdict.Status.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from chatprobe.verdict import SEVERITY, Status, worst

# The kinds of check, in the order a target's checks run.
RECEIVE = "receive"  # the agent logs in and receives a stamped message on the channel
REPLY = "reply"  # the agent's reply reaches the customer
LATENCY = "latency"  # delivery latency against the warning and critical thresholds
IDLE = "idle"  # after an idle period the push channel still delivers
CHECK_KINDS = (RECEIVE, REPLY, LATENCY, IDLE)
# A TLS target's certificate, once per target (agent and channel "*"): WARNING when it
# expires within the configured days, CRITICAL when it is expired or otherwise refused.
CERTIFICATE = "certificate"


@dataclass(frozen=True)
class CheckResult:
    target: str
    agent: str
    channel: str
    kind: str
    status: Status
    cause: str | None = None  # a diagnosis.Cause value when the check failed
    detail: str = ""
    latency_ms: float | None = None
    profile: str = ""  # the network profile the customer sat behind ("" = none)
    started: float = 0.0  # unix time
    duration_s: float = 0.0

    @property
    def check_id(self) -> str:
        return f"{self.target}/{self.agent}/{self.channel}/{self.kind}"

    @property
    def ok(self) -> bool:
        return self.status in (Status.OK, Status.WARNING)

    def line(self) -> str:
        if self.status is Status.OK:
            return f"{self.check_id} OK"
        why = self.detail or "failed"
        return f"{self.check_id} {self.status.name}: " + (
            f"{self.cause} ({why})" if self.cause else why)

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["status"] = self.status.name
        document["check"] = self.check_id
        return document

    @classmethod
    def unjudged(cls, check_id: str, why: str) -> CheckResult:
        """UNKNOWN for a check that did not run to its verdict."""
        target, agent, channel, kind = check_id.split("/", 3)
        return cls(target, agent, channel, kind, Status.UNKNOWN, None, why,
                   started=time.time())

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> CheckResult:
        fields = {key: document[key] for key in (
            "target", "agent", "channel", "kind", "cause", "detail", "latency_ms", "profile",
            "started", "duration_s") if key in document}
        return cls(status=Status[document["status"]], **fields)


@dataclass
class CanaryRun:
    run_id: str
    started: float  # unix time
    results: list[CheckResult] = field(default_factory=list)
    duration_s: float = 0.0
    harness_error: str | None = None  # chatprobe itself could not do the whole job
    partial: bool = False  # stopped before every check had run (budget, signal)
    host_broken: bool = False  # the canary's own host cannot reach anything: do not page

    @property
    def status(self) -> Status:
        """The worst check; a harness problem is UNKNOWN, never CRITICAL, unless a check
        that did run already proved the target broken."""
        if self.host_broken:
            return Status.UNKNOWN
        combined = worst(r.status for r in self.results)
        if self.harness_error is not None or not self.results:
            return combined if combined is Status.CRITICAL else Status.UNKNOWN
        return combined

    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status is not Status.OK]

    def status_line(self) -> str:
        """One line for cron mail, Nagios and humans: status, the first problems, perfdata."""
        status = self.status
        ok = sum(1 for r in self.results if r.status is Status.OK)
        head = f"CHATPROBE CANARY {status.name}"
        parts: list[str] = []
        if self.host_broken:
            parts.append("the canary's own host cannot reach any target or its control "
                         "address; not the targets' fault")
        if self.harness_error:
            parts.append(self.harness_error)
        # One entry per agent, channel and cause: "receive+latency" failing for the same
        # reason is one problem. Checks that could not be judged follow the failures.
        groups: dict[tuple[str, Status, str], list[CheckResult]] = {}
        for r in sorted(self.failures(), key=lambda r: -SEVERITY[r.status]):
            key = (f"{r.target}/{r.agent}/{r.channel}", r.status, r.cause or r.detail)
            groups.setdefault(key, []).append(r)
        entries = [f"{where} {'+'.join(r.kind for r in group)} {status.name}: "
                   + (f"{group[0].cause} ({group[0].detail})" if group[0].cause
                      else group[0].detail)
                   for (where, status, _), group in groups.items()]
        parts.extend(entries[:3])
        if len(entries) > 3:
            parts.append(f"and {len(entries) - 3} more")
        parts.append(f"{ok}/{len(self.results)} checks OK in {self.duration_s:.1f} s"
                     + (" (partial)" if self.partial else ""))
        latencies = [r.latency_ms for r in self.results
                     if r.kind == LATENCY and r.latency_ms is not None]
        perf = f"checks_ok={ok};;;0;{len(self.results)} duration={self.duration_s:.3f}s"
        if latencies:
            perf += f" latency_max={max(latencies):.1f}ms"
        return f"{head} - {'; '.join(parts)} | {perf}"

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run_id, "started": self.started, "status": self.status.name,
                "exit_code": int(self.status), "duration_s": round(self.duration_s, 3),
                "partial": self.partial, "harness_error": self.harness_error,
                "host_broken": self.host_broken,
                "checks": [r.to_json() for r in self.results]}
