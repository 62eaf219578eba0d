"""`chatprobe canary`: one bounded run of the canary suite, for cron (edge).

A lock keeps two runs from overlapping; the suite (probes/, pytest) runs in a child process
of its own session that is killed at the budget, whatever the target does; every result the
suite recorded before that is kept. Then the run goes into the history store, the metrics
and the alert state. Harness problems make the run UNKNOWN, never CRITICAL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from chatprobe.canary.config import CanaryConfig
from chatprobe.canary.history import HistoryStore
from chatprobe.canary.model import CanaryRun, CheckResult
from chatprobe.children import die_with_parent
from chatprobe.diagnosis import Cause
from chatprobe.errors import HarnessError
from chatprobe.paths import project_root, run_temp_dir, write_json

if TYPE_CHECKING:
    from chatprobe.canary.alerts import AlertConfig

# Kept back from the budget for what follows the checks (history, metrics, alerts), which
# share what is left of it.
RESERVE_S = 5.0
KILL_GRACE_S = 1.5  # the suite's own deadline comes first; this only catches a stuck child
HOST_CAUSES = frozenset({Cause.TRANSPORT.value})


class Interrupted(Exception):
    """SIGTERM or SIGINT during a run: stop, keep what was measured, mark it partial."""


@contextlib.contextmanager
def run_lock(path: Path) -> Iterator[None]:
    """Exclusive for the run's lifetime; a second run fails at once (no waiting in cron).
    The kernel drops the lock when the holder dies, so a crash never leaves it stuck."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+", encoding="ascii")  # noqa: SIM115 (held for the run)
    except OSError as exc:
        raise HarnessError(f"cannot open the canary lock {path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise HarnessError(f"another canary run is in progress (pid {holder} holds "
                               f"{path}); this one did not start") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()


def clear_results(directory: Path) -> None:
    """The previous run's Allure result files go: at 1,440 runs a day they would pile up
    (as retries of every check); the report's history keeps the trend. Only Allure's own
    files are touched."""
    for pattern in ("*-result.json", "*-container.json", "*-attachment.*"):
        for path in directory.glob(pattern):
            with contextlib.suppress(OSError):
                path.unlink()


def new_run_id(now: float) -> str:
    return f"canary-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}-{secrets.token_hex(2)}"


def read_results(path: Path) -> list[CheckResult]:
    results: list[CheckResult] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return results
    for line in lines:
        # A line cut short by a kill mid-write is the only one that can be broken.
        with contextlib.suppress(ValueError, KeyError, TypeError):
            results.append(CheckResult.from_json(json.loads(line)))
    return results


def reachable(url: str, timeout_s: float = 2.0) -> bool:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _suite_command(config: CanaryConfig, results: Path, deadline: float,
                   run_id: str) -> list[str]:
    command = [sys.executable, "-m", "pytest", str(project_root() / "probes"), "-q",
               "--no-header", "-p", "no:cacheprovider", "-o", "addopts=",
               "--canary-config", str(config.source), "--canary-results", str(results),
               "--canary-deadline", f"{deadline:.3f}", "--canary-run-id", run_id]
    if config.alluredir is not None:
        command += ["--alluredir", str(config.alluredir)]
    return command


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[list[str]]:
    """SIGTERM and SIGINT wait until the block ends (the run being recorded: a few seconds
    at most, bounded by the budget), so a stop between the checks and the history never
    loses a whole run; the names of the signals that came are in the yielded list."""
    came: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield came
        return

    def remember(signum: int, frame: FrameType | None) -> None:
        came.append(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, remember)
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield came
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_suite(config: CanaryConfig, run: CanaryRun, log_path: Path,
              came: list[str] | None = None) -> None:
    """Run probes/ in a child process until done or the budget; fill ``run.results``.
    SIGTERM or Ctrl-C stops it (``came``: signals held back since before it started, which
    stop it at once; taken from the list)."""
    deadline = run.started + config.budget_s - RESERVE_S
    stopped_by: str | None = None
    with run_temp_dir("canary") as folder:
        results_path = Path(folder) / "results.jsonl"
        with open(log_path, "w", encoding="utf-8") as log:
            # Killed with its parent: a canary killed by SIGKILL must not leave its suite
            # checking the target from a session of its own until the deadline.
            command = [*die_with_parent("KILL"),
                       *_suite_command(config, results_path, deadline, run.run_id)]
            proc = subprocess.Popen(command,
                                    stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=project_root(),
                                    start_new_session=True)
            previous = {signum: signal.signal(signum, _raise_interrupted)
                        for signum in (signal.SIGTERM, signal.SIGINT)}
            try:
                if came:
                    raise Interrupted(came.pop(0))
                returncode: int | None = proc.wait(
                    timeout=max(0.1, deadline + KILL_GRACE_S - time.time()))
            except subprocess.TimeoutExpired:
                returncode = None
                run.harness_error = (f"the suite overran the {config.budget_s:g} s budget "
                                     "and was stopped")
            except (KeyboardInterrupt, Interrupted) as exc:
                returncode = None
                stopped_by = str(exc) or "SIGINT"
                run.harness_error = f"interrupted ({stopped_by}); results are partial"
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        run.results = read_results(results_path)
    got = {r.check_id for r in run.results}
    missing = [check for check in config.check_ids() if check not in got]
    run.partial = bool(missing)
    if stopped_by is not None and not missing:
        # The signal cut only the suite's tear-down: every check has its result, so the
        # run is whole and judged by them; the signal is reported beside it.
        run.harness_error = None
        if came is not None:
            came.append(stopped_by)
    if run.partial and run.harness_error is None:
        run.harness_error = (f"the suite ended (pytest exit {returncode}) before every check "
                             f"had run; its output is in {log_path}")
    # Checks that never ran are reported as such (UNKNOWN), not left out of the run.
    run.results += [CheckResult.unjudged(check, f"not run: {run.harness_error}")
                    for check in missing]


def _host_broken(config: CanaryConfig, run: CanaryRun) -> bool:
    """Every check failed for want of a connection, and the control address (something the
    canary's host can always reach when its own network works) cannot be reached either."""
    if config.control_url is None or not run.results:
        return False
    if not all(r.cause in HOST_CAUSES for r in run.results):
        return False
    return not reachable(config.control_url)


def run_canary(config: CanaryConfig, json_path: Path | None = None) -> tuple[CanaryRun,
                                                                               list[str]]:
    """One canary run. Returns the run and the problems of its side jobs (history, metrics,
    alerts), which are reported but never change what the run found. The side jobs share
    what is left of the budget, so the whole run ends within it."""
    started = time.time()
    ends_at = started + config.budget_s
    run = CanaryRun(new_run_id(started), started)
    problems: list[str] = []
    with run_lock(config.lock):
        log_path = config.history.with_name(config.history.name + ".last-run.log")
        config.history.parent.mkdir(parents=True, exist_ok=True)
        if config.alluredir is not None:
            clear_results(config.alluredir)
        # Held back from here on but while the suite runs (which they stop), so that no
        # moment between the checks and the history can lose the run.
        with _signals_deferred() as came:
            run_suite(config, run, log_path, came)
            _record(config, run, json_path, started, ends_at, problems)
    if came:
        problems.append(f"{came[0]} came after every check had run; the run was recorded "
                        "whole first")
    return run, problems


def _record(config: CanaryConfig, run: CanaryRun, json_path: Path | None, started: float,
            ends_at: float, problems: list[str]) -> None:
    """The run into the history, metrics, alerts and its JSON."""
    run.host_broken = _host_broken(config, run)
    run.duration_s = time.time() - started
    store: HistoryStore | None = None
    try:
        store = HistoryStore(config.history, timeout_s=_left(ends_at))
        store.append(run)
        store.prune(config.retention_days * 86400, time.time())
    except (HarnessError, sqlite3.Error) as exc:
        problems.append(f"history: {exc}")
    try:
        problems += _side_jobs(config, run, store, ends_at)
    finally:
        if store is not None:
            store.close()
    if json_path is not None:
        try:
            write_json(json_path, run.to_json())  # whole even if killed mid-write
        except OSError as exc:
            problems.append(f"cannot write {json_path}: {exc.strerror}")


def _left(ends_at: float) -> float:
    """Seconds left of the run's budget for a side job (a little, never nothing)."""
    return max(0.1, ends_at - time.time())


def _side_jobs(config: CanaryConfig, run: CanaryRun, store: HistoryStore | None,
               ends_at: float) -> list[str]:
    problems: list[str] = []
    if config.prometheus is not None:
        from chatprobe.canary.metrics import export

        try:
            hour = {} if store is None else {
                f.target: f.availability
                for f in store.figures(time.time() - 3600, "last hour")
                if f.availability is not None}
            prometheus = dataclasses.replace(config.prometheus, timeout_s=min(
                config.prometheus.timeout_s, _left(ends_at) / 2))
            problems += export(run, hour, prometheus)
        except (HarnessError, sqlite3.Error) as exc:
            problems.append(f"metrics: {exc}")
    if config.alert is not None:
        problems += _alerts(config, config.alert, run, store, ends_at)
    return problems


def _alerts(config: CanaryConfig, alert: AlertConfig, run: CanaryRun,
            store: HistoryStore | None, ends_at: float) -> list[str]:
    from chatprobe.canary.alerts import decide, deliver, state_from_json, state_to_json

    if store is None:
        return ["alerts: not sent, the history (which keeps their state) is not available"]
    try:
        state = state_from_json(store.get_state("alerts"))
    except (HarnessError, sqlite3.Error) as exc:
        # Starting afresh would forget open alerts and never send their recoveries.
        return [f"alerts: not sent, their saved state is unreadable ({exc}); repair or "
                f"delete the 'alerts' row of the state table in {config.history}"]
    state, alerts = decide(state, run, alert.after_failures, time.time())
    alert_config = dataclasses.replace(alert, timeout_s=min(alert.timeout_s, _left(ends_at)))
    # An alert the webhook did not take stays pending in the state for the next run.
    state, problems = deliver(state, alerts, alert_config)
    try:
        store.set_state("alerts", state_to_json(state))
    except sqlite3.Error as exc:
        problems.append(f"alerts: state not saved: {exc}")
    return problems
