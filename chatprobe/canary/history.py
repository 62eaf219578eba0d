"""The canary's history: every run appended to an embedded SQLite store (edge), and the
figures `chatprobe history` prints from it (pure helpers at the bottom).

WAL mode lets readers (history, a dashboard) read while a run writes; each run goes in one
transaction, so a run killed mid-write leaves the store as it was before that run.
Retention prunes old rows so a canary writing 1,440 runs a day stays bounded.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatprobe.canary.model import LATENCY, CanaryRun, CheckResult
from chatprobe.errors import HarnessError
from chatprobe.verdict import Status

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    started REAL NOT NULL,
    duration_s REAL NOT NULL,
    status TEXT NOT NULL,
    partial INTEGER NOT NULL,
    host_broken INTEGER NOT NULL,
    harness_error TEXT
);
CREATE INDEX IF NOT EXISTS runs_started ON runs (started);
CREATE TABLE IF NOT EXISTS checks (
    run INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    target TEXT NOT NULL,
    agent TEXT NOT NULL,
    channel TEXT NOT NULL,
    kind TEXT NOT NULL,
    profile TEXT NOT NULL,
    status TEXT NOT NULL,
    cause TEXT,
    detail TEXT NOT NULL,
    latency_ms REAL,
    started REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS checks_run ON checks (run);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
WINDOWS = (("last hour", 3600.0), ("last day", 86400.0), ("last week", 604800.0))


@dataclass(frozen=True)
class TargetFigures:
    target: str
    window: str
    runs: int
    available: int
    p50_ms: float | None
    p99_ms: float | None

    @property
    def availability(self) -> float | None:
        return self.available / self.runs if self.runs else None


class HistoryStore:
    def __init__(self, path: Path, timeout_s: float = 10.0, read_only: bool = False) -> None:
        """``timeout_s``: how long to wait for a writer that holds the store;
        ``read_only``: never create or change it (``chatprobe history``)."""
        self.path = path
        try:
            if read_only:
                self.db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True,
                                          timeout=timeout_s, isolation_level=None)
                if self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                   "name = 'runs'").fetchone() is None:
                    # Created by a canary killed before it wrote the schema: no runs yet
                    # (its next run adds the tables). Read it as the empty store it is.
                    self.db.close()
                    self.db = sqlite3.connect(":memory:", isolation_level=None)
                    self.db.executescript(SCHEMA)
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise HarnessError(f"cannot open the canary history {path}: {exc}") from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def append(self, run: CanaryRun) -> None:
        """One run with all its checks, atomically."""
        try:
            with self._transaction() as db:
                cursor = db.execute(
                    "INSERT INTO runs (run_id, started, duration_s, status, partial, "
                    "host_broken, harness_error) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (run.run_id, run.started, run.duration_s, run.status.name,
                     int(run.partial), int(run.host_broken), run.harness_error))
                db.executemany(
                    "INSERT INTO checks (run, target, agent, channel, kind, profile, status, "
                    "cause, detail, latency_ms, started) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, "
                    "?, ?)",
                    [(cursor.lastrowid, r.target, r.agent, r.channel, r.kind, r.profile,
                      r.status.name, r.cause, r.detail, r.latency_ms, r.started)
                     for r in run.results])
        except sqlite3.Error as exc:
            raise HarnessError(f"cannot write the canary history {self.path}: {exc}") from None

    def prune(self, retention_s: float, now: float) -> int:
        """Delete runs older than the retention; returns how many went."""
        with self._transaction() as db:
            cursor = db.execute("DELETE FROM runs WHERE started < ?", (now - retention_s,))
        return cursor.rowcount

    def get_state(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_state(self, key: str, value: Any) -> None:
        self.db.execute("INSERT INTO state (key, value) VALUES (?, ?) ON CONFLICT (key) "
                        "DO UPDATE SET value = excluded.value", (key, json.dumps(value)))

    def last_run(self) -> tuple[float, str] | None:
        row = self.db.execute(
            "SELECT started, status FROM runs ORDER BY started DESC LIMIT 1").fetchone()
        return None if row is None else (float(row[0]), str(row[1]))

    def run_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def figures(self, since: float, window: str) -> list[TargetFigures]:
        """Availability and latency per target since ``since``. A run counts as available
        for a target when every judged check of that target in it passed (OK or WARNING)
        and as unavailable when one failed (CRITICAL); checks the canary could not judge
        (UNKNOWN) and runs in which only its own host was broken count neither way."""
        rows = self.db.execute(
            "SELECT c.run, c.target, c.kind, c.status, c.latency_ms FROM checks c "
            "JOIN runs r ON r.id = c.run WHERE r.started >= ? AND r.host_broken = 0",
            (since,)).fetchall()
        failed: dict[str, set[int]] = {}
        runs: dict[str, set[int]] = {}
        latencies: dict[str, list[float]] = {}
        for run, target, kind, status, latency in rows:
            if status == Status.UNKNOWN.name:
                continue
            runs.setdefault(target, set()).add(run)
            if status == Status.CRITICAL.name:
                failed.setdefault(target, set()).add(run)
            if kind == LATENCY and latency is not None:
                latencies.setdefault(target, []).append(float(latency))
        return [TargetFigures(target, window, len(runs[target]),
                              len(runs[target]) - len(failed.get(target, set())),
                              percentile(latencies.get(target, []), 50),
                              percentile(latencies.get(target, []), 99))
                for target in sorted(runs)]

    def recent_failures(self, limit: int = 10) -> list[tuple[float, CheckResult]]:
        rows = self.db.execute(
            "SELECT r.started, c.target, c.agent, c.channel, c.kind, c.status, c.cause, "
            "c.detail, c.latency_ms, c.profile FROM checks c JOIN runs r ON r.id = c.run "
            "WHERE c.status NOT IN ('OK', 'WARNING') ORDER BY r.started DESC, c.rowid "
            "LIMIT ?", (limit,)).fetchall()
        return [(float(row[0]), CheckResult(row[1], row[2], row[3], row[4], Status[row[5]],
                                            row[6], row[7], row[8], row[9]))
                for row in rows]


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of the exact values (the history holds few per window)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def render_history(store: HistoryStore, now: float, stale_after_s: float,
                   failures: int = 10) -> tuple[str, bool]:
    """The `chatprobe history` report, and whether the history is stale."""
    lines = [f"chatprobe canary history ({store.path}, {store.run_count()} runs kept)"]
    last = store.last_run()
    stale = last is None or now - last[0] > stale_after_s
    if last is None:
        lines.append("  STALE: no canary run recorded yet")
    else:
        ago = now - last[0]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last[0]))
        lines.append(f"  last run {when} ({_ago(ago)} ago): {last[1]}")
        if stale:
            lines.append(f"  STALE: no run for {_ago(ago)} (expected every "
                         f"{_ago(stale_after_s)} at most): is the canary's cron job running?")
    lines.append("")
    lines.append(f"  {'target':<20} {'window':<10} {'runs':>6} {'availability':>13} "
                 f"{'p50 ms':>9} {'p99 ms':>9}")
    for window, seconds in WINDOWS:
        for figure in store.figures(now - seconds, window):
            availability = figure.availability
            lines.append(
                f"  {figure.target:<20} {window:<10} {figure.runs:>6} "
                f"{'n/a' if availability is None else f'{availability * 100:.2f} %':>13} "
                f"{_ms(figure.p50_ms):>9} {_ms(figure.p99_ms):>9}")
    recent = store.recent_failures(failures)
    if recent:
        lines.append("")
        lines.append("  recent failures:")
        for started, result in recent:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
            lines.append(f"    {when}  {result.line()}")
    return "\n".join(lines), stale


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
