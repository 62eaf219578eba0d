"""Allure result files for runs outside pytest: a probe, a swarm (edge: writes files).

Allure 2 and 3 both read ``*-result.json`` with attachments beside them. What goes in is
chosen so an engineer can read an incident from the report alone:

- a probe: one result per target x network profile; each lost or late message as a step
  with its stamp, the platform's message id, the agent and every hop time the protocol
  exposes; the run's configuration (secrets masked) and the summary JSON attached;
- a swarm: one result per scenario x network profile x SLO (p99 latency, loss,
  availability), passed or failed against its threshold, with the plots attached;
- every failure's message starts with its category (chatprobe.report.categories);
- history ids leave volatile values (run ids, seeds, times) out, so runs line up in trends.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatprobe import __version__
from chatprobe.config import TargetConfig
from chatprobe.redact import mask_secrets, public_url, scrub
from chatprobe.report.categories import (
    HARNESS,
    PERMISSION,
    PLATFORM,
    SLA,
    allure_categories,
    category_of,
    message,
)
from chatprobe.verdict import Status, document_status, render_table

ALLURE_STATUS = {Status.OK: "passed", Status.WARNING: "failed", Status.CRITICAL: "failed",
                 Status.UNKNOWN: "broken"}
EVIDENCE_STEPS = 50  # lost/late messages shown one by one; the rest are in the attachments


def masked_config(config: TargetConfig) -> dict[str, Any]:
    """The target config as run, with every secret replaced (tokens, the admin token,
    passwords anywhere in ``extra``)."""
    masked: dict[str, Any] = scrub(dataclasses.asdict(config))
    return masked


def _history_id(*parts: str) -> str:
    return hashlib.md5("\x1f".join(parts).encode(), usedforsecurity=False).hexdigest()


@dataclass
class Result:
    """One Allure test result under construction."""

    directory: Path
    name: str
    full_name: str
    history_key: tuple[str, ...]
    status: str = "passed"
    message: str = ""
    trace: str = ""
    start_ms: int = 0
    stop_ms: int = 0
    labels: list[dict[str, str]] = field(default_factory=list)
    parameters: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[dict[str, str]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""

    def label(self, name: str, value: str) -> None:
        self.labels.append({"name": name, "value": value})

    def parameter(self, name: str, value: Any, excluded: bool = False) -> None:
        entry: dict[str, Any] = {"name": name, "value": str(value)}
        if excluded:
            entry["excluded"] = True
        self.parameters.append(entry)

    def attachment_file(self, name: str, content: str | bytes, mime: str,
                        extension: str) -> dict[str, str]:
        """Write an attachment's file; the returned entry goes on the result or a step."""
        source = f"{uuid.uuid4()}-attachment.{extension}"
        data = content.encode("utf-8") if isinstance(content, str) else content
        (self.directory / source).write_bytes(data)
        return {"name": name, "source": source, "type": mime}

    def attach(self, name: str, content: str | bytes, mime: str, extension: str) -> None:
        self.attachments.append(self.attachment_file(name, content, mime, extension))

    def write(self) -> Path:
        history_id = _history_id(*self.history_key)
        document = {
            "uuid": str(uuid.uuid4()),
            "historyId": history_id,
            "testCaseId": history_id,
            "name": self.name,
            "fullName": self.full_name,
            "status": self.status,
            "statusDetails": {"message": self.message, "trace": self.trace},
            "stage": "finished",
            "description": self.description,
            "start": self.start_ms,
            "stop": self.stop_ms,
            "labels": self.labels,
            "parameters": self.parameters,
            "attachments": self.attachments,
            "steps": self.steps,
        }
        path = self.directory / f"{document['uuid']}-result.json"
        path.write_text(json.dumps(document, indent=2), encoding="utf-8")
        return path


def write_run_info(directory: Path, kind: str, target: str, extra: dict[str, str]) -> None:
    """environment.properties, executor.json and categories.json (Allure 2; Allure 3 takes
    its categories from the report config, chatprobe.report.build)."""
    directory.mkdir(parents=True, exist_ok=True)
    environment = {"chatprobe": __version__, "kind": kind, "target": public_url(target),
                   "host": socket.gethostname(), "python": platform.python_version(),
                   **extra}
    lines = [f"{key}={_property(value)}" for key, value in environment.items()]
    (directory / "environment.properties").write_text("\n".join(lines) + "\n",
                                                        encoding="utf-8")
    executor = {"name": "chatprobe", "type": kind, "buildName": f"chatprobe {kind}",
                "buildOrder": int(time.time())}
    (directory / "executor.json").write_text(json.dumps(executor), encoding="utf-8")
    (directory / "categories.json").write_text(json.dumps(allure_categories(), indent=2),
                                               encoding="utf-8")


