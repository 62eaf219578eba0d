"""Shared test fixtures: the real reference service as a subprocess on loopback, admin calls.

Every wait in the suite is bounded by a timeout multiplied by CHATPROBE_TEST_TIMEOUT_SCALE
(default 1) so slow machines can stretch them all at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from chatprobe.config import TargetConfig, load_target

TIMEOUT_SCALE = float(os.environ.get("CHATPROBE_TEST_TIMEOUT_SCALE", "1"))
ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "test-admin-token"


def scaled(seconds: float) -> float:
    return seconds * TIMEOUT_SCALE


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until true; fail the test with ``what`` after the scaled timeout."""
    deadline = time.monotonic() + scaled(timeout)
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {scaled(timeout):.1f} s waiting for {what}")
        time.sleep(0.02)


class ServiceProcess:
    """`chatprobe serve` in a subprocess: a real server on a real loopback port."""

    def __init__(self, db: Path, config: Path | None = None, port: int = 0) -> None:
        self.db = db
        self.config = config
        self.port = port
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = ""
        self.admin_token = ADMIN_TOKEN

    def start(self) -> ServiceProcess:
        command = [sys.executable, "-m", "chatprobe.cli", "serve", "--port", str(self.port),
                   "--db", str(self.db), "--admin-token", self.admin_token]
        if self.config is not None:
            command += ["--config", str(self.config)]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT)
        lines: queue.Queue[str] = queue.Queue()
        stdout = self.proc.stdout
        assert stdout is not None

        def forward() -> None:
            for line in stdout:
                lines.put(line)

        threading.Thread(target=forward, daemon=True).start()
        try:
            first = lines.get(timeout=scaled(20))
        except queue.Empty:
            self.kill()
            raise AssertionError("reference service printed nothing") from None
        if "listening on " not in first:
            self.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"reference service failed to start: {first!r} {err!r}")
        self.base_url = first.rsplit(" ", 1)[1].strip()
        self.port = int(self.base_url.rsplit(":", 1)[1])
        return self

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed by the service itself."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=scaled(10))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=scaled(10))
            except subprocess.TimeoutExpired:
                self.kill()

    def admin(self, method: str, path: str, body: Any = None,
              token: str | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method,
            headers={"Authorization": f"Bearer {token or self.admin_token}",
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=scaled(10)) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, reply = self.admin(method, path, body)
        assert status == 200, (status, reply)
        return reply

    def stats(self) -> dict[str, int]:
        result: dict[str, int] = self.ok("GET", "/admin/stats")
        return result

    def target_config(self, **changes: Any) -> TargetConfig:
        """The default target config, with this service's admin token and short deadlines."""
        config = load_target(None)
        values: dict[str, Any] = {"admin_token": self.admin_token, "sla_ms": 1000.0,
                                  "deadline_ms": 2000.0}
        values.update(changes)
        return dataclasses.replace(config, **values)


@pytest.fixture
def reference_service(tmp_path: Path) -> Iterator[ServiceProcess]:
    service = ServiceProcess(tmp_path / "service.sqlite3").start()
    try:
        yield service
    finally:
        service.stop()
