"""Writes Allure result files (``*-result.json`` + attachments) for runs outside pytest.

Allure 2 and 3 both read this format; a probe writes one result per run, named by target, so
runs of the same probe line up in Allure's history and trends.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

from chatprobe.verdict import Status

ALLURE_STATUS = {Status.OK: "passed", Status.WARNING: "failed", Status.CRITICAL: "failed",
                 Status.UNKNOWN: "broken"}


def write_probe_result(directory: Path, doc: dict[str, Any], table: str, started_s: float,
                       stopped_s: float | None = None) -> Path:
    """Write one result for a probe summary ``doc`` (the --json document)."""
    directory.mkdir(parents=True, exist_ok=True)
    status = Status[doc["status"]]
    name = f"probe {doc['target']}"
    history_id = hashlib.md5(name.encode(), usedforsecurity=False).hexdigest()
    summary_file = f"{uuid.uuid4()}-attachment.json"
    (directory / summary_file).write_text(json.dumps(doc, indent=2), encoding="utf-8")
    table_file = f"{uuid.uuid4()}-attachment.txt"
    (directory / table_file).write_text(table, encoding="utf-8")
    problems = [f"{row['outcome']} x{row['count']}: {row['explanation']}"
                for row in doc["diagnoses"]]
    message = (f"sent {doc['sent']}, delivered {doc['delivered']}, late {doc['late']}, "
               f"lost {doc['lost']}; p99 {doc['latency_ms']['p99']} ms")
    result = {
        "uuid": str(uuid.uuid4()),
        "historyId": history_id,
        "testCaseId": history_id,
        "name": name,
        "fullName": f"chatprobe.probe::{doc['target']}",
        "status": ALLURE_STATUS[status],
        "statusDetails": {"message": message + ("\n" + "\n".join(problems) if problems else ""),
                          "trace": doc.get("harness_error") or ""},
        "stage": "finished",
        "start": int(started_s * 1000),
        "stop": int((stopped_s or time.time()) * 1000),
        "labels": [
            {"name": "epic", "value": "delivery"},
            {"name": "feature", "value": "probe"},
            {"name": "story", "value": doc["target"]},
            {"name": "suite", "value": "chatprobe probe"},
            {"name": "severity", "value": "critical" if status >= Status.CRITICAL else "normal"},
        ],
        "parameters": [
            {"name": "target", "value": doc["target"]},
            {"name": "sent", "value": str(doc["sent"])},
            {"name": "run", "value": doc["run"], "excluded": True},
        ],
        "attachments": [
            {"name": "summary.json", "source": summary_file, "type": "application/json"},
            {"name": "summary.txt", "source": table_file, "type": "text/plain"},
        ],
    }
    path = directory / f"{result['uuid']}-result.json"
    path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return path
