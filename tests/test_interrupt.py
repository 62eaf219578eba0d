"""Crash safety (issue 8 item 4): SIGINT or SIGTERM during a probe, swarm or canary writes
what was measured so far, marked partial, exits UNKNOWN and leaves no process, namespace or
nftables table behind; after SIGKILL the next run (or `profiles cleanup`) removes what the
killed one left, and the canary's history store still opens. Real processes throughout."""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import psutil
import pytest

from chatprobe.canary.history import HistoryStore
from chatprobe.netem import kernel
from tests.conftest import ROOT, ServiceProcess, scaled
from tests.test_canary import ADMIN_ENV, write_config

# Every process a run starts inherits its environment: this variable, with a value unique
# to the run, finds the run's processes wherever they went (Locust and the canary's suite
# run in sessions of their own, and orphans are re-parented to init).
MARK = "CHATPROBE_TEST_RUN"


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


# ------------------------------------------------------------------------ shared helpers


def run_processes(mark: str) -> list[psutil.Process]:
    """The live processes of the run marked ``mark`` (zombies are dead: not counted)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(MARK) == mark:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def survivors(mark: str, timeout_s: float) -> list[str]:
    """Waits until no process of the run is left; those still there at the timeout."""
    deadline = time.monotonic() + scaled(timeout_s)
    while True:
        left = run_processes(mark)
        if not left or time.monotonic() > deadline:
            descriptions = []
            for proc in left:
                try:
                    descriptions.append(f"{proc.pid} {' '.join(proc.cmdline())[:160]}")
                except psutil.Error:
                    continue
            return descriptions
        time.sleep(0.05)


def start(args: list[str], mark: str, output: Path | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`chatprobe ARGS` in a session of its own (its process group is what a crash takes
    down); output to files under ``output`` (a pipe would tie the test to whichever
    process of the run holds it last), else to pipes."""
    streams: tuple[IO[str] | int, IO[str] | int] = (subprocess.PIPE, subprocess.PIPE)
    if output is not None:
        streams = (open(output.with_suffix(".out"), "w"),  # noqa: SIM115 (closed below)
                   open(output.with_suffix(".err"), "w"))  # noqa: SIM115
    try:
        return subprocess.Popen([sys.executable, "-m", "chatprobe.cli", *args], cwd=ROOT,
                                text=True, stdout=streams[0], stderr=streams[1],
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, **(env or {}), MARK: mark})
    finally:
        for stream in streams:
            if not isinstance(stream, int):
                stream.close()  # the child has its own copy


def wait_for_messages(service: ServiceProcess, proc: subprocess.Popen[str], count: int,
                      timeout_s: float) -> None:
    """Until the service has taken ``count`` messages: the run is measuring."""
    deadline = time.monotonic() + scaled(timeout_s)
    while service.stats()["accepted"] < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never got going"
        time.sleep(0.05)


def shape_file(folder: Path, seconds: float) -> Path:
    """One long stage: a swarm that is always mid-run when the tests stop it."""
    path = folder / "kill-shape.yaml"
    path.write_text(f"name: kill-shape\nstages:\n  - {{duration: {seconds}, users: 6, "
                    "spawn_rate: 6}\n", encoding="utf-8")
    return path


def assert_store_readable(path: Path) -> int:
    """The canary's history store passes SQLite's integrity check and opens; its runs."""
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    store = HistoryStore(path, read_only=True)
    try:
        return store.run_count()
    finally:
        store.close()


# ------------------------------------------------------------------------------- swarm


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_swarm_stopped_by_a_signal_writes_what_it_measured_marked_partial(
        reference_service: ServiceProcess, tmp_path: Path, signum: signal.Signals) -> None:
    out = tmp_path / "run.json"
    mark = f"swarm-{signum.name}-{os.getpid()}"
    proc = start(["swarm", "--target", reference_service.base_url, "--shape",
                  str(shape_file(tmp_path, 60)), "--workers", "2", "--think-scale", "0.1",
                  "--json", str(out)], mark,
                 env={"CHATPROBE_ADMIN_TOKEN": reference_service.admin_token})
    try:
        wait_for_messages(reference_service, proc, 30, 60)
        # Master and both workers are running (the check below must not be vacuous).
        assert len(run_processes(mark)) >= 4, run_processes(mark)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=scaled(40))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 3, (stdout, stderr[-3000:])
    assert "RUN PARTIAL" in stdout
    assert survivors(mark, 10) == []
    doc = json.loads(out.read_text())
    assert doc["partial"] is True and doc["status"] == "UNKNOWN"
    assert "interrupted" in doc["harness_error"]
    assert doc["sent"] >= 30
    # Nothing is made up: messages in flight at the stop are pending, not lost.
    assert doc["sent"] == doc["delivered"] + doc["late"] + doc["lost"] + doc["pending"]
    assert doc["lost"] == 0 and doc["delivered"] > 0


