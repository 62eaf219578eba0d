"""Runs a swarm headless: Locust as a child process on loadtests/locustfile.py (edge).

Locust owns the process model (`--processes` forks a master and workers); chatprobe passes
its options through as --cp-* arguments and reads back the summary the master writes.

SIGINT or SIGTERM stops Locust as its own Ctrl-C would and returns what it measured so far,
marked partial; no process of the run outlives :func:`run_swarm`, and a Locust master whose
chatprobe was killed (SIGKILL) gets Ctrl-C from the kernel (parent-death signal).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from chatprobe.children import die_with_parent
from chatprobe.config import ADMIN_TOKEN_ENV, TLS_SERVER_NAME_ENV, load_target, with_overrides
from chatprobe.errors import HarnessError
from chatprobe.histogram import LatencyHistogram
from chatprobe.ledger import LedgerCounts
from chatprobe.paths import project_root, run_temp_dir
from chatprobe.swarm.collector import INTERRUPTED, STOP_FILE_ENV
from chatprobe.swarm.scripts import load_script
from chatprobe.swarm.shapes import load_shape
from chatprobe.verdict import RunSummary, Status

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# After a signal, Locust stops its users, takes its workers' last batches and writes the
# summary (about a second); past this it is killed and the summary may be missing.
STOP_GRACE_S = 20.0
GROUP_EXIT_S = 5.0  # for killed stragglers of Locust's process group to disappear
# The swarm's stamp key (hex), when it must be known outside the run (a consumer checking
# stamps); random per run otherwise.
STAMP_KEY_ENV = "CHATPROBE_SWARM_STAMP_KEY"


def check_stamp_key() -> None:
    """A stamp key given through the environment must be one: 8 to 64 bytes, in hex."""
    value = os.environ.get(STAMP_KEY_ENV)
    if not value:
        return
    try:
        key = bytes.fromhex(value)
    except ValueError:
        raise HarnessError(f"${STAMP_KEY_ENV} must be hex digits") from None
    if not 8 <= len(key) <= 64:  # 64: BLAKE2b's longest key
        raise HarnessError(f"${STAMP_KEY_ENV} must be 16 to 128 hex digits (8 to 64 bytes)")

@dataclass
class SwarmOptions:
    target: str
    shape: str = "midnight-spike"
    workers: int = 1
    duration_s: float | None = None
    script: str = "shopper"
    think_scale: float = 1.0
    config: Path | None = None
    admin_token: str | None = None
    sla_ms: float | None = None
    deadline_ms: float | None = None
    p99_warning_ms: float | None = None
    csv_prefix: str | None = None
    extra_locust_args: tuple[str, ...] = ()
    command_prefix: tuple[str, ...] = ()  # e.g. ("taskset", "-c", "0") to pin the generator
    # A master process of its own even for one worker (the ledger and Locust's statistics
    # off the worker), as on several hosts; more workers always have one.
    separate_master: bool = False
    agent_target: str | None = None  # where the probe agents connect, if not at ``target``
    # The name TLS verifies when ``target`` names a fault proxy: the real target's host
    # (a name the target config gives itself wins).
    tls_server_name: str | None = None
    engine: str = "auto"  # the workers' chat loop (chatprobe.swarm.fastref.ENGINES)

    @classmethod
    def from_args(cls, target: str, args: argparse.Namespace) -> SwarmOptions:
        return cls(target=target, shape=args.shape, workers=args.workers,
                   duration_s=args.duration, script=args.script, think_scale=args.think_scale,
                   config=args.config, admin_token=args.admin_token, sla_ms=args.sla_ms,
                   deadline_ms=args.deadline_ms, p99_warning_ms=args.p99_warning_ms,
                   csv_prefix=args.csv, engine=args.engine)

    def locust_command(self, json_path: Path) -> list[str]:
        command = [sys.executable, "-m", "locust", "-f",
                   str(project_root() / "loadtests" / "locustfile.py"), "--headless",
                   "--host", self.target, "--only-summary", "--loglevel", "WARNING",
                   "--cp-shape", self.shape, "--cp-script", self.script,
                   "--cp-think-scale", str(self.think_scale), "--cp-json", str(json_path),
                   "--cp-engine", self.engine, "--cp-quiet"]
        if self.workers > 1 or self.separate_master:
            # Master and workers talk over loopback on a free port: never on every interface,
            # and never on Locust's fixed default port that a second swarm would also want.
            port = _free_port()
            command += ["--processes", str(self.workers), "--master-bind-host", "127.0.0.1",
                        "--master-bind-port", str(port), "--master-host", "127.0.0.1",
                        "--master-port", str(port)]
        # The admin token travels in the environment (locust_environment), never on a
        # command line, where ps shows it to every user of the machine.
        optional = {"--cp-duration": self.duration_s, "--cp-config": self.config,
                    "--cp-sla-ms": self.sla_ms,
                    "--cp-deadline-ms": self.deadline_ms,
                    "--cp-p99-warning-ms": self.p99_warning_ms,
                    "--cp-agent-target": self.agent_target}
        for flag, value in optional.items():
            if value is not None:
                command += [flag, str(value)]
        if self.csv_prefix:
            command += ["--csv", self.csv_prefix, "--csv-full-history"]
        return [*self.command_prefix, *command, *self.extra_locust_args]


    def locust_environment(self, stop_file: Path | None = None) -> dict[str, str]:
        environment = dict(os.environ)
        if self.admin_token:
            environment[ADMIN_TOKEN_ENV] = self.admin_token
        if self.tls_server_name:
            environment[TLS_SERVER_NAME_ENV] = self.tls_server_name
        if stop_file is not None:
            environment[STOP_FILE_ENV] = str(stop_file)
        return environment


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM while Locust runs (a KeyboardInterrupt, so callers that only know
    Ctrl-C treat SIGTERM alike)."""


