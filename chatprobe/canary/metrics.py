"""Prometheus metrics for one canary run, in the style of blackbox_exporter (issue 6, item 4).

``build_registry`` turns a :class:`CanaryRun` into metric families; ``export`` writes them to
a node_exporter textfile and/or pushes them to a Pushgateway. Every value describes the
latest run only (the file and the Pushgateway group are replaced each run), so the rules in
docs/alert-rules.yaml compare gauges, never ``rate()``. docs/prometheus.md lists the metrics.

Labels are bounded by the canary config (target, agent, channel, check kind, profile, and
the closed set of diagnosis causes): never run ids, message ids, details or secrets.
"""

from __future__ import annotations

import math
import re
import urllib.error
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, push_to_gateway, write_to_textfile
from prometheus_client.exposition import basic_auth_handler, default_handler
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric

from chatprobe.canary.alerts import is_http_url
from chatprobe.canary.model import CanaryRun, CheckResult
from chatprobe.config import reject_unknown
from chatprobe.diagnosis import Cause
from chatprobe.errors import HarnessError
from chatprobe.redact import one_line, public_url
from chatprobe.verdict import SEVERITY, Status

DEFAULT_JOB = "chatprobe_canary"
DEFAULT_TIMEOUT_S = 5.0
# Delivery latency buckets (seconds): fine below the 3 s warning threshold, with edges at
# exactly 3 and 12 so those buckets answer "within warning / critical" directly.
LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 30.0, 60.0)

TARGET_LABELS = ("target", "profile")
CHECK_LABELS = ("target", "agent", "channel", "kind", "profile")
PATH_LABELS = ("target", "agent", "channel", "profile")  # one delivery path, all its checks
KNOWN_CAUSES = frozenset(cause.value for cause in Cause)
_JOB_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,99}")
_LABEL_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")


@dataclass(frozen=True)
class PrometheusConfig:
    textfile: Path | None = None  # a *.prom file in node_exporter's textfile directory
    pushgateway: str | None = None  # base URL; user:password@ in it becomes basic auth
    job: str = DEFAULT_JOB
    # Extra Pushgateway grouping labels (e.g. instance: canary-eu): canaries on several
    # hosts pushing with the same job would otherwise replace each other's group.
    grouping: tuple[tuple[str, str], ...] = ()
    timeout_s: float = DEFAULT_TIMEOUT_S