# ------------------------------------------------------------------------------ canary


def test_a_canary_stopped_by_sigterm_records_a_partial_run_in_a_readable_store(
        reference_service: ServiceProcess, tmp_path: Path) -> None:
    config = write_config(tmp_path, reference_service.base_url)
    out = tmp_path / "run.json"
    mark = f"canary-{os.getpid()}"
    proc = start(["canary", "--config", str(config), "--json", str(out)], mark,
                 env={ADMIN_ENV: reference_service.admin_token})
    try:
        # Stop it once its first check has sent a message: the others have not run.
        wait_for_messages(reference_service, proc, 1, 60)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=scaled(30))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 3, (stdout, stderr)
    assert stdout.startswith("CHATPROBE CANARY UNKNOWN - interrupted (SIGTERM)"), stdout
    assert survivors(mark, 10) == []
    doc = json.loads(out.read_text())
    assert doc["status"] == "UNKNOWN" and doc["partial"] is True
    statuses = [check["status"] for check in doc["checks"]]
    assert "UNKNOWN" in statuses and "CRITICAL" not in statuses
    # The partial run is in the history, and the store is whole.
    assert assert_store_readable(tmp_path / "history.sqlite3") == 1


class HeldPushgateway:
    """Where the canary pushes its metrics: answers each push only when released, so a
    test can stop the canary while it records a run (a real pushgateway cannot be paused)."""

    def __init__(self) -> None:
        self.pushed = threading.Event()
        self.release = threading.Event()
        gateway = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                gateway.pushed.set()
                gateway.release.wait(scaled(30))
                self.send_response(200)
                self.end_headers()

            do_POST = do_PUT

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_canary_stopped_while_recording_records_the_run_whole_first(
        reference_service: ServiceProcess, tmp_path: Path) -> None:
    gateway = HeldPushgateway()
    config = write_config(tmp_path, reference_service.base_url,
                          prometheus={"pushgateway": gateway.url})
    out = tmp_path / "run.json"
    mark = f"canary-rec-{os.getpid()}"
    try:
        proc = start(["canary", "--config", str(config), "--json", str(out)], mark,
                     env={ADMIN_ENV: reference_service.admin_token})
        try:
            # Every check has run and the run is in the history: the push is what is left.
            assert gateway.pushed.wait(scaled(60)), "the canary never pushed its metrics"
            proc.send_signal(signal.SIGTERM)
            gateway.release.set()
            stdout, stderr = proc.communicate(timeout=scaled(30))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    finally:
        gateway.close()
    doc = json.loads(out.read_text())
    assert doc["partial"] is False and doc["status"] == "OK", doc
    assert proc.returncode == 0, (stdout, stderr)
    assert stdout.startswith("CHATPROBE CANARY OK"), stdout
    assert "SIGTERM came after every check had run" in stderr, stderr
    assert assert_store_readable(tmp_path / "history.sqlite3") == 1
    assert survivors(mark, 10) == []


# ------------------------------------------------------------------- kills at random points

KILLS = 20
SEED_ENV = "CHATPROBE_KILL_SEED"  # replay a failed run of the kill test with its seed
PROBE_MESSAGES = 400  # at 100/s: still sending at the latest kill point
KILL_WINDOW_S = {"probe": 2.5, "swarm": 4.0, "canary": 3.0}  # from start to the last kill


def kernel_layer_here() -> bool:
    """As root with ip, tc tbf and nftables (and not switched off) a probe behind a profile
    with kernel parameters builds namespaces, whose removal the kill test then checks."""
    if os.geteuid() != 0 or kernel.disabled_reason() is not None:
        return False
    caps = kernel.detect()
    return caps.netns and caps.nftables and caps.tbf


def kernel_names_of(pid: int) -> set[str]:
    namespaces, links = kernel.existing_names()
    return {name for name in [*namespaces, *links] if kernel.owner_pid(name) == pid}


def host_nft_tables() -> str:
    """The host's own nftables tables, which the kernel layer must never touch."""
    if shutil.which("nft") is None or os.geteuid() != 0:
        return ""
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                          timeout=scaled(10)).stdout


