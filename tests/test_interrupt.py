"""SIGINT or SIGTERM during a probe: what was measured so far is written, marked partial,
and the exit is UNKNOWN (issue 8 item 4, the probe's part)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, ServiceProcess, scaled


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_probe_stopped_by_a_signal_writes_what_it_measured_marked_partial(
        reference_service: ServiceProcess, tmp_path: Path, signum: signal.Signals) -> None:
    out = tmp_path / "run.json"
    proc = subprocess.Popen([sys.executable, "-m", "chatprobe.cli", "probe", "--target",
                             reference_service.base_url, "--messages", "5000", "--rate", "100",
                             "--json", str(out), "--quiet"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        # Stop it mid-run: once the service has taken some of its messages.
        deadline = time.monotonic() + scaled(30)
        while reference_service.stats()["accepted"] < 30:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the probe never got going"
            time.sleep(0.05)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=scaled(30))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, (stdout, stderr)
    assert "RUN PARTIAL" in stdout and "Traceback" not in stderr
    doc = json.loads(out.read_text())
    assert doc["partial"] is True and doc["status"] == "UNKNOWN"
    assert 30 <= doc["sent"] < 5000
    # Nothing is made up: every message sent is delivered, late, lost or still pending,
    # and the service lost none.
    assert doc["sent"] == doc["delivered"] + doc["late"] + doc["lost"] + doc["pending"]
    assert doc["lost"] == 0
    assert doc["delivered"] + doc["late"] <= reference_service.stats()["pushed"]