def _property(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", " ")


# -- a probe ------------------------------------------------------------------------------

def _dominant(doc: dict[str, Any]) -> tuple[str, str]:
    """The category and one-line reason of a failed run: a run-level cause first, then the
    most frequent cause of the lost messages, then of the late ones."""
    rows = doc.get("diagnoses") or []
    for outcome in ("run", "lost", "late"):
        for row in rows:
            if row["outcome"] == outcome:
                return category_of(row["cause"]), row["explanation"]
    if doc.get("late"):
        return SLA, f"{doc['late']} messages later than {doc['sla_ms']:g} ms"
    p99, threshold = doc["latency_ms"].get("p99"), doc.get("p99_warning_ms")
    if threshold is not None and p99 is not None and p99 > threshold:
        return SLA, f"p99 {p99} ms above the {threshold:g} ms threshold"
    return category_of(None), "failed"


def run_status(doc: dict[str, Any]) -> tuple[str, str]:
    """Allure status and message for a probe or swarm document."""
    status = Status[str(doc["status"])]
    counts = (f"sent {doc['sent']}, delivered {doc['delivered']}, late {doc['late']}, "
              f"lost {doc['lost']}; p99 {doc['latency_ms']['p99']} ms")
    if doc.get("harness_error"):
        return "broken", message(HARNESS, f"{doc['harness_error']}; {counts}")
    invalid = doc.get("valid") is False
    if invalid and document_status(doc) is Status.UNKNOWN:
        reasons = "; ".join(doc.get("invalid_reasons", []))
        return "broken", message(HARNESS, f"run invalid, the generator was the bottleneck: "
                                          f"{reasons}; {counts}")
    if status is Status.OK:
        return "passed", counts
    if invalid:  # only what no generator delay can cause is judged (document_status)
        misrouted, forged = doc.get("misrouted", 0), doc.get("forged", 0)
        category = PERMISSION if misrouted else PLATFORM
        return ALLURE_STATUS[status], message(category, (
            f"{counts}. {misrouted} misrouted, {forged} forged (altered in transit): no "
            "generator delay causes these. The run is invalid (its generator fell behind), "
            "so its loss and latency are not judged."))
    category, why = _dominant(doc)
    # A loss the probe's own delay could explain, beside a lateness that stands.
    note = f" Note: {doc['own_delay_note']}." if doc.get("own_delay_note") else ""
    return ALLURE_STATUS[status], message(category, f"{counts}. {why}{note}")


def _frames_text(frames: list[dict[str, Any]], stamp: str) -> str:
    # The message's own frames (its stamp is in them) are marked with '>'.
    lines = [f"{'>' if stamp and stamp + ':' in str(frame['frame']) else ' '}"
             f"{frame['at_ms']:>+10.1f} ms  {frame['link']:<24} {frame['direction']:<3} "
             f"{mask_secrets(str(frame['frame']))}" for frame in frames]
    return ("times are ms after the message was due; 'out' = sent by chatprobe; '>' = this "
            "message\n" + "\n".join(lines) + "\n")


def _evidence_step(example: dict[str, Any], profile: str, at_ms: int,
                   result: Result) -> dict[str, Any]:
    """A lost or late message as a step: what was sent, what arrived where and when, and
    the frames around it."""
    hops = [("planned send", 0.0), ("sent", example.get("sent_after_ms")),
            ("acked by the platform", example.get("acked_after_ms")),
            ("received", example.get("latency_ms"))]
    platform_hops = example.get("platform") or {}
    parameters = [{"name": "stamp", "value": str(example.get("stamp", ""))},
                  {"name": "server message id", "value": str(example.get("server_id"))},
                  {"name": "agent", "value": str(example.get("agent") or
                                                 platform_hops.get("agent") or "-")},
                  {"name": "receiver", "value": str(example.get("receiver") or "-")},
                  {"name": "cause", "value": str(example.get("cause", "-"))},
                  {"name": "network profile", "value": profile or "-"}]
    for name, value in platform_hops.items():
        if name != "agent":
            parameters.append({"name": f"platform {name}", "value": str(value)})
    steps = [{"name": f"{hop}: " + ("never" if value is None else f"+{value:.1f} ms"),
              "status": "failed" if value is None else "passed", "stage": "finished",
              "start": at_ms, "stop": at_ms}
             for hop, value in hops]
    what = example.get("kind") or ""
    attachments = []
    if example.get("frames"):
        attachments.append(result.attachment_file(
            "frames around it.txt", _frames_text(example["frames"], str(example.get("stamp", ""))),
            "text/plain", "txt"))
    stamp = example.get("stamp")
    return {"name": f"{example['outcome']} {example['conversation']} #{example['seq']}"
                    + (f" ({what})" if what else "")
                    + (f": {example['cause']}" if example.get("cause") else "")
                    + (f" [{stamp}]" if stamp else ""),
            "status": "failed", "stage": "finished", "start": at_ms, "stop": at_ms,
            "parameters": parameters, "steps": steps, "attachments": attachments}


def _evidence_table(examples: list[dict[str, Any]]) -> str:
    columns = ["outcome", "cause", "stamp", "conversation", "seq", "server_id", "agent",
               "receiver", "sent_after_ms", "acked_after_ms", "latency_ms", "platform"]
    head = "".join(f"<th>{c}</th>" for c in columns)
    rows = "".join("<tr>" + "".join(f"<td>{_html(e.get(c))}</td>" for c in columns) + "</tr>"
                   for e in examples)
    return (f"<table border='1' cellspacing='0' cellpadding='3'><tr>{head}</tr>{rows}"
            "</table>")


def _html(value: Any) -> str:
    import html

    if isinstance(value, dict):
        value = ", ".join(f"{k}={v}" for k, v in value.items())
    return html.escape("-" if value is None else str(value))


def write_probe_results(directory: Path, doc: dict[str, Any], table: str,
                        started_s: float, config: TargetConfig | None = None,
                        kind: str = "probe") -> list[Path]:
    """One result per network profile of a probe run (``doc`` is the --json document, or
    the combined document of several profiles)."""
    directory.mkdir(parents=True, exist_ok=True)
    documents = doc.get("profiles") or [doc]
    write_run_info(directory, kind, doc["target"], {
        "profiles": ",".join(d.get("profile", "clean") for d in documents)})
    paths = []
    for document in documents:
        profile = str(document.get("profile", "clean"))
        target = public_url(document["target"])
        result = Result(directory, f"{kind} {target} [{profile}]",
                        f"chatprobe.{kind}::{target}::{profile}",
                        (kind, target, profile))
        result.status, result.message = run_status(document)
        result.start_ms = int(started_s * 1000)
        result.stop_ms = int((started_s + float(document.get("duration_s") or 0)) * 1000)
        for name, value in (("epic", target), ("feature", kind), ("story", profile),
                            ("suite", f"chatprobe {kind}"), ("tag", profile)):
            result.label(name, value)
        result.label("severity", "critical" if result.status != "passed" else "normal")
        result.parameter("target", target)
        result.parameter("network profile", profile)
        result.parameter("sent", document["sent"], excluded=True)
        result.parameter("run", document["run"], excluded=True)
        examples = document.get("examples") or []
        result.steps = [_evidence_step(e, profile, result.start_ms, result)
                        for e in examples[:EVIDENCE_STEPS]]
        if examples:
            result.attach("lost and late messages.html", _evidence_table(examples),
                          "text/html", "html")
            result.attach("lost and late messages.json", json.dumps(scrub(examples), indent=2),
                          "application/json", "json")
        result.attach("summary.txt", render_table(document), "text/plain", "txt")
        if len(documents) > 1:
            result.attach("profiles side by side.txt", table, "text/plain", "txt")
        result.attach("summary.json", json.dumps(scrub(document), indent=2),
                      "application/json", "json")
        if config is not None:
            result.attach("configuration.json", json.dumps(masked_config(config), indent=2),
                          "application/json", "json")
        paths.append(result.write())
    return paths


# -- a swarm ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SwarmSlos:
    """The thresholds a swarm's SLO results pass or fail against."""

    p99_ms: float  # default: the target config's p99_warning_ms, else its SLA
    max_lost: int = 0
    min_availability: float = 0.999


def _slo_results(document: dict[str, Any], slos: SwarmSlos) -> list[tuple[str, bool, str]]:
    latency = document["latency_ms"]
    p99 = latency.get("p99")
    availability = document.get("availability")
    return [
        ("p99 latency", p99 is not None and p99 <= slos.p99_ms,
         f"p99 {p99} ms against {slos.p99_ms:g} ms"),
        ("loss", document["lost"] <= slos.max_lost,
         f"lost {document['lost']} of {document['sent']} (allowed {slos.max_lost})"),
        ("availability", availability is not None and availability >= slos.min_availability,
         f"availability {'n/a' if availability is None else f'{availability * 100:.3f} %'} "
         f"against {slos.min_availability * 100:g} %"),
    ]


def write_swarm_results(directory: Path, doc: dict[str, Any], table: str, started_s: float,
                        slos: SwarmSlos, config: TargetConfig | None = None,
                        scenario: str = "") -> list[Path]:
    """One result per network profile x SLO, each with the run's plots attached."""
    from chatprobe.report.plots import swarm_plots

    directory.mkdir(parents=True, exist_ok=True)
    documents = doc.get("profiles") or [doc]
    scenario = scenario or str(documents[0].get("shape", "swarm"))
    write_run_info(directory, "swarm", doc["target"], {
        "scenario": scenario,
        "profiles": ",".join(d.get("profile", "clean") for d in documents)})
    plots = swarm_plots(documents)
    paths = []
    for document in documents:
        profile = str(document.get("profile", "clean"))
        target = public_url(document["target"])
        broken_status, broken_message = run_status(document)
        for slo, passed, detail in _slo_results(document, slos):
            result = Result(directory, f"{scenario} [{profile}]: {slo}",
                            f"chatprobe.swarm::{target}::{scenario}::{profile}::{slo}",
                            ("swarm", target, scenario, profile, slo))
            if broken_status == "broken" or document.get("valid") is False:
                # An invalid run's SLOs are not judged on its numbers: each result says
                # what the run as a whole says (broken, or failed for what it proved).
                result.status, result.message = broken_status, broken_message
            elif passed:
                result.status, result.message = "passed", detail
            else:
                result.status = "failed"
                category = SLA if slo == "p99 latency" else _dominant(document)[0]
                result.message = message(category, f"{detail}. {run_status(document)[1]}")
            result.start_ms = int(started_s * 1000)
            result.stop_ms = int((started_s + float(document.get("duration_s") or 0)) * 1000)
            for name, value in (("epic", target), ("feature", f"swarm {scenario}"),
                                ("story", slo), ("suite", "chatprobe swarm"),
                                ("tag", profile)):
                result.label(name, value)
            result.label("severity", "critical" if slo != "p99 latency" else "normal")
            result.parameter("scenario", scenario)
            result.parameter("network profile", profile)
            result.parameter("SLO", slo)
            result.parameter("run", document["run"], excluded=True)
            examples = document.get("examples") or []
            if slo != "p99 latency":
                result.steps = [_evidence_step(e, profile, result.start_ms, result)
                                for e in examples[:EVIDENCE_STEPS]]
            for name, png in plots.items():
                result.attach(name, png, "image/png", "png")
            if examples and slo != "p99 latency":
                result.attach("lost and late messages.html", _evidence_table(examples),
                              "text/html", "html")
            result.attach("summary.txt", render_table(document), "text/plain", "txt")
            if len(documents) > 1:
                result.attach("profiles side by side.txt", table, "text/plain", "txt")
            result.attach("summary.json",
                          json.dumps(scrub(_without_histograms(document)), indent=2),
                          "application/json", "json")
            if config is not None:
                result.attach("configuration.json",
                              json.dumps(masked_config(config), indent=2),
                              "application/json", "json")
            paths.append(result.write())
    return paths


def _without_histograms(document: dict[str, Any]) -> dict[str, Any]:
    # The encoded histogram is for machines; the report shows percentiles and plots.
    return {key: value for key, value in document.items() if key != "latency_histogram"}