@dataclasses.dataclass
class Kill:
    index: int
    kind: str  # probe, swarm, canary
    signum: signal.Signals
    delay_s: float
    pid: int = 0
    returncode: int | None = None
    ended_before: bool = False  # the run was over before its kill point
    # The service had taken a message of this run when the signal went: chatprobe's
    # handlers were in place by then, so SIGINT/SIGTERM must give exit 3 and a result.
    measuring: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)

    def line(self) -> str:
        when = ("ended before the kill" if self.ended_before
                else f"{self.signum.name} after {self.delay_s:.2f} s")
        when += ", mid-run" if self.measuring else ""
        return (f"#{self.index} {self.kind} pid {self.pid}: {when}, exit {self.returncode}"
                + "".join(f"; {note}" for note in self.notes))


def check_json(kill: Kill, path: Path) -> None:
    """A result that was written is whole; partial if the run was cut short, else complete."""
    if not path.exists():
        kill.notes.append("no JSON")
        return
    doc = json.loads(path.read_text(encoding="utf-8"))  # whole: never half a document
    kill.notes.append(f"JSON status {doc['status']}, partial {doc['partial']}")
    if kill.kind == "canary":
        if doc["partial"]:
            assert any(c["status"] == "UNKNOWN" for c in doc["checks"]), doc
        if "interrupted" in (doc["harness_error"] or ""):
            assert doc["status"] == "UNKNOWN", doc
        return
    assert doc["sent"] == doc["delivered"] + doc["late"] + doc["lost"] + doc["pending"], doc
    # Runs here are shorter than any deadline: a lost message would be one in flight at
    # the stop, which an interrupted run must count as pending.
    assert doc["lost"] == 0, doc
    if doc["partial"]:
        assert doc["status"] == "UNKNOWN" and "interrupted" in doc["harness_error"], doc
    else:
        # Not partial: the whole run (a probe sends all its messages; a swarm's shape
        # outlasts every kill point, so it never ends on its own here).
        assert kill.kind == "probe" and doc["sent"] == PROBE_MESSAGES, doc
        assert doc["pending"] == 0, doc


