"""Webhook alerting for the canary (issue 6, item 5): who gets paged, when, and with what.

The core is pure: :func:`decide` takes the per-check alert state and one run, and returns
the new state and the alerts to send. A check pages once after N consecutive failures,
stays quiet while the failure persists, and sends exactly one recovery when it passes
again; a run in which only the canary's own host is broken changes nothing. The state is
plain JSON (``state_to_json`` / ``state_from_json``) for the canary's SQLite store.

The edge, :func:`send` / :func:`deliver`, POSTs alerts to a webhook in one of four payload
formats (generic JSON, WeCom, DingTalk, Slack) with a short timeout and never raises.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from chatprobe.canary.model import CanaryRun, CheckResult
from chatprobe.config import reject_unknown
from chatprobe.diagnosis import DESCRIPTIONS, Cause
from chatprobe.errors import HarnessError
from chatprobe.redact import one_line, public_url
from chatprobe.verdict import SEVERITY, Status

FORMATS = ("generic", "wecom", "dingtalk", "slack")
ALERT = "alert"
RECOVERY = "recovery"
DEFAULT_AFTER_FAILURES = 3
DEFAULT_TIMEOUT_S = 5.0
# WeCom group robots refuse text over 2048 bytes; DingTalk and Slack allow more, but a page
# should be short anyway.
MAX_CONTENT_BYTES = 2000
MAX_DETAIL_CHARS = 500


@dataclass(frozen=True)
class AlertConfig:
    webhook: str  # a secret: WeCom/DingTalk/Slack put the robot's key in the URL
    format: str = "generic"
    after_failures: int = DEFAULT_AFTER_FAILURES
    timeout_s: float = DEFAULT_TIMEOUT_S
    secret: str | None = None  # DingTalk "sign" security setting (加签): the SEC... secret


@dataclass(frozen=True)
class CheckAlertState:
    """What alerting remembers about one failing (or alerted) check between runs. A check
    that passes and has no open alert has no state at all, so the store only holds
    checks that are failing now."""

    failures: int = 0  # consecutive failed runs
    first_failure: float | None = None  # unix time the current streak started
    alerted: bool = False  # an alert went out and no recovery yet
    status: str = ""  # the latest failing status name
    cause: str | None = None  # the latest failure's cause

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, document: Any) -> CheckAlertState:
        if not isinstance(document, dict):
            raise HarnessError("alert state: each check's state must be a mapping")
        failures = document.get("failures", 0)
        first = document.get("first_failure")
        alerted = document.get("alerted", False)
        status = document.get("status", "")
        cause = document.get("cause")
        if (isinstance(failures, bool) or not isinstance(failures, int) or failures < 0
                or not (first is None or (isinstance(first, int | float)
                                          and not isinstance(first, bool)))
                or not isinstance(alerted, bool) or not isinstance(status, str)
                or not (cause is None or isinstance(cause, str))):
            raise HarnessError("alert state: a check's state has fields of the wrong type")
        return cls(failures, None if first is None else float(first), alerted, status, cause)


# The name chatprobe/canary/runner.py imports.
def state_to_json(state: Mapping[str, CheckAlertState]) -> dict[str, Any]:
    return {check: each.to_json() for check, each in sorted(state.items())}


def state_from_json(document: Any) -> dict[str, CheckAlertState]:
    """The state saved by :func:`state_to_json`; None (nothing saved yet) is empty. A
    corrupt document is a HarnessError: silently starting afresh would forget open alerts
    and so never send their recoveries."""
    if document is None:
        return {}
    if not isinstance(document, dict) or not all(isinstance(k, str) for k in document):
        raise HarnessError("alert state must map check ids to states")
    return {check: CheckAlertState.from_json(each) for check, each in document.items()}


@dataclass(frozen=True)
class Alert:
    event: str  # ALERT or RECOVERY
    check: str  # target/agent/channel/kind
    target: str
    agent: str
    channel: str
    kind: str
    profile: str
    status: str  # the check's status name now (OK for a recovery)
    cause: str | None  # the failure's cause (for a recovery: the cause it recovered from)
    detail: str
    first_failure: float  # unix time the failure streak started
    failures: int  # consecutive failed runs
    run: str  # the run that raised it
    at: float  # unix time of the decision

    def to_json(self) -> dict[str, Any]:
        """The generic webhook payload."""
        return {
            "event": self.event, "check": self.check, "target": self.target,
            "agent": self.agent, "channel": self.channel, "kind": self.kind,
            "profile": self.profile, "status": self.status, "cause": self.cause,
            "cause_description": _describe(self.cause), "detail": self.detail,
            "first_failure": self.first_failure,
            "first_failure_utc": _utc(self.first_failure),
            "consecutive_failures": self.failures, "run": self.run, "at": self.at,
            "text": self.text(),
        }

    def text(self) -> str:
        """The message for chat robots; starts with "chatprobe" so a DingTalk robot's
        custom-keyword security setting can use that word."""
        since = _utc(self.first_failure)
        if self.event == RECOVERY:
            lines = [f"chatprobe RECOVERED {self.check}: OK again after {self.failures} "
                     f"failed run(s), failing since {since} "
                     f"({_span(self.at - self.first_failure)})"]
            if self.cause:
                lines.append(f"was: {self.cause}")
        else:
            lines = [f"chatprobe ALERT {self.check}: {self.status} for {self.failures} "
                     f"consecutive run(s) since {since}"]
            if self.cause:
                description = _describe(self.cause)
                lines.append(f"cause: {self.cause}" + (f" - {description}" if description
                                                       else ""))
            if self.detail:
                lines.append(f"detail: {self.detail}")
        if self.profile:
            lines.append(f"network profile: {self.profile}")
        lines.append(f"run: {self.run}")
        return _fit("\n".join(lines), MAX_CONTENT_BYTES)


def _describe(cause: str | None) -> str:
    try:
        return DESCRIPTIONS.get(Cause(cause), "") if cause else ""
    except ValueError:
        return ""


def _utc(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _span(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


def _fit(text: str, limit: int) -> str:
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[:limit - 3].decode("utf-8", "ignore") + "..."


def _per_check(results: Iterable[CheckResult]) -> dict[str, CheckResult]:
    """One result per check id; a check run under several profiles is as bad as its worst."""
    chosen: dict[str, CheckResult] = {}
    for result in results:
        held = chosen.get(result.check_id)
        if held is None or SEVERITY[result.status] > SEVERITY[held.status]:
            chosen[result.check_id] = result
    return chosen


def _alert(event: str, result: CheckResult, state: CheckAlertState, run: CanaryRun,
           now: float) -> Alert:
    return Alert(
        event=event, check=result.check_id, target=result.target, agent=result.agent,
        channel=result.channel, kind=result.kind, profile=result.profile,
        status=result.status.name,
        cause=result.cause if event == ALERT else state.cause,
        detail=result.detail[:MAX_DETAIL_CHARS] if event == ALERT else "",
        first_failure=state.first_failure if state.first_failure is not None else now,
        failures=state.failures, run=run.run_id, at=now)


def decide(state: Mapping[str, CheckAlertState], run: CanaryRun, after_failures: int,
           now: float) -> tuple[dict[str, CheckAlertState], list[Alert]]:
    """The new alert state and the alerts to send after ``run`` (pure)."""
    if after_failures < 1:
        raise ValueError("after_failures must be at least 1")
    new = dict(state)
    if run.host_broken:
        # The canary cannot reach anything, so its failures say nothing about the targets:
        # no page, and no failure streak grows or resets.
        return new, []
    alerts: list[Alert] = []
    # Checks this run did not reach (a partial run) are not in the loop: they keep state.
    for check, result in _per_check(run.results).items():
        if result.status is Status.UNKNOWN:
            # Not judged (nothing to reply to after a failed receive, the budget ran out):
            # the check that did fail pages for the cause; this one keeps its state. A
            # harness that cannot judge anything is UNKNOWN (3) to the cron monitor instead.
            continue
        previous = new.get(check, CheckAlertState())
        if result.ok:
            if previous.alerted:
                alerts.append(_alert(RECOVERY, result, previous, run, now))
            new.pop(check, None)
            continue
        first = previous.first_failure if previous.failures else (
            result.started or run.started or now)
        current = CheckAlertState(failures=previous.failures + 1, first_failure=first,
                                  alerted=previous.alerted, status=result.status.name,
                                  cause=result.cause)
        if not current.alerted and current.failures >= after_failures:
            current = dataclasses.replace(current, alerted=True)
            alerts.append(_alert(ALERT, result, current, run, now))
        new[check] = current
    return new, alerts


def payload(alert: Alert, format: str) -> dict[str, Any]:
    """The JSON body for one alert in one of FORMATS."""
    if format == "generic":
        return alert.to_json()
    if format in ("wecom", "dingtalk"):
        # Plain text rather than markdown: WeCom's markdown does not render in the WeChat
        # app, and text works with every robot security setting.
        return {"msgtype": "text", "text": {"content": alert.text()}}
    if format == "slack":
        return {"text": alert.text()}
    raise ValueError(f"unknown alert format {format!r}")


def parse_alert_config(document: Any, source: str) -> AlertConfig | None:
    """The canary config's alert section; None when it is absent. ``source`` names the
    section in error messages (e.g. "canary.yaml: alert"). The webhook URL is a secret and
    never appears in a message."""
    if document is None:
        return None
    if not isinstance(document, dict):
        raise HarnessError(f"{source}: must be a mapping with 'webhook'")
    known = {"webhook", "format", "after_failures", "timeout_s", "secret"}
    reject_unknown(document, known, source)
    webhook = document.get("webhook")
    if not isinstance(webhook, str) or not is_http_url(webhook):
        raise HarnessError(f"{source}: 'webhook' must be an http(s):// URL")
    format = document.get("format", "generic")
    if format not in FORMATS:
        raise HarnessError(f"{source}: 'format' must be one of {', '.join(FORMATS)}")
    after = document.get("after_failures", DEFAULT_AFTER_FAILURES)
    if isinstance(after, bool) or not isinstance(after, int) or not 1 <= after <= 1000:
        raise HarnessError(f"{source}: 'after_failures' must be a whole number from 1 to 1000")
    timeout = document.get("timeout_s", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
            0.1 <= timeout <= 60):
        raise HarnessError(f"{source}: 'timeout_s' must be a number between 0.1 and 60")
    secret = document.get("secret")
    if secret is not None and (not isinstance(secret, str) or not secret):
        raise HarnessError(f"{source}: 'secret' must be a non-empty string")
    if secret is not None and format != "dingtalk":
        raise HarnessError(f"{source}: 'secret' is only for format dingtalk (signed robots)")
    return AlertConfig(webhook=webhook, format=format, after_failures=after,
                       timeout_s=float(timeout), secret=secret)


def is_http_url(text: str) -> bool:
    """An http(s) URL with a host (webhooks, pushgateways)."""
    try:
        parts = urllib.parse.urlsplit(text)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. an unbalanced "[" in the host
        return False


def signed_url(webhook: str, secret: str, now_ms: int) -> str:
    """DingTalk's signed-robot URL: HMAC-SHA256 over "timestamp\\nsecret", base64, quoted."""
    to_sign = f"{now_ms}\n{secret}".encode()
    digest = hmac.new(secret.encode(), to_sign, hashlib.sha256).digest()
    sign = urllib.parse.quote_plus(base64.b64encode(digest).decode())
    separator = "&" if urllib.parse.urlsplit(webhook).query else "?"
    return f"{webhook}{separator}timestamp={now_ms}&sign={sign}"


