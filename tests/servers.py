"""Third-party chat servers run by the tests on loopback (real-targets.md): Prosody, ejabberd.

Each server gets its own config, data folder and free ports under the test's tmp_path, is
started in the foreground as a child process, and is stopped (or killed) by the test.
`bash dev.sh test` installs the Debian packages; without them these tests fail in CI and are
skipped elsewhere, saying why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from chatprobe.config import AgentCredential, TargetConfig
from tests.conftest import kill_process, scaled, stop_process

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
        kill_process(self.proc)

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def target_config(self, **changes: object) -> TargetConfig:
        config = xmpp_target(self.agents, self.customers, "/xmpp-websocket")
        return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


class EjabberdServer:
    """ejabberd 23.01: WebSocket at /ws, accounts made through its HTTP API, no epmd.

    ejabberd drops root and runs as the `ejabberd` user, so its folder lives outside pytest's
    private tmp tree (which that user cannot enter) and is removed by :meth:`stop`.
    """

    def __init__(self, agents: int = 2, customers: int = 20) -> None:
        self.agents = [AgentCredential(f"agent{i}", f"agent{i}-secret")
                       for i in range(1, agents + 1)]
        self.customers = customers
        self.http_port = free_port()
        self.dist_port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="chatprobe-ejabberd-"))
        self.log = self.folder / "stdout.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.node = f"chatprobe{self.http_port}@localhost"

    def write_config(self) -> None:
        for sub in ("logs", "spool"):
            (self.folder / sub).mkdir(exist_ok=True)
        (self.folder / "ejabberd.yml").write_text(f"""
hosts: [{DOMAIN}]
loglevel: warning
certfiles: []
listen:
  - port: {self.http_port}
    ip: "127.0.0.1"
    module: ejabberd_http
    request_handlers:
      /ws: ejabberd_http_ws
      /api: mod_http_api
api_permissions:
  "loopback admin":
    from: [ejabberd_ctl, mod_http_api]
    who:
      ip: 127.0.0.0/8
    what: "*"
auth_method: internal
auth_password_format: plain
shaper: {{}}
shaper_rules: {{}}
modules:
  mod_stream_mgmt: {{}}
  mod_ping: {{}}
  mod_offline: {{}}
  mod_roster: {{}}
  mod_disco: {{}}
  mod_http_api: {{}}
""")
        # Erlang distribution on loopback at a fixed port, so no epmd daemon is left behind.
        (self.folder / "ejabberdctl.cfg").write_text(
            f"INET_DIST_INTERFACE=127.0.0.1\nERL_DIST_PORT={self.dist_port}\n")
        os.chmod(self.folder, 0o755)
        user = pwd.getpwnam("ejabberd")
        for path in [self.folder, *self.folder.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)

    def api(self, command: str, body: dict[str, str]) -> object:
        request = urllib.request.Request(f"{self.url}/api/{command}",
                                         data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=scaled(10)) as response:
            return json.loads(response.read())

    def start(self) -> EjabberdServer:
        ejabberdctl = require_binary("ejabberdctl")
        first = self.proc is None
        if first:
            self.write_config()
        command = [ejabberdctl, "--config", str(self.folder / "ejabberd.yml"),
                   "--ctl-config", str(self.folder / "ejabberdctl.cfg"),
                   "--logs", str(self.folder / "logs"), "--spool", str(self.folder / "spool"),
                   "--node", self.node, "foreground"]
        with self.log.open("ab") as log:
            # Its own process group: ejabberdctl -> erl -> beam.smp all stop together.
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=self.folder)
        wait_for_port(self.http_port, self.proc, "ejabberd", self.log)
        if first:
            for agent in self.agents:
                self.api("register", {"user": agent.id, "host": DOMAIN,
                                      "password": agent.token})
            for i in range(1, self.customers + 1):
                self.api("register", {"user": f"customer{i}", "host": DOMAIN,
                                      "password": CUSTOMER_PASSWORD})
        return self

    def _vm_pids(self) -> list[int]:
        """The Erlang VM runs as the ejabberd user in a session of its own (su): find it by
        its node name, since signals to ejabberdctl's process group do not reach it."""
        pids = []
        for proc_dir in Path("/proc").iterdir():
            if not proc_dir.name.isdigit():
                continue
            try:
                cmdline = (proc_dir / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if self.node.encode() in cmdline:
                pids.append(int(proc_dir.name))
        return pids

    def _signal(self, sig: signal.Signals) -> None:
        for pid in self._vm_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=scaled(15))
        except subprocess.TimeoutExpired:
            for pid in self._vm_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=scaled(10))
        # ejabberdctl returns when the VM is gone; make sure no VM of this node is left.
        deadline = time.monotonic() + scaled(10)
        while self._vm_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not self._vm_pids(), f"ejabberd node {self.node} is still running"

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)
        shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def target_config(self, **changes: object) -> TargetConfig:
        config = xmpp_target(self.agents, self.customers, "/ws")
        return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