def test_twenty_kills_at_random_points_leave_no_leftovers_and_no_unreadable_store(
        reference_service: ServiceProcess, tmp_path: Path) -> None:
    """SIGINT, SIGTERM and SIGKILL, each after a random delay, on probes (behind a profile
    with a kernel part where the kernel layer works), swarms and canaries. What is honest
    per signal: SIGINT and SIGTERM end the run with exit 3 and a partial result (or, in the
    instant before chatprobe installs its handlers, with the signal's own death and nothing
    written), and nothing of the run is left; SIGKILL writes nothing and its group dies
    (as in a crash) -- Locust and the canary's suite, in sessions of their own, follow by
    their parent-death signal -- and `profiles cleanup` removes the namespaces it left."""
    seed = int(os.environ.get(SEED_ENV) or random.randrange(2**32))
    rng = random.Random(seed)
    kernel_here = kernel_layer_here()
    profile = tmp_path / "kill-profile.yaml"
    # Loss is the kernel's (nftables in our namespaces); the latency keeps the proxy busy.
    profile.write_text("name: kill-profile\nup: {loss_percent: 1, latency_ms: 5}\n",
                       encoding="utf-8")
    canary_config = write_config(tmp_path, reference_service.base_url)
    history = tmp_path / "history.sqlite3"
    shape = shape_file(tmp_path, 60)
    # Every kind with every signal twice, two more at random, in a random order.
    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]
    plan = [(kind, signum) for kind in KILL_WINDOW_S for signum in signals] * 2
    plan += [(rng.choice(list(KILL_WINDOW_S)), rng.choice(signals))
             for _ in range(KILLS - len(plan))]
    rng.shuffle(plan)
    kills: list[Kill] = []
    tables_before = host_nft_tables()
    started_all = time.monotonic()
    # The runs' own temporary folder: a swarm or canary killed by a signal may leave its
    # folder there (SIGKILL, or SIGTERM before its handlers), and the next run of its kind
    # that gets going removes it. By kind: those killed since the last one that got going.
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    killed_since: dict[str, set[int]] = {"swarm": set(), "canary": set()}

    def context(problem: str) -> str:
        return (f"{problem}\nseed {seed} (replay: {SEED_ENV}={seed}); kernel layer "
                f"{'on' if kernel_here else 'off'}; kills so far:\n"
                + "\n".join(k.line() for k in kills))

    for index, (kind, signum) in enumerate(plan):
        kill = Kill(index, kind, signum, round(rng.uniform(0.05, KILL_WINDOW_S[kind]), 2))
        kills.append(kill)
        mark = f"kill-{seed}-{index}"
        result = tmp_path / f"{index}-{kind}.json"
        env: dict[str, str] = {}
        if kind == "probe":
            args = ["probe", "--target", reference_service.base_url, "--profile", str(profile),
                    "--messages", str(PROBE_MESSAGES), "--rate", "100", "--quiet"]
        elif kind == "swarm":
            args = ["swarm", "--target", reference_service.base_url, "--shape", str(shape),
                    "--workers", str(rng.choice([1, 2])), "--think-scale", "0.1"]
            env["CHATPROBE_ADMIN_TOKEN"] = reference_service.admin_token
        else:
            args = ["canary", "--config", str(canary_config)]
            env[ADMIN_ENV] = reference_service.admin_token
        env["TMPDIR"] = str(temporary)
        accepted_before = reference_service.stats()["accepted"]
        proc = start([*args, "--json", str(result)], mark, tmp_path / f"{index}-{kind}", env)
        kill.pid = proc.pid
        try:
            try:
                proc.wait(timeout=kill.delay_s)  # the kill point: a random moment of the run
                kill.ended_before = True
            except subprocess.TimeoutExpired:
                kill.measuring = reference_service.stats()["accepted"] > accepted_before
                if signum is signal.SIGKILL:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group, as a crash
                else:
                    proc.send_signal(signum)
                try:
                    proc.wait(timeout=scaled(40))
                except subprocess.TimeoutExpired:
                    raise AssertionError(context(f"#{index} did not exit after "
                                                 f"{signum.name}")) from None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        kill.returncode = proc.returncode
        stdout = Path(tmp_path / f"{index}-{kind}.out").read_text(encoding="utf-8")
        try:
            if not kill.ended_before:
                expected = {-signal.SIGKILL} if signum is signal.SIGKILL else {3, -signum}
                if kill.measuring and signum is not signal.SIGKILL:
                    # Mid-run: the handlers were in place, so never the signal's own death.
                    expected = {3}
                    assert result.exists(), "a run stopped mid-run wrote no result"
                if kind == "canary" and signum is not signal.SIGKILL and result.exists():
                    # A stop after the checks waits until the run is recorded whole: the
                    # canary then exits with the run's own status.
                    whole = json.loads(result.read_text(encoding="utf-8"))
                    if not whole["partial"]:
                        expected.add(whole["exit_code"])
                assert proc.returncode in expected, f"exit {proc.returncode}"
            # The lock died with its holder: the next canary ran rather than refusing.
            assert "another canary run is in progress" not in stdout, stdout
            left = survivors(mark, 20)
            assert not left, f"processes of the run left: {left}"
            if kernel_here and kind == "probe":
                names = kernel_names_of(proc.pid)
                if signum is signal.SIGKILL and not kill.ended_before:
                    cleaned = subprocess.run(
                        [sys.executable, "-m", "chatprobe.cli", "profiles", "cleanup"],
                        capture_output=True, text=True, cwd=ROOT, timeout=scaled(60))
                    assert cleaned.returncode == 0, cleaned.stderr
                    kill.notes.append(f"cleanup removed the {len(names)} namespaces/links "
                                      "it left")
                    names = kernel_names_of(proc.pid)
                assert not names, f"namespaces/links of the run left: {sorted(names)}"
            assert host_nft_tables() == tables_before, "the host's nftables tables changed"
            if kind in killed_since:
                if kill.measuring:
                    killed_since[kind].clear()  # it got going: it removed those before it
                if proc.returncode < 0:
                    killed_since[kind].add(proc.pid)  # else it removed its own on the way out
            for run_kind, killed in killed_since.items():
                folders = {int(f.name.split("-")[2])
                           for f in temporary.glob(f"chatprobe-{run_kind}-*")}
                assert folders <= killed, f"temporary folders of {run_kind} runs left: {folders}"
            check_json(kill, result)
            if history.exists():
                assert_store_readable(history)
        except Exception as exc:  # any failure (a store that will not open, too) with the seed
            raise AssertionError(context(f"#{index}: {type(exc).__name__}: {exc}")) from exc
    print(context(f"{len(kills)} kills in {time.monotonic() - started_all:.1f} s"))
