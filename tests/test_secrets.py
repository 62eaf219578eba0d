"""Secrets come from environment variables or files, never need the command line (where ps
shows them to every user), and the harness never puts them there itself (issue 8 item 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from chatprobe.config import ADMIN_TOKEN_ENV, parse_target
from chatprobe.errors import HarnessError
from chatprobe.swarm.runner import SwarmOptions
from tests.conftest import ROOT, ServiceProcess, scaled


def test_tokens_come_from_the_file_an_environment_variable_or_a_file_of_their_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "probe-2.token").write_text("from-a-file\n", encoding="utf-8")
    (tmp_path / "admin.token").write_text("admin-from-a-file", encoding="utf-8")
    monkeypatch.setenv("PROBE_1_TOKEN", "from-the-environment")
    config = parse_target({"agents": [{"id": "probe-1", "token_env": "PROBE_1_TOKEN"},
                                      {"id": "probe-2", "token_file": "probe-2.token"},
                                      {"id": "probe-3", "token": "in-the-file"}],
                           "admin_token_file": "admin.token"},
                          str(tmp_path / "target.yaml"))
    assert [a.token for a in config.agents] == ["from-the-environment", "from-a-file",
                                                "in-the-file"]
    assert config.admin_token == "admin-from-a-file"


@pytest.mark.parametrize("agent, message", [
    ({"id": "a", "token_env": "NO_SUCH_VARIABLE_HERE"},
     "environment variable NO_SUCH_VARIABLE_HERE (for 'token') is not set"),
    ({"id": "a", "token_file": "missing.token"}, "cannot read the 'token' file"),
    ({"id": "a", "token": "x", "token_env": "Y"}, "give one of token, token_env"),
    ({"id": "a"}, "needs 'token', 'token_env' or 'token_file'"),
])
def test_a_secret_that_cannot_be_found_is_a_one_line_error(tmp_path: Path,
                                                          agent: dict[str, str],
                                                          message: str) -> None:
    with pytest.raises(HarnessError) as caught:
        parse_target({"agents": [agent]}, str(tmp_path / "target.yaml"))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_swarm_hands_the_admin_token_to_locust_off_the_command_line(
        tmp_path: Path) -> None:
    options = SwarmOptions(target="http://127.0.0.1:9", admin_token="s3cret-admin")
    assert not any("s3cret-admin" in part for part in options.locust_command(tmp_path / "x"))
    assert options.locust_environment()[ADMIN_TOKEN_ENV] == "s3cret-admin"


def test_no_process_of_a_swarm_shows_the_admin_token(reference_service: ServiceProcess,
                                                     tmp_path: Path) -> None:
    shape = tmp_path / "shape.yaml"
    shape.write_text("stages:\n  - {duration: 3, users: 4, spawn_rate: 4}\n")
    env = {**os.environ, ADMIN_TOKEN_ENV: reference_service.admin_token}
    proc = subprocess.Popen([sys.executable, "-m", "chatprobe.cli", "swarm", "--target",
                             reference_service.base_url, "--shape", str(shape),
                             "--think-scale", "0.1",
                             "--workers", "2", "--json", str(tmp_path / "out.json")],
                            cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, str] = {}
    tokens: dict[int, str | None] = {}
    try:
        deadline = time.monotonic() + scaled(60)
        # Watch every process of the run (master and workers) until it ends.
        while proc.poll() is None and time.monotonic() < deadline:
            for child in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(
                    recursive=True)]:
                try:
                    seen[child.pid] = " ".join(child.cmdline())
                    tokens[child.pid] = child.environ().get(ADMIN_TOKEN_ENV)
                except psutil.Error:
                    continue
            time.sleep(0.05)
        assert proc.wait(timeout=scaled(120)) in (0, 1, 3)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sum("locust" in line for line in seen.values()) >= 2, seen  # master + workers
    assert not [line for line in seen.values() if reference_service.admin_token in line]
    # ... and the token did reach Locust's processes, through their environment.
    locust = [pid for pid, line in seen.items() if "locust" in line]
    assert {tokens[pid] for pid in locust} == {reference_service.admin_token}
    assert json.loads((tmp_path / "out.json").read_text())["sent"] > 0