class _Unreachable(Exception):
    """The webhook could not be reached at all; later alerts would only wait out the same
    timeout, so sending stops."""


def _post(alert: Alert, config: AlertConfig) -> str | None:
    """Send one alert; a problem line, or None when the webhook took it."""
    url = config.webhook
    if config.secret is not None:
        url = signed_url(url, config.secret, int(time.time() * 1000))
    body = json.dumps(payload(alert, config.format), ensure_ascii=False).encode()
    request = urllib.request.Request(
        url, data=body, method="POST",
        headers={"Content-Type": "application/json; charset=utf-8",
                 "User-Agent": "chatprobe-canary"})
    try:
        with urllib.request.urlopen(request, timeout=config.timeout_s) as response:
            reply = response.read(65536)
    except urllib.error.HTTPError as exc:
        try:
            text = exc.read(300).decode("utf-8", "replace")
        except Exception:
            text = ""
        return one_line(f"HTTP {exc.code} {exc.reason} {text}")
    except urllib.error.URLError as exc:
        raise _Unreachable(one_line(str(exc.reason))) from None
    except (OSError, ValueError) as exc:  # timeouts while reading, bad status lines
        raise _Unreachable(one_line(str(exc) or type(exc).__name__)) from None
    if config.format in ("wecom", "dingtalk"):
        # Both answer 200 even when they refuse a message (bad key, keyword or signature);
        # the verdict is errcode in the JSON body.
        try:
            answer = json.loads(reply)
        except ValueError:
            return f"answer is not JSON: {one_line(reply[:200].decode('utf-8', 'replace'))}"
        if not isinstance(answer, dict) or answer.get("errcode") != 0:
            code = answer.get("errcode") if isinstance(answer, dict) else None
            message = answer.get("errmsg") if isinstance(answer, dict) else None
            return one_line(f"refused: errcode {code} {message or ''}")
    return None


