"""Runs a swarm headless: Locust as a child process on loadtests/locustfile.py (edge).

Locust owns the process model (`--processes` forks a master and workers); chatprobe passes
its options through as --cp-* arguments and reads back the summary the master writes.
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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatprobe.config import ADMIN_TOKEN_ENV
from chatprobe.errors import HarnessError
from chatprobe.paths import project_root
from chatprobe.swarm.scripts import load_script
from chatprobe.swarm.shapes import load_shape


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
    csv_prefix: str | None = None
    extra_locust_args: tuple[str, ...] = ()
    command_prefix: tuple[str, ...] = ()  # e.g. ("taskset", "-c", "0") to pin the generator
    # A master process of its own even for one worker (the ledger and Locust's statistics
    # off the worker), as on several hosts; more workers always have one.
    separate_master: bool = False
    agent_target: str | None = None  # where the probe agents connect, if not at ``target``

    @classmethod
    def from_args(cls, target: str, args: argparse.Namespace) -> SwarmOptions:
        return cls(target=target, shape=args.shape, workers=args.workers,
                   duration_s=args.duration, script=args.script, think_scale=args.think_scale,
                   config=args.config, admin_token=args.admin_token, sla_ms=args.sla_ms,
                   deadline_ms=args.deadline_ms, csv_prefix=args.csv)

    def locust_command(self, json_path: Path) -> list[str]:
        command = [sys.executable, "-m", "locust", "-f",
                   str(project_root() / "loadtests" / "locustfile.py"), "--headless",
                   "--host", self.target, "--only-summary", "--loglevel", "WARNING",
                   "--cp-shape", self.shape, "--cp-script", self.script,
                   "--cp-think-scale", str(self.think_scale), "--cp-json", str(json_path),
                   "--cp-quiet"]
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
                    "--cp-deadline-ms": self.deadline_ms, "--cp-agent-target": self.agent_target}
        for flag, value in optional.items():
            if value is not None:
                command += [flag, str(value)]
        if self.csv_prefix:
            command += ["--csv", self.csv_prefix, "--csv-full-history"]
        return [*self.command_prefix, *command, *self.extra_locust_args]


    def locust_environment(self) -> dict[str, str]:
        environment = dict(os.environ)
        if self.admin_token:
            environment[ADMIN_TOKEN_ENV] = self.admin_token
        return environment


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
    with tempfile.TemporaryDirectory(prefix="chatprobe-swarm-") as folder:
        json_path = Path(folder) / "summary.json"
        command = options.locust_command(json_path)
        print(f"chatprobe swarm: shape {shape.name} over {shape.total_s:g} s, peak "
              f"{shape.peak_users()} customers, {options.workers} worker(s)",
              file=sys.stderr, flush=True)
        # Its own process group: on a timeout or Ctrl-C the forked workers go too.
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, cwd=project_root(),
                                start_new_session=True, env=options.locust_environment())
        hung = False
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            # A summary written before Locust hung is still the run's result: keep it.
            if not json_path.exists():
                raise HarnessError(f"the swarm did not finish within {timeout_s:g} s") from None
            hung = True
        except KeyboardInterrupt:
            _kill_group(proc)
            raise
        if not json_path.exists():
            raise HarnessError(f"the swarm ended (Locust exit {returncode}) without "
                               "a summary; see Locust's output above")
        document: dict[str, Any] = json.loads(json_path.read_text(encoding="utf-8"))
        if hung:
            document.setdefault("connection_events", []).append(
                f"Locust wrote its summary but did not exit within {timeout_s:g} s; killed")
        return document
