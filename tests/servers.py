"""Third-party chat servers run by the tests on loopback (real-targets.md): Prosody, ejabberd.

Each server gets its own config, data folder and free ports under the test's tmp_path, is
started in the foreground as a child process, and is stopped (or killed) by the test.
`bash dev.sh test` installs the Debian packages; without them these tests fail in CI and are
skipped elsewhere, saying why.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from chatprobe.config import AgentCredential, TargetConfig
from tests.conftest import scaled

DOMAIN = "localhost"
CUSTOMER_PASSWORD = "customer-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (bash dev.sh test installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + scaled(30)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}: "
                                 f"{log.read_text(errors='replace')[-2000:]}")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not listen on {port}")


class ProsodyServer:
    """Prosody 0.12 with mod_websocket, plain auth on loopback, Stream Management on."""

    def __init__(self, folder: Path, agents: int = 2, customers: int = 20) -> None:
        self.folder = folder
        self.agents = [AgentCredential(f"agent{i}", f"agent{i}-secret")
                       for i in range(1, agents + 1)]
        self.customers = customers
        self.http_port = free_port()
        self.c2s_port = free_port()
        self.config = folder / "prosody.cfg.lua"
        self.log = folder / "prosody.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        (self.folder / "certs").mkdir(exist_ok=True)
        self.config.write_text(f"""
run_as_root = true
prosody_user = "root"
pidfile = "{self.folder}/prosody.pid"
data_path = "{self.folder}/data"
certificates = "{self.folder}/certs"
log = {{ info = "{self.log}"; error = "{self.log}" }}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {self.c2s_port} }}
c2s_interfaces = {{ "127.0.0.1" }}
s2s_ports = {{ }}
http_ports = {{ {self.http_port} }}
http_interfaces = {{ "127.0.0.1" }}
https_ports = {{ }}
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
consider_websocket_secure = true
network_settings = {{ nagle = false; read_size = 65536 }}
authentication = "internal_plain"
storage = "internal"
modules_enabled = {{ "roster"; "saslauth"; "disco"; "ping"; "websocket"; "smacks"; "offline" }}
modules_disabled = {{ "s2s"; "tls"; "limits" }}
VirtualHost "{DOMAIN}"
""")

    def register_accounts(self) -> None:
        prosodyctl = require_binary("prosodyctl")
        accounts = [(a.id, a.token) for a in self.agents] + [
            (f"customer{i}", CUSTOMER_PASSWORD) for i in range(1, self.customers + 1)]
        for user, password in accounts:
            subprocess.run([prosodyctl, "--config", str(self.config), "register", user, DOMAIN,
                            password], check=True, capture_output=True,
                           timeout=scaled(30))

    def start(self) -> ProsodyServer:
        prosody = require_binary("prosody")
        if self.proc is None:
            self.write_config()
            self.register_accounts()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([prosody, "--config", str(self.config), "-F"],
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.http_port, self.proc, "prosody", self.log)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=scaled(10))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=scaled(10))
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def target_config(self, **changes: object) -> TargetConfig:
        values: dict[str, object] = {
            "protocol": "xmpp", "shop": DOMAIN, "agents": tuple(self.agents),
            "sla_ms": 2000.0, "deadline_ms": 4000.0, "reconnect_window_s": 2.0,
            "extra": {"domain": DOMAIN, "websocket_path": "/xmpp-websocket",
                      "customers": {"prefix": "customer", "count": self.customers,
                                    "password": CUSTOMER_PASSWORD}},
        }
        values.update(changes)
        return TargetConfig(**values)  # type: ignore[arg-type]