def xmpp_target(agents: list[AgentCredential], customers: int,
                websocket_path: str) -> TargetConfig:
    return TargetConfig(
        protocol="xmpp", shop=DOMAIN, agents=tuple(agents), sla_ms=2000.0, deadline_ms=4000.0,
        reconnect_window_s=2.0,
        extra={"domain": DOMAIN, "websocket_path": websocket_path,
               "customers": {"prefix": "customer", "count": customers,
                             "password": CUSTOMER_PASSWORD}})


SYNAPSE_VENV = Path(os.environ.get("CHATPROBE_SYNAPSE_VENV",
                                   Path(__file__).resolve().parent.parent / ".venv-synapse"))


class SynapseServer:
    """Synapse (Matrix homeserver) from PyPI in its own venv, SQLite, client API on loopback,
    rate limits raised (its defaults allow 0.2 messages/s), no federation or key servers."""

    def __init__(self, folder: Path, agents: int = 2, customers: int = 10) -> None:
        self.folder = folder
        self.agents = [AgentCredential(f"agent{i}", f"agent{i}-secret")
                       for i in range(1, agents + 1)]
        self.customers = customers
        self.port = free_port()
        self.config = folder / "homeserver.yaml"
        self.log = folder / "stdout.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.python = SYNAPSE_VENV / "bin" / "python"

    def write_config(self) -> None:
        if not self.python.exists():
            message = f"Synapse is not installed in {SYNAPSE_VENV} (bash dev.sh test does it)"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        self.folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(self.python), "-m", "synapse.app.homeserver", "--server-name",
                        DOMAIN, "--config-path", str(self.config), "--generate-config",
                        "--report-stats=no", "--data-directory", str(self.folder)],
                       check=True, capture_output=True, timeout=scaled(60), cwd=self.folder)
        config = yaml.safe_load(self.config.read_text())
        unlimited = {"per_second": 100000, "burst_count": 100000}
        config.update({
            "listeners": [{"port": self.port, "bind_addresses": ["127.0.0.1"], "type": "http",
                           "tls": False, "x_forwarded": False,
                           "resources": [{"names": ["client"], "compress": False}]}],
            "trusted_key_servers": [], "suppress_key_server_warning": True,
            "presence": {"enabled": False}, "url_preview_enabled": False,
            "rc_message": unlimited, "rc_registration": unlimited,
            "rc_login": {"address": unlimited, "account": unlimited,
                         "failed_attempts": unlimited},
            "rc_joins": {"local": unlimited, "remote": unlimited},
            "rc_joins_per_room": unlimited,
            "rc_invites": {"per_room": unlimited, "per_user": unlimited,
                           "per_issuer": unlimited},
        })
        self.config.write_text(yaml.safe_dump(config))

    def register(self, user: str, password: str) -> None:
        """The shared-secret admin registration API (what register_new_matrix_user uses)."""
        secret = yaml.safe_load(self.config.read_text())["registration_shared_secret"]
        endpoint = f"{self.url}/_synapse/admin/v1/register"
        with urllib.request.urlopen(endpoint, timeout=scaled(10)) as response:
            nonce = json.loads(response.read())["nonce"]
        mac = hmac.new(secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\0".join([nonce.encode(), user.encode(), password.encode(), b"notadmin"]))
        body = json.dumps({"nonce": nonce, "username": user, "password": password,
                           "admin": False, "mac": mac.hexdigest()}).encode()
        request = urllib.request.Request(endpoint, data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=scaled(10)):
            pass

    def start(self) -> SynapseServer:
        first = self.proc is None
        if first:
            self.write_config()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([str(self.python), "-m", "synapse.app.homeserver",
                                          "-c", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.folder)
        wait_for_port(self.port, self.proc, "synapse", self.log)
        if first:
            for agent in self.agents:
                self.register(agent.id, agent.token)
            for i in range(1, self.customers + 1):
                self.register(f"customer{i}", CUSTOMER_PASSWORD)
        return self

    def kill(self) -> None:
        kill_process(self.proc)

    def stop(self) -> None:
        stop_process(self.proc, timeout=15)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def target_config(self, **changes: object) -> TargetConfig:
        config = TargetConfig(
            protocol="matrix", shop=DOMAIN, agents=tuple(self.agents), sla_ms=3000.0,
            deadline_ms=6000.0, reconnect_window_s=2.0,
            extra={"customers": {"prefix": "customer", "count": self.customers,
                                 "password": CUSTOMER_PASSWORD}, "sync_timeout_ms": 5000})
        return dataclasses.replace(config, **changes)  # type: ignore[arg-type]