class _Stopper:
    """The signal handler while Locust runs. Armed, it raises Interrupted; unarmed (while
    Popen starts Locust, which must not be cut off before we hold its pid, and during the
    clean-up) it remembers the signal for :meth:`arm`."""

    def __init__(self) -> None:
        self.armed = False
        self.pending: str | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.armed:
            raise Interrupted(name)
        self.pending = self.pending or name

    def arm(self) -> None:
        self.armed = True
        if self.pending is not None:
            raise Interrupted(self.pending)


@contextlib.contextmanager
def _signals(handler: Any) -> Iterator[None]:
    """SIGINT and SIGTERM go to ``handler`` inside the block. Python runs handlers in the
    main thread only, so elsewhere (a benchmark's thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _end_group(pgid: int, timeout_s: float = GROUP_EXIT_S) -> None:
    """Kill what is left of Locust's process group (workers that outlived their master) and
    wait until it is gone, so no process of the run survives this call."""
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
        # Orphans are reaped by init, not by us: watch the group empty.
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)
            time.sleep(0.02)


def _stop_locust(proc: subprocess.Popen[bytes], stopper: _Stopper) -> None:
    """After SIGINT/SIGTERM: Ctrl-C to the master, which stops its users and workers and
    writes what it measured; a second signal (the stopper, disarmed, keeps it), or no exit
    within STOP_GRACE_S, kills it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGINT)
    give_up_at = time.monotonic() + STOP_GRACE_S
    while stopper.pending is None and time.monotonic() < give_up_at:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.1)  # short: a second signal is seen within 0.1 s
            return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _interrupted_summary(options: SwarmOptions, stopped_by: str) -> dict[str, Any]:
    """The document of a swarm stopped before Locust wrote one: nothing measured, partial."""
    config = with_overrides(load_target(options.config), None, options.sla_ms,
                            options.deadline_ms, options.p99_warning_ms)
    summary = RunSummary("-", options.target, LedgerCounts(), LatencyHistogram(),
                         config.sla_ms, config.deadline_ms, config.p99_warning_ms, partial=True,
                         harness_error=f"{INTERRUPTED} ({stopped_by} before Locust "
                         "measured anything)")
    document = summary.to_json()
    document["shape"] = options.shape
    return document


def _mark_partial(document: dict[str, Any], stopped_by: str) -> dict[str, Any]:
    """The collector marks a stopped run partial itself; this covers a summary Locust wrote
    without seeing the stop file (its last moments, or a master killed after the grace)."""
    if not document.get("partial"):
        document["partial"] = True
        document["harness_error"] = document.get("harness_error") or INTERRUPTED
    document["status"] = Status.UNKNOWN.name
    document["exit_code"] = int(Status.UNKNOWN)
    document.setdefault("connection_events", []).append(f"stopped by {stopped_by}")
    return document


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_swarm(options: SwarmOptions, timeout_s: float | None = None) -> dict[str, Any]:
    """Run the swarm to its end and return chatprobe's summary document."""
    # Fail before starting Locust on what we can check here: one line, exit 3.
    shape = load_shape(options.shape).fitted(options.duration_s)
    load_script(options.script)
    check_stamp_key()
    with run_temp_dir("swarm") as folder:
        json_path = Path(folder) / "summary.json"
        stop_file = Path(folder) / "stopped"
        # SIGINT to the master (its own Ctrl-C: it stops its workers and exits) if this
        # process dies without stopping it.
        command = [*die_with_parent("INT"), *options.locust_command(json_path)]
        print(f"chatprobe swarm: shape {shape.name} over {shape.total_s:g} s, peak "
              f"{shape.peak_users()} customers, {options.workers} worker(s)",
              file=sys.stderr, flush=True)
        hung = False
        stopped_by: str | None = None
        complete_before_stop = False
        stopper = _Stopper()
        with _signals(stopper.handle):
            # Its own process group: on a timeout or a signal the forked workers go too;
            # and a terminal's Ctrl-C reaches only this process, which stops Locust.
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, cwd=project_root(),
                                    start_new_session=True,
                                    env=options.locust_environment(stop_file))
            try:
                try:
                    stopper.arm()  # a signal that came while Popen ran is raised here
                    returncode: int | None = proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    stopper.armed = False  # a signal now must not cut the clean-up short
                    _kill_group(proc)
                    # A summary written before Locust hung is still the run's result.
                    if not json_path.exists():
                        raise HarnessError(f"the swarm did not finish within {timeout_s:g} s"
                                           ) from None
                    hung = True
                except Interrupted as exc:
                    # Disarmed first: a second signal is kept for _stop_locust, never
                    # raised in the middle of this.
                    stopper.armed, stopper.pending = False, None
                    stopped_by = str(exc)
                    # A summary already written is the whole run's: the signal came after.
                    complete_before_stop = json_path.exists()
                    stop_file.touch()  # before Locust hears of it: its summary is partial
                    _stop_locust(proc, stopper)
                    returncode = proc.returncode
            finally:
                stopper.armed = False  # later signals must not cut the clean-up short
                _end_group(proc.pid)
        if stopped_by is not None and not complete_before_stop:
            if not json_path.exists():
                return _interrupted_summary(options, stopped_by)
            return _mark_partial(json.loads(json_path.read_text(encoding="utf-8")),
                                 stopped_by)
        if not json_path.exists():
            raise HarnessError(f"the swarm ended (Locust exit {returncode}) without "
                               "a summary; see Locust's output above")
        document: dict[str, Any] = json.loads(json_path.read_text(encoding="utf-8"))
        if hung:
            document.setdefault("connection_events", []).append(
                f"Locust wrote its summary but did not exit within {timeout_s:g} s; killed")
        return document