def _send(alerts: list[Alert], config: AlertConfig) -> list[tuple[Alert, str]]:
    """The alerts that did not get through, each with its problem line."""
    failed: list[tuple[Alert, str]] = []
    where = f"alert webhook {public_url(config.webhook)}"
    for index, alert in enumerate(alerts):
        try:
            problem = _post(alert, config)
        except _Unreachable as exc:
            failed.append((alert, f"{where}: {alert.event} for {alert.check} not sent: {exc}"))
            for rest in alerts[index + 1:]:
                failed.append((rest, f"{where}: {rest.event} for {rest.check} not sent: "
                                     "webhook unreachable"))
            break
        except Exception as exc:  # a bug must not cost the canary its exit code
            problem = one_line(f"{type(exc).__name__}: {exc}")
        if problem is not None:
            failed.append((alert, f"{where}: {alert.event} for {alert.check} not sent: "
                                  f"{problem}"))
    return failed


def send(alerts: list[Alert], config: AlertConfig) -> list[str]:
    """POST each alert; the problems as one-line strings (never raises)."""
    return [problem for _, problem in _send(alerts, config)]


def deliver(state: Mapping[str, CheckAlertState], alerts: list[Alert], config: AlertConfig
            ) -> tuple[dict[str, CheckAlertState], list[str]]:
    """:func:`send`, and the state with every alert that did not get through made pending
    again, so the next run's :func:`decide` sends it (a webhook outage delays a page; it
    does not lose it). Persist the state this returns."""
    new = dict(state)
    failed = _send(alerts, config)
    for alert, _ in failed:
        held = new.get(alert.check)
        if alert.event == ALERT and held is not None:
            new[alert.check] = dataclasses.replace(held, alerted=False)
        elif alert.event == RECOVERY and held is None:
            # The recipients still believe the check is down: keep the alert open so the
            # next passing run recovers it (a new failure continues the same streak).
            new[alert.check] = CheckAlertState(
                failures=alert.failures, first_failure=alert.first_failure, alerted=True,
                cause=alert.cause)
    return new, [problem for _, problem in failed]
