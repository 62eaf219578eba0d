"""Writing a result file: whole or not at all, and never replacing what the path is; the
temporary folders of runs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from chatprobe.paths import run_temp_dir, write_json


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
    """A run killed with SIGKILL leaves its folder; the next run of its kind removes it,
    and never another live run's folder nor anything not chatprobe's."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process now
    left_by_a_crash = tmp_path / f"chatprobe-swarm-{gone.pid}-abc123"
    (left_by_a_crash / "locust").mkdir(parents=True)
    live = tmp_path / f"chatprobe-swarm-{os.getppid()}-def456"  # a live process's
    live.mkdir()
    other_kind = tmp_path / f"chatprobe-demo-{gone.pid}-ghi789"
    other_kind.mkdir()
    foreign = tmp_path / "chatprobe-swarm-notapid-x"
    foreign.mkdir()
    with run_temp_dir("swarm") as folder:
        assert Path(folder).name.startswith(f"chatprobe-swarm-{os.getpid()}-")
        assert not left_by_a_crash.exists()
        assert live.is_dir() and other_kind.is_dir() and foreign.is_dir()
    assert not Path(folder).exists()


def test_a_result_removes_the_temporary_file_a_killed_writer_left_beside_it(
        tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    path = tmp_path / "run.json"
    left = tmp_path / f".run.json.{gone.pid}.tmp"
    left.write_text("{half a docu")
    writing = tmp_path / f".run.json.{os.getppid()}.tmp"  # a live writer's: not touched
    writing.write_text("{")
    write_json(path, {"run": 3})
    assert not left.exists() and writing.exists()
    assert json.loads(path.read_text()) == {"run": 3}