def parse_prometheus_config(document: Any, source: str, *,
                            base: Path | None = None) -> PrometheusConfig | None:
    """The canary config's ``prometheus:`` section; None when it is absent.

    ``source`` names the section in error messages (e.g. "canary.yaml: prometheus"); a
    relative ``textfile`` is taken relative to ``base`` when given.
    """
    if document is None:
        return None
    if not isinstance(document, dict):
        raise HarnessError(f"{source}: must be a mapping with 'textfile' and/or 'pushgateway'")
    known = {"textfile", "pushgateway", "job", "grouping", "timeout_s"}
    reject_unknown(document, known, source)
    textfile: Path | None = None
    raw_textfile = document.get("textfile")
    if raw_textfile is not None:
        # node_exporter only reads *.prom; anything else would be silently ignored.
        if not isinstance(raw_textfile, str) or not raw_textfile.endswith(".prom"):
            raise HarnessError(f"{source}: 'textfile' must be a path ending in .prom")
        textfile = Path(raw_textfile).expanduser()
        if base is not None and not textfile.is_absolute():
            textfile = base / textfile
    gateway = document.get("pushgateway")
    if gateway is not None and (not isinstance(gateway, str) or not is_http_url(gateway)):
        raise HarnessError(f"{source}: 'pushgateway' must be an http(s):// URL")
    if textfile is None and gateway is None:
        raise HarnessError(f"{source}: needs 'textfile' and/or 'pushgateway'")
    job = document.get("job", DEFAULT_JOB)
    if not isinstance(job, str) or not _JOB_RE.fullmatch(job):
        raise HarnessError(f"{source}: 'job' must be a name of letters, digits, '_', '.', "
                           "':' or '-'")
    grouping_raw = document.get("grouping", {})
    if not isinstance(grouping_raw, dict) or not all(
            isinstance(k, str) and _LABEL_NAME_RE.fullmatch(k) and k != "job"
            and isinstance(v, str) and v for k, v in grouping_raw.items()):
        raise HarnessError(f"{source}: 'grouping' must map label names (not job) to "
                           "non-empty strings")
    timeout = document.get("timeout_s", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (
            0.1 <= timeout <= 60):
        raise HarnessError(f"{source}: 'timeout_s' must be a number between 0.1 and 60")
    return PrometheusConfig(textfile=textfile, pushgateway=gateway, job=job,
                            grouping=tuple(sorted(grouping_raw.items())),
                            timeout_s=float(timeout))


safe_target = public_url  # a target as a label value: no credentials, query, fragment


def _cause_label(cause: str | None) -> str:
    # The label set must stay bounded even if a check ever reports a free-text cause.
    if cause is None:
        return ""
    return cause if cause in KNOWN_CAUSES else "other"


def _check_labels(result: CheckResult) -> tuple[str, ...]:
    return (safe_target(result.target), result.agent, result.channel, result.kind,
            result.profile)


def _checks(run: CanaryRun) -> dict[tuple[str, ...], CheckResult]:
    """One result per label set (duplicate series would make the Pushgateway refuse the
    whole push); when a check appears twice, the worse result stands."""
    by_labels: dict[tuple[str, ...], CheckResult] = {}
    for result in run.results:
        key = _check_labels(result)
        held = by_labels.get(key)
        if held is None or SEVERITY[result.status] >= SEVERITY[held.status]:
            by_labels[key] = result
    return by_labels


def _probe_duration(results: list[CheckResult]) -> float:
    """Wall time from the first check's start to the last one's end (checks may overlap);
    the sum of durations when the checks carry no start times."""
    starts = [r.started for r in results if r.started > 0]
    if len(starts) != len(results):
        return sum(r.duration_s for r in results)
    return max(r.started + r.duration_s for r in results) - min(starts)


def _late(result: CheckResult) -> bool:
    # Delivered (a latency was measured) but not OK: it arrived after a threshold.
    return result.latency_ms is not None and result.status in (Status.WARNING,
                                                               Status.CRITICAL)


def _lost(result: CheckResult) -> bool:
    # A proven failure with nothing measured: the probe message never arrived (UNKNOWN
    # means the check could not be judged, which is not a loss).
    return result.latency_ms is None and result.status is Status.CRITICAL


def _histogram_buckets(values_s: list[float]) -> list[tuple[str, float]]:
    # Edges written as Go clients write them ("3", not "3.0"); Prometheus 3 stores both as
    # "3.0" anyway, Prometheus 2 as written.
    buckets = [(f"{edge:g}", float(sum(1 for v in values_s if v <= edge)))
               for edge in LATENCY_BUCKETS_S]
    buckets.append(("+Inf", float(len(values_s))))
    return buckets


def run_metrics(run: CanaryRun, availability: Mapping[str, float]) -> list[Metric]:
    """Every metric family for one run (pure). See docs/prometheus.md."""
    finished = run.started + run.duration_s
    status = run.status
    families: list[Metric] = []

    def gauge(name: str, documentation: str, value: float) -> None:
        families.append(GaugeMetricFamily(name, documentation, value=value))

    gauge("chatprobe_canary_last_run_timestamp_seconds",
          "Unix time the latest canary run finished; alert when it gets old.", finished)
    gauge("chatprobe_canary_run_started_timestamp_seconds",
          "Unix time the latest canary run started.", run.started)
    gauge("chatprobe_canary_run_duration_seconds",
          "Wall time of the latest canary run.", run.duration_s)
    gauge("chatprobe_canary_status",
          "Nagios status of the latest run: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.",
          int(status))
    gauge("chatprobe_canary_partial",
          "1 when the latest run stopped before every check had run (budget, signal).",
          1 if run.partial else 0)
    gauge("chatprobe_canary_harness_error",
          "1 when chatprobe itself could not do the whole job in the latest run.",
          1 if run.harness_error is not None else 0)
    gauge("chatprobe_canary_host_broken",
          "1 when the canary's own host could reach nothing; target metrics are left out.",
          1 if run.host_broken else 0)

    checks_by_status = GaugeMetricFamily(
        "chatprobe_canary_checks", "Checks in the latest run by status.", labels=["status"])
    for each in Status:
        checks_by_status.add_metric(
            [each.name], sum(1 for r in run.results if r.status is each))
    families.append(checks_by_status)

    availability_family = GaugeMetricFamily(
        "chatprobe_availability_ratio",
        "Delivered within SLA over all judged checks in the last hour, per target "
        "(from the canary's history store).", labels=["target"])
    for target, ratio in sorted(availability.items()):
        if math.isfinite(ratio):
            availability_family.add_metric([safe_target(target)], ratio)
    families.append(availability_family)

    if run.host_broken:
        # The canary's host is cut off: every target would look down. Leaving the target
        # metrics out (the file and group are replaced) keeps the target rules from paging;
        # chatprobe_canary_host_broken tells the canary's own owner.
        return families

    checks = _checks(run)
    per_target: dict[tuple[str, str], list[CheckResult]] = {}
    per_path: dict[tuple[str, ...], list[CheckResult]] = {}
    for labels, result in checks.items():
        per_target.setdefault((labels[0], result.profile), []).append(result)
        per_path.setdefault((labels[0], result.agent, result.channel, result.profile),
                            []).append(result)

    success = GaugeMetricFamily(
        "probe_success", "1 when every check of the target passed (OK or WARNING).",
        labels=list(TARGET_LABELS))
    duration = GaugeMetricFamily(
        "probe_duration_seconds", "How long the target's checks took, first start to last end.",
        labels=list(TARGET_LABELS))
    for key, results in sorted(per_target.items()):
        success.add_metric(list(key), 1 if all(r.ok for r in results) else 0)
        duration.add_metric(list(key), _probe_duration(results))
    families += [success, duration]

    check_success = GaugeMetricFamily(
        "chatprobe_check_success", "1 when the check passed (OK or WARNING).",
        labels=list(CHECK_LABELS))
    check_status = GaugeMetricFamily(
        "chatprobe_check_status", "The check's Nagios status: 0 OK, 1 WARNING, 2 CRITICAL, "
        "3 UNKNOWN.", labels=list(CHECK_LABELS))
    check_duration = GaugeMetricFamily(
        "chatprobe_check_duration_seconds", "How long the check took.",
        labels=list(CHECK_LABELS))
    check_latency = GaugeMetricFamily(
        "chatprobe_check_latency_seconds",
        "Delivery latency the check measured (absent when nothing arrived).",
        labels=list(CHECK_LABELS))
    failure = GaugeMetricFamily(
        "chatprobe_check_failure_info",
        "1 for each check that is not OK, with its diagnosis cause ('' if none).",
        labels=[*CHECK_LABELS, "cause"])
    for labels, result in sorted(checks.items()):
        values = list(labels)
        check_success.add_metric(values, 1 if result.ok else 0)
        check_status.add_metric(values, int(result.status))
        check_duration.add_metric(values, result.duration_s)
        if result.latency_ms is not None:
            check_latency.add_metric(values, result.latency_ms / 1000)
        if result.status is not Status.OK:
            failure.add_metric([*values, _cause_label(result.cause)], 1)
    families += [check_success, check_status, check_duration, check_latency, failure]

    latency = HistogramMetricFamily(
        "chatprobe_delivery_latency_seconds",
        "Delivery latencies the latest run measured, per delivery path (replaced each run: "
        "not cumulative).", labels=list(PATH_LABELS))
    late = GaugeMetricFamily(
        "chatprobe_late_messages",
        "Probe messages of the latest run delivered after a latency threshold.",
        labels=list(PATH_LABELS))
    lost = GaugeMetricFamily(
        "chatprobe_lost_messages",
        "Probe messages of the latest run that never arrived (CRITICAL, nothing measured).",
        labels=list(PATH_LABELS))
    for path, results in sorted(per_path.items()):
        values_s = [r.latency_ms / 1000 for r in results if r.latency_ms is not None]
        latency.add_metric(list(path), _histogram_buckets(values_s), sum(values_s))
        late.add_metric(list(path), sum(1 for r in results if _late(r)))
        lost.add_metric(list(path), sum(1 for r in results if _lost(r)))
    families += [latency, late, lost]
    return families


class _RunCollector:
    """A fixed set of families. Built by hand rather than with Gauge/Histogram objects so no
    ``_created`` series appear and nothing is registered in the global default registry."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return list(self._families)


def build_registry(run: CanaryRun, availability: Mapping[str, float]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_RunCollector(run_metrics(run, availability)))
    return registry


def _push_problem(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        # The Pushgateway says why it refused a push (e.g. inconsistent help text) in the body.
        try:
            body = exc.read(300).decode("utf-8", "replace")
        except Exception:
            body = ""
        return one_line(Exception(f"HTTP {exc.code} {exc.reason} {body}"))
    if isinstance(exc, urllib.error.URLError):
        return one_line(exc.reason if isinstance(exc.reason, BaseException)
                         else Exception(str(exc.reason)))
    return one_line(exc)


def _push_handler(gateway: str) -> tuple[str, Callable[..., Callable[[], None]]]:
    """The gateway URL without credentials, and the handler that sends them as basic auth
    (urllib cannot use user:password@ in a URL)."""
    parts = urllib.parse.urlsplit(gateway)
    if parts.username is None:
        return gateway, default_handler
    username = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    bare = urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2],
                                    parts.path, parts.query, parts.fragment))

    def handler(url: str, method: str, timeout: float | None,
                headers: list[tuple[str, str]], data: bytes) -> Callable[[], None]:
        return basic_auth_handler(url, method, timeout, headers, data, username, password)

    return bare, handler


def export(run: CanaryRun, availability: Mapping[str, float],
           config: PrometheusConfig) -> list[str]:
    """Write the textfile and/or push to the Pushgateway. Problems come back as one-line
    strings, never as exceptions: broken monitoring plumbing must not break the canary."""
    problems: list[str] = []
    try:
        registry = build_registry(run, availability)
    except Exception as exc:  # a bug here must still not cost the run its exit code
        return [f"prometheus: could not build metrics: {one_line(exc)}"]
    if config.textfile is not None:
        try:
            # write_to_textfile writes a temporary file beside the target and renames it,
            # so node_exporter never reads half a file.
            write_to_textfile(str(config.textfile), registry)
        except OSError as exc:
            problems.append(f"prometheus textfile {config.textfile}: "
                            f"{exc.strerror or one_line(exc)}")
        except Exception as exc:
            problems.append(f"prometheus textfile {config.textfile}: {one_line(exc)}")
    if config.pushgateway is not None:
        url, handler = _push_handler(config.pushgateway)
        try:
            # PUT replaces the whole group: checks missing from this run disappear instead
            # of lingering with old values, exactly as with the textfile.
            push_to_gateway(url, job=config.job, registry=registry,
                            grouping_key=dict(config.grouping) or None,
                            timeout=config.timeout_s, handler=handler)
        except Exception as exc:  # URLError, timeouts, HTTP errors, bad replies alike
            problems.append(f"prometheus pushgateway {public_url(config.pushgateway)}: "
                            f"{_push_problem(exc)}")
    return problems
