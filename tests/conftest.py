"""Shared test fixtures: the real reference service as a subprocess on loopback, admin calls.

Every wait in the suite is bounded by a timeout multiplied by CHATPROBE_TEST_TIMEOUT_SCALE
(default 1) so slow machines can stretch them all at once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from chatprobe.config import TargetConfig, load_target
from chatprobe.stamp import StampCodec

TIMEOUT_SCALE = float(os.environ.get("CHATPROBE_TEST_TIMEOUT_SCALE", "1"))
ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "test-admin-token"


def scaled(seconds: float) -> float:
    return seconds * TIMEOUT_SCALE


def kill_process(proc: subprocess.Popen[Any] | None) -> None:
    """SIGKILL: a crash, nothing flushed by the process itself."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=scaled(10))


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within the (scaled) timeout."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=scaled(timeout))
        except subprocess.TimeoutExpired:
            kill_process(proc)


class ServiceProcess:
    """`chatprobe serve` in a subprocess: a real server on a real loopback port."""

    def __init__(self, db: Path, config: Path | None = None, port: int = 0,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.db = db
        self.config = config
        self.port = port
        self.extra_args = extra_args
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = ""
        self.admin_token = ADMIN_TOKEN

    def start(self) -> ServiceProcess:
        command = [sys.executable, "-m", "chatprobe.cli", "serve", "--port", str(self.port),
                   "--db", str(self.db), "--admin-token", self.admin_token]
        if self.config is not None:
            command += ["--config", str(self.config)]
        command += self.extra_args
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
        kill_process(self.proc)

    def stop(self) -> None:
        stop_process(self.proc)

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


def capture_stamp_keys(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The stamp key of every run started in this process from now on, in order: a test
    that knows a run's key can look for it in what the run wrote."""
    keys: list[bytes] = []
    new_run = StampCodec.new_run

    def remember(run: str | None = None) -> StampCodec:
        codec = new_run(run)
        keys.append(codec.secret)
        return codec

    monkeypatch.setattr(StampCodec, "new_run", remember)
    return keys


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """What the fuzz tests tried (tests/test_fuzz.py record it as a user property), so a CI
    log shows how much hostile input passed, not just that the tests did."""
    lines = [value for report in terminalreporter.stats.get("passed", [])
             for name, value in getattr(report, "user_properties", []) if name == "fuzz"]
    if lines:
        terminalreporter.write_sep("-", "fuzz")
        for line in sorted(lines):
            terminalreporter.write_line(str(line))


def pytest_collection_modifyitems(items: list[Any]) -> None:
    """The fuzz tests last: they keep a core busy for a while, which the timing-sensitive
    tests (emulated latencies, generator health) should not share."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/test_fuzz.py"))


# ------------------------------------------------------------- tests that need the machine


def _machine_locks() -> tuple[Path, Path] | None:
    """Two lock files shared by this run's xdist workers (None when not under xdist)."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:
        return None
    folder = Path(tempfile.gettempdir())
    return folder / f"chatprobe-tests-{run}.turn", folder / f"chatprobe-tests-{run}.room"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None
                            ) -> Generator[None, None, None]:
    """A test marked ``alone`` compares measured time with ground truth (an emulated
    150 ms, a generator's lateness): it runs with no other test beside it, set-up and
    tear-down included. On this 2-core machine the other worker's bursts (an XMPP server
    starting, Chromium rendering a report) took the probe's share of a core for a second
    or two and moved a median by 50-200 ms. Every other test holds the room shared; an
    ``alone`` test holds it alone. The turnstile gives a waiting ``alone`` test its turn:
    no new test enters while it waits for the room to empty."""
    locks = _machine_locks()
    if locks is None:
        yield
        return
    turnstile_path, room_path = locks
    alone = item.get_closest_marker("alone") is not None
    with open(turnstile_path, "a") as turnstile, open(room_path, "a") as room:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(room, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield
