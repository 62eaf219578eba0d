"""Target configuration: which protocol, shop, probe agents and thresholds a probe uses.

Pure parsing plus one file read. Every error is a one-line HarnessError naming the field, so a
broken config exits 3 (the probe could not run), never with a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from chatprobe.errors import HarnessError
from chatprobe.paths import fixtures_dir

CHANNELS = ("web", "app", "mini_program")
# The back-office token's environment variable: secrets stay off command lines, where ps
# shows them to every user of the machine.
ADMIN_TOKEN_ENV = "CHATPROBE_ADMIN_TOKEN"
# The TLS name for a config that does not give one (``tls_server_name``): how `chatprobe
# swarm` tells its Locust processes the target's real host name while they connect to a
# network profile's fault proxy.
TLS_SERVER_NAME_ENV = "CHATPROBE_TLS_SERVER_NAME"


def positive_float(text: str) -> float:
    """A command-line option's positive, finite number (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value

@dataclass(frozen=True)
class AgentCredential:
    id: str
    token: str


@dataclass(frozen=True)
class TargetConfig:
    protocol: str = "reference"
    shop: str = "demo"
    agents: tuple[AgentCredential, ...] = ()
    admin_token: str | None = None
    client_version: str = "5.0.0"
    channels: tuple[str, ...] = ("web",)
    sla_ms: float = 3000.0
    deadline_ms: float = 10000.0
    p99_warning_ms: float | None = None  # a p99 latency above this is a WARNING
    connect_timeout_s: float = 5.0
    reconnect_window_s: float = 30.0
    # WebSocket pings: a connection whose pong does not come back within the timeout is
    # dead (a firewall forgot the flow) and is cut, so the client reconnects and resumes.
    heartbeat_interval_s: float = 10.0
    heartbeat_timeout_s: float = 10.0
    # When a proxy strips or refuses the WebSocket upgrade, use the protocol's long-polling
    # transport if it has one (the reference protocol does), as real chat clients do.
    long_poll_fallback: bool = True
    # TLS (wss:// and https://): certificates are verified against the system's CAs, or
    # this bundle; a client certificate where the target asks for one.
    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    # The name the certificate is verified against and sent as SNI, when the URL's host is
    # not the target's own name: a network profile's fault proxy (127.0.0.1 or the kernel
    # layer's edge address) stands between, or the URL names the target by address.
    tls_server_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def tls_context(self) -> ssl.SSLContext:
        """The client TLS context for this target (verification always on)."""
        context = ssl.create_default_context(cafile=self.ca_bundle)
        if self.client_cert:
            context.load_cert_chain(self.client_cert, self.client_key)
        return context


def default_target_path() -> Path:
    return fixtures_dir() / "targets" / "reference.yaml"


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise HarnessError(f"{where} must be a number between {low:g} and {high:g}")
    return float(value)


def reject_unknown(document: dict[Any, Any], known: set[str], where: str) -> None:
    """One line naming every key a document has that its reader does not know (a typo is
    an error, never silently ignored)."""
    unknown = sorted(str(key) for key in document if key not in known)
    if unknown:
        raise HarnessError(f"{where}: unknown field(s) {', '.join(unknown)}")


def secret(document: dict[str, Any], key: str, where: str, base: Path) -> str | None:
    """A secret given as ``key`` (in the file), ``key_env`` (the name of an environment
    variable) or ``key_file`` (a file holding it, relative to the config's folder): the
    latter two keep it out of config files and off command lines, where ``ps`` shows it."""
    given = [name for name in (key, f"{key}_env", f"{key}_file")
             if document.get(name) is not None]
    if len(given) > 1:
        raise HarnessError(f"{where}: give one of {', '.join(given)}")
    if not given:
        return None
    value = document[given[0]]
    if not isinstance(value, str) or not value:
        raise HarnessError(f"{where}: '{given[0]}' must be a non-empty string")
    if given[0] == key:
        return value
    if given[0].endswith("_env"):
        found = os.environ.get(value)
        if not found:
            raise HarnessError(f"{where}: environment variable {value} (for '{key}') is not "
                               "set")
        return found
    path = Path(os.path.expanduser(value))
    path = path if path.is_absolute() else base / path
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise HarnessError(f"{where}: cannot read the '{key}' file {path}") from None
    if not text:
        raise HarnessError(f"{where}: the '{key}' file {path} is empty")
    return text


