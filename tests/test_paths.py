"""Writing a result file: whole or not at all, and never replacing what the path is; the
temporary folders of runs."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from chatprobe.paths import OWNER_LOCK, run_temp_dir, write_json


def test_a_result_replaces_the_last_one_whole_and_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "out" / "run.json"
    write_json(path, {"run": 1})
    os.chmod(path, 0o640)
    write_json(path, {"run": 2})
    assert json.loads(path.read_text()) == {"run": 2}
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]  # no temporary left


def test_a_symlink_keeps_pointing_at_the_new_document(tmp_path: Path) -> None:
    real = tmp_path / "runs" / "2026-12-01.json"
    real.parent.mkdir()
    real.write_text("{}")
    link = tmp_path / "latest.json"
    link.symlink_to(real)
    write_json(link, {"run": 3})
    assert link.is_symlink() and json.loads(real.read_text()) == {"run": 3}


def test_a_pipe_is_written_in_place(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, so the writer can open
    try:
        write_json(fifo, {"run": 4})
        assert stat.S_ISFIFO(fifo.stat().st_mode)  # still the pipe, not a file in its place
        assert json.loads(os.read(reader, 1 << 16)) == {"run": 4}
    finally:
        os.close(reader)


def test_a_run_removes_the_temporary_folders_of_runs_that_are_gone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed with SIGKILL leaves its folder, and its lock on it dies with it; the
    next run of its kind removes it, and never a folder whose run still holds its lock (in
    whatever pid namespace) nor anything not chatprobe's."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    left_by_a_crash = tmp_path / "chatprobe-swarm-4242-abc123"
    (left_by_a_crash / "locust").mkdir(parents=True)
    (left_by_a_crash / OWNER_LOCK).touch()  # nobody holds it
    live = tmp_path / "chatprobe-swarm-4343-def456"
    live.mkdir()
    (live / OWNER_LOCK).touch()
    other_kind = tmp_path / "chatprobe-demo-4242-ghi789"
    other_kind.mkdir()
    (other_kind / OWNER_LOCK).touch()
    not_ours = tmp_path / "chatprobe-swarm-notours-x"  # no lock file
    not_ours.mkdir()
    with open(live / OWNER_LOCK) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # its run, alive
        with run_temp_dir("swarm") as folder:
            assert Path(folder).name.startswith(f"chatprobe-swarm-{os.getpid()}-")
            assert not left_by_a_crash.exists()
            assert live.is_dir() and other_kind.is_dir() and not_ours.is_dir()
            # While this run goes on, a second run of the kind leaves its folder alone.
            with run_temp_dir("swarm") as second:
                assert Path(folder).is_dir() and second != folder
    assert not Path(folder).exists()


def test_a_run_removes_a_day_old_folder_of_ours_that_never_got_its_lock_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed between making its folder and locking it, or a chatprobe from before
    the lock files, leaves a folder with no lock to judge it by: once untouched for a day,
    and its process gone, the next run of the kind removes it."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: no process has its pid now (Linux does not reuse one this soon)
    dead_pid = child.pid
    two_days_ago = time.time() - 2 * 24 * 3600
    abandoned = tmp_path / f"chatprobe-swarm-{dead_pid}-old_fld1"
    fresh = tmp_path / f"chatprobe-swarm-{dead_pid}-newfold1"
    alive = tmp_path / f"chatprobe-swarm-{os.getpid()}-oldfold2"
    not_ours = tmp_path / "chatprobe-swarm-notours-oldfold3"
    a_persons = tmp_path / f"chatprobe-swarm-{dead_pid}-notes"  # not tempfile's 8 characters
    for folder in (abandoned, fresh, alive, not_ours, a_persons):
        (folder / "locust").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "keep").mkdir(parents=True)
    planted = tmp_path / f"chatprobe-swarm-{dead_pid}-symlink1"
    planted.symlink_to(elsewhere)
    for folder in (abandoned, alive, not_ours, a_persons, elsewhere):
        os.utime(folder, (two_days_ago, two_days_ago))
    os.utime(planted, (two_days_ago, two_days_ago), follow_symlinks=False)
    with run_temp_dir("swarm"):
        assert not abandoned.exists()
        for kept in (fresh, alive, not_ours, a_persons, elsewhere / "keep"):
            assert kept.is_dir(), kept
        assert planted.is_symlink()


def test_a_result_removes_the_temporary_file_a_killed_writer_left_beside_it(
        tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    path = tmp_path / "run.json"
    left = tmp_path / f".run.json.{gone.pid}.tmp"
    left.write_text("{half a docu")
    an_hour_ago = time.time() - 3600
    os.utime(left, (an_hour_ago, an_hour_ago))
    # No such process here, but too fresh to judge: a live writer in another pid namespace?
    just_now = tmp_path / ".run.json.999999999.tmp"
    just_now.write_text("{")
    writing = tmp_path / f".run.json.{os.getppid()}.tmp"  # a live writer's: not touched
    writing.write_text("{")
    impossible = tmp_path / ".run.json.99999999999999999999.tmp"  # no such pid, no crash
    impossible.write_text("{")
    os.utime(impossible, (an_hour_ago, an_hour_ago))
    odd = tmp_path / ".run.json.²³.tmp"  # digits Python's int() takes and a pid never has
    odd.write_text("{")
    write_json(path, {"run": 3})
    assert not left.exists() and not impossible.exists()
    assert writing.exists() and odd.exists() and just_now.exists()
    assert json.loads(path.read_text()) == {"run": 3}
