"""The `chatprobe` command as a user runs it: exit codes, one-line errors, JSON, Allure files."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from websockets.asyncio.server import ServerConnection, serve

from chatprobe.config import default_target_path
from tests.conftest import ROOT, ServiceProcess, scaled


def chatprobe(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatprobe.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=scaled(timeout), stdin=subprocess.DEVNULL)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int,
                          contains: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert contains in lines[0], lines[0]


@pytest.mark.parametrize("url", ["not a url", "ftp://127.0.0.1:1/", "http://:80",
                                 "http://127.0.0.1:99999", "http://127.0.0.1:0",
                                 "http://x y:80/"])
def test_malformed_url_exits_3_with_one_line(url: str) -> None:
    assert_one_line_error(chatprobe("probe", "--target", url), 3, "malformed target URL")


@pytest.mark.parametrize("args", [
    ["probe"],
    ["probe", "--target", "http://127.0.0.1:8765", "--messages", "0"],
    ["probe", "--target", "http://127.0.0.1:8765", "--messages", "many"],
    ["probe", "--target", "http://127.0.0.1:8765", "--rate", "-5"],
    ["probe", "--target", "http://127.0.0.1:8765", "--sla-ms", "5000", "--deadline-ms", "10"],
    ["serve", "--port", "70000"],
    ["frobnicate"],
])
def test_bad_arguments_exit_3_with_one_line(args: list[str]) -> None:
    result = chatprobe(*args)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


@pytest.mark.parametrize(("content", "message"), [
    ("agents: [unclosed", "not valid YAML"),
    ("protocol: reference\nagents: []\n", "agents"),
    ("agents:\n  - {id: probe-1}\n", "token"),
    ("agents:\n  - {id: a, token: t}\nsla_ms: fast\n", "sla_ms"),
    ("agents:\n  - {id: a, token: t}\nprotocol: carrier-pigeon\n", "unknown protocol"),
    ("agents:\n  - {id: a, token: t}\ncolour: blue\n", "unknown field"),
])
def test_broken_config_exits_3(tmp_path: Path, content: str, message: str) -> None:
    config = tmp_path / "target.yaml"
    config.write_text(content)
    result = chatprobe("probe", "--target", "http://127.0.0.1:9", "--config", str(config))
    assert_one_line_error(result, 3, message)


def test_missing_config_file_exits_3(tmp_path: Path) -> None:
    result = chatprobe("probe", "--target", "http://127.0.0.1:9", "--config",
                       str(tmp_path / "nope.yaml"))
    assert_one_line_error(result, 3, "cannot read config")


def test_serve_with_broken_shop_config_exits_3(tmp_path: Path) -> None:
    config = tmp_path / "shops.yaml"
    config.write_text("shops:\n  demo:\n    agents:\n      a: {role: boss, token: t}\n")
    result = chatprobe("serve", "--port", "0", "--config", str(config), "--db", ":memory:")
    assert_one_line_error(result, 3, "role must be one of")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_target_exits_2_with_transport_diagnosis() -> None:
    result = chatprobe("probe", "--target", f"http://127.0.0.1:{_free_port()}", "--quiet")
    assert result.returncode == 2, result.stderr
    assert "transport.unreachable" in result.stdout
    assert "Traceback" not in result.stderr + result.stdout


def test_rejected_login_exits_2_with_auth_diagnosis(reference_service: ServiceProcess,
                                                    tmp_path: Path) -> None:
    config = tmp_path / "target.yaml"
    config.write_text("agents:\n  - {id: probe-1, token: stolen-token}\n")
    result = chatprobe("probe", "--target", reference_service.base_url, "--config",
                       str(config), "--quiet")
    assert result.returncode == 2, result.stderr
    assert "auth.rejected" in result.stdout


class GarbageServer:
    """A WebSocket server on loopback that answers every hello with something broken."""

    def __init__(self, reply: str | bytes) -> None:
        self.reply = reply
        self.port = 0
        self.ready = threading.Event()
        self.stop: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _handler(self, ws: ServerConnection) -> None:
        try:
            async for _ in ws:
                await ws.send(self.reply)
        except websockets.ConnectionClosed:
            pass

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        async with serve(self._handler, "127.0.0.1", 0) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            self.ready.set()
            await self.stop.wait()

    def __enter__(self) -> GarbageServer:
        self.thread.start()
        assert self.ready.wait(scaled(10))
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.loop is not None and self.stop is not None
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(scaled(10))


@pytest.fixture(params=["}{ not json", b"\x00\x01binary", '{"type": "welcome"'])
def garbage_server(request: pytest.FixtureRequest) -> Iterator[GarbageServer]:
    with GarbageServer(request.param) as server:
        yield server


def test_garbage_frames_exit_2_with_protocol_diagnosis(garbage_server: GarbageServer) -> None:
    result = chatprobe("probe", "--target", f"http://127.0.0.1:{garbage_server.port}",
                       "--quiet")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "protocol.invalid_frames" in result.stdout
    assert "Traceback" not in result.stderr + result.stdout


def test_plain_http_server_is_not_a_chat_target(tmp_path: Path) -> None:
    # An HTTP server that does not upgrade: the probe says so, not "timeout".
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                               "0"], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        port = int(line.split("port ")[1].split(" ")[0])
        result = chatprobe("probe", "--target", f"http://127.0.0.1:{port}", "--quiet")
    finally:
        server.kill()
        server.wait()
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "WebSocket upgrade refused" in result.stdout or "protocol" in result.stdout


def test_probe_writes_json_and_allure_results(reference_service: ServiceProcess,
                                              tmp_path: Path) -> None:
    json_path = tmp_path / "out" / "summary.json"
    allure_dir = tmp_path / "allure-results"
    result = chatprobe("probe", "--target", reference_service.base_url, "--messages", "50",
                       "--customers", "5", "--json", str(json_path), "--alluredir",
                       str(allure_dir), "--quiet")
    assert result.returncode == 0, (result.stdout, result.stderr)
    doc = json.loads(json_path.read_text())
    for key in ("sent", "delivered", "late", "lost", "duplicate", "reordered", "misrouted",
                "forged", "availability"):
        assert key in doc
    assert doc["sent"] == doc["delivered"] == 50
    assert set(doc["latency_ms"]) >= {"p50", "p90", "p99", "p999", "max"}
    results = list(allure_dir.glob("*-result.json"))
    assert len(results) == 1
    allure = json.loads(results[0].read_text())
    assert allure["status"] == "passed"
    for attachment in allure["attachments"]:
        assert (allure_dir / attachment["source"]).is_file()
    assert "delivered" in result.stdout and "OK" in result.stdout


def test_a_p99_above_its_threshold_is_a_warning_and_below_it_ok(
        reference_service: ServiceProcess, tmp_path: Path) -> None:
    """The service holds every push 600 ms (its counter says it did): against a 100 ms
    p99 threshold the probe exits 1 and says why; against 1000 ms, 0. A target config's
    p99_warning_ms applies when no flag is given."""
    # 600, not 300: a loaded machine's own delays may explain up to the difference
    # (the own-delay rule then says UNKNOWN, exit 3).
    reference_service.ok("POST", "/admin/faults", {"delay_ms": 600})
    json_path = tmp_path / "slow.json"
    result = chatprobe("probe", "--target", reference_service.base_url, "--messages", "40",
                       "--customers", "4", "--p99-warning-ms", "100", "--json",
                       str(json_path), "--quiet")
    assert result.returncode == 1, (result.stdout, result.stderr)
    doc = json.loads(json_path.read_text())
    assert doc["status"] == "WARNING" and doc["p99_warning_ms"] == 100.0
    assert doc["late"] == doc["lost"] == 0 and doc["latency_ms"]["p99"] > 600, doc
    assert "above the 100 ms threshold" in result.stdout
    assert reference_service.stats()["delayed"] == 40

    config = tmp_path / "target.yaml"
    config.write_text(default_target_path().read_text() + "p99_warning_ms: 1000\n")
    result = chatprobe("probe", "--target", reference_service.base_url, "--messages", "40",
                       "--customers", "4", "--config", str(config), "--json",
                       str(json_path), "--quiet")
    assert result.returncode == 0, (result.stdout, result.stderr)
    doc = json.loads(json_path.read_text())
    assert doc["status"] == "OK" and doc["p99_warning_ms"] == 1000.0
    assert "threshold" not in result.stdout


def test_demo_runs_the_main_job_and_exits_0(tmp_path: Path) -> None:
    result = chatprobe("demo", "--duration", "6", "--think-scale", "0.1", "--deadline-ms",
                       "3000", "--json", str(tmp_path / "demo.json"), timeout=240)
    assert (tmp_path / "demo.json").exists(), (result.returncode, result.stdout,
                                               result.stderr[-3000:])
    doc = json.loads((tmp_path / "demo.json").read_text())
    if result.returncode == 3:
        # The suite's other workers can starve the demo's generator; then the run must say
        # so (invalid, with reasons) rather than pass its numbers off as the target's.
        assert doc["valid"] is False and doc["invalid_reasons"], doc
    else:
        assert result.returncode == 0, (result.stdout, result.stderr)
    assert doc["sent"] == doc["delivered"] > 0
    assert doc["shape"] == "midnight-spike" and doc["timeseries"]
    assert "chatprobe run" in result.stdout and "Traceback" not in result.stderr
    # The main job ends with the report (reports/output in the checkout).
    lines = [line for line in result.stdout.splitlines()
             if line.startswith("chatprobe report: file://")]
    assert len(lines) == 1, (result.stdout[-2000:], result.stderr[-2000:])
    index = Path(urllib.parse.urlsplit(lines[0].split(": ", 1)[1]).path)
    assert index.name == "index.html" and index.stat().st_size > 0


@pytest.mark.parametrize("args", [
    ["swarm", "--target", "http://127.0.0.1:9", "--shape", "no-such-shape"],
    ["swarm", "--target", "http://127.0.0.1:9", "--script", "no-such-script"],
    ["swarm", "--target", "ftp://x", "--shape", "pre-heat"],
    ["swarm", "--target", "http://127.0.0.1:9", "--workers", "0"],
    ["swarm", "--target", "http://127.0.0.1:9", "--engine", "turbo"],
    # The compiled engine has no TLS: asked for, it says so before anything starts.
    ["swarm", "--target", "https://127.0.0.1:9", "--engine", "compiled"],
])
def test_swarm_bad_input_exits_3_with_one_line(args: list[str]) -> None:
    result = chatprobe(*args)
    assert result.returncode == 3, (result.stdout, result.stderr)
    if "compiled" in args:
        assert "has no TLS" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


def test_a_script_without_any_think_time_is_refused_before_the_swarm_starts(
        tmp_path: Path) -> None:
    """Each round starts when the one before was planned to end: with no think time at all
    the rounds would follow each other without pause, as fast as the generator could go."""
    script = tmp_path / "impatient.yaml"
    script.write_text("steps:\n  - {kind: greeting, think_s: 0, texts: [hi]}\n"
                      "  - {kind: question, think_s: 0, texts: [anyone there]}\n")
    result = chatprobe("swarm", "--target", "http://127.0.0.1:9", "--script", str(script))
    assert result.returncode == 3, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "think_s above 0" in lines[0], lines