def parse_target(document: Any, source: str) -> TargetConfig:
    if not isinstance(document, dict):
        raise HarnessError(f"{source}: a target config must be a mapping")
    known = {"protocol", "shop", "agents", "admin_token", "admin_token_env",
             "admin_token_file", "client_version", "channels",
             "sla_ms", "deadline_ms", "p99_warning_ms", "connect_timeout_s", "reconnect_window_s",
             "heartbeat_interval_s", "heartbeat_timeout_s", "long_poll_fallback",
             "ca_bundle", "client_cert", "client_key", "tls_server_name", "extra"}
    reject_unknown(document, known, source)
    agents_raw = document.get("agents", [])
    if not isinstance(agents_raw, list) or not agents_raw:
        raise HarnessError(f"{source}: 'agents' must be a non-empty list of {{id, token}}")
    agents = []
    for i, item in enumerate(agents_raw):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise HarnessError(f"{source}: agents[{i}] needs a string 'id'")
        token = secret(item, "token", f"{source}: agents[{i}]", Path(source).parent)
        if token is None:
            raise HarnessError(f"{source}: agents[{i}] needs 'token', 'token_env' or "
                               "'token_file'")
        agents.append(AgentCredential(item["id"], token))
    channels_raw = document.get("channels", ["web"])
    if isinstance(channels_raw, str):
        channels_raw = [channels_raw]
    if not isinstance(channels_raw, list) or not channels_raw or any(
            c not in CHANNELS for c in channels_raw):
        raise HarnessError(f"{source}: 'channels' must list some of {', '.join(CHANNELS)}")
    for key in ("protocol", "shop", "client_version"):
        if key in document and not isinstance(document[key], str):
            raise HarnessError(f"{source}: '{key}' must be a string")
    admin_token = secret(document, "admin_token", source, Path(source).parent)
    sla = _number(document.get("sla_ms", 3000), f"{source}: sla_ms", 1, 3_600_000)
    deadline = _number(document.get("deadline_ms", 10000), f"{source}: deadline_ms", 1,
                       3_600_000)
    if deadline < sla:
        raise HarnessError(f"{source}: deadline_ms must be at least sla_ms")
    p99_warning = document.get("p99_warning_ms")
    if p99_warning is not None:
        p99_warning = _number(p99_warning, f"{source}: p99_warning_ms", 1, 3_600_000)
    fallback = document.get("long_poll_fallback", True)
    if not isinstance(fallback, bool):
        raise HarnessError(f"{source}: 'long_poll_fallback' must be true or false")
    extra = document.get("extra", {})
    if not isinstance(extra, dict):
        raise HarnessError(f"{source}: 'extra' must be a mapping")
    tls_files = {}
    for key in ("ca_bundle", "client_cert", "client_key"):
        value = document.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise HarnessError(f"{source}: '{key}' must be a file path")
        path = Path(os.path.expanduser(value))
        path = path if path.is_absolute() else Path(source).parent / path
        if not path.is_file():
            raise HarnessError(f"{source}: {key} {path} is not a readable file")
        tls_files[key] = str(path)
    if "client_key" in tls_files and "client_cert" not in tls_files:
        raise HarnessError(f"{source}: 'client_key' needs 'client_cert'")
    server_name = document.get("tls_server_name")
    if server_name is not None and (not isinstance(server_name, str) or not server_name
                                    or any(c in server_name for c in "/ \t")):
        raise HarnessError(f"{source}: 'tls_server_name' must be a host name")
    return TargetConfig(
        protocol=document.get("protocol", "reference"),
        shop=document.get("shop", "demo"),
        agents=tuple(agents),
        admin_token=admin_token,
        client_version=document.get("client_version", "5.0.0"),
        channels=tuple(channels_raw),
        sla_ms=sla,
        deadline_ms=deadline,
        p99_warning_ms=p99_warning,
        connect_timeout_s=_number(document.get("connect_timeout_s", 5), f"{source}: "
                                  "connect_timeout_s", 0.1, 300),
        reconnect_window_s=_number(document.get("reconnect_window_s", 30), f"{source}: "
                                   "reconnect_window_s", 0, 3600),
        heartbeat_interval_s=_number(document.get("heartbeat_interval_s", 10),
                                     f"{source}: heartbeat_interval_s", 0.05, 3600),
        heartbeat_timeout_s=_number(document.get("heartbeat_timeout_s", 10),
                                    f"{source}: heartbeat_timeout_s", 0.05, 3600),
        long_poll_fallback=fallback,
        tls_server_name=server_name,
        extra=extra,
        **tls_files,
    )


def read_document(path: Path, what: str = "config", missing: str | None = None) -> Any:
    """A YAML (or .json) file's content; every failure is one HarnessError line.
    ``missing`` replaces the message for a file that cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HarnessError(missing or f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise HarnessError(f"{what} {path} is not UTF-8 text") from None
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HarnessError(f"{what} {path} is not valid YAML/JSON: {first}") from None


def load_target(path: Path | None) -> TargetConfig:
    path = path or default_target_path()
    return parse_target(read_document(path), str(path))


def with_inherited_tls_name(config: TargetConfig) -> TargetConfig:
    """``config`` with the TLS name a parent `chatprobe swarm` passed to its Locust processes
    (a name the config gives itself wins). Only Locust's side reads it: an exported variable
    left in a shell must not change what a probe or a canary verifies."""
    inherited = os.environ.get(TLS_SERVER_NAME_ENV)
    if inherited and config.tls_server_name is None:
        return dataclasses.replace(config, tls_server_name=inherited)
    return config


def with_overrides(config: TargetConfig, admin_token: str | None = None,
                   sla_ms: float | None = None, deadline_ms: float | None = None,
                   p99_warning_ms: float | None = None) -> TargetConfig:
    """The config with command-line values in place of the file's (unset ones ignored)."""
    changes: dict[str, Any] = {}
    if p99_warning_ms:
        changes["p99_warning_ms"] = p99_warning_ms
    if admin_token:
        changes["admin_token"] = admin_token
    if sla_ms:
        changes["sla_ms"] = sla_ms
    if deadline_ms:
        changes["deadline_ms"] = deadline_ms
    return dataclasses.replace(config, **changes)
