"""The canary config file: which targets, sub-accounts and channels to check, thresholds,
the time budget, where history, metrics and alerts go (pure parsing plus file reads).

Every error is one HarnessError line naming the field, so a broken config ends the canary
with UNKNOWN (3) and one line, never a traceback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatprobe.canary.model import CERTIFICATE, CHECK_KINDS, IDLE
from chatprobe.config import (
    AgentCredential,
    TargetConfig,
    load_target,
    read_document,
    reject_unknown,
)
from chatprobe.errors import HarnessError
from chatprobe.paths import state_dir

if TYPE_CHECKING:  # imported when a config has these sections, not for every canary
    from chatprobe.canary.alerts import AlertConfig
    from chatprobe.canary.metrics import PrometheusConfig

DEFAULT_BUDGET_S = 45.0  # cron runs every 60 s: a run never overlaps the next one
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass(frozen=True)
class CanaryTarget:
    name: str
    url: str
    target: TargetConfig
    agents: tuple[AgentCredential, ...]
    channels: tuple[str, ...]
    checks: tuple[str, ...]
    profile: str | None = None

    @property
    def secure(self) -> bool:
        return self.url.startswith(("https://", "wss://"))

    def check_ids(self) -> list[str]:
        """Every check this target runs, in the order they run."""
        ids = [f"{self.name}/*/*/{CERTIFICATE}"] if self.secure else []
        for agent in self.agents:
            for number, channel in enumerate(self.channels):
                for kind in self.checks:
                    # The push channel is the agent's connection: idle is checked once per
                    # agent, on its first channel.
                    if kind == IDLE and number > 0:
                        continue
                    ids.append(f"{self.name}/{agent.id}/{channel}/{kind}")
        return ids


@dataclass(frozen=True)
class CanaryConfig:
    source: Path
    targets: tuple[CanaryTarget, ...]
    history: Path
    lock: Path
    budget_s: float = DEFAULT_BUDGET_S
    warning_ms: float = 3000.0
    critical_ms: float = 12000.0
    idle_s: float = 2.0
    retention_days: float = 30.0
    stale_after_s: float = 180.0
    tls_warn_days: float = 14.0  # a TLS target's certificate expiring sooner is a WARNING
    control_url: str | None = None
    alluredir: Path | None = None
    prometheus: PrometheusConfig | None = None  # parsed by canary.metrics
    alert: AlertConfig | None = None  # parsed by canary.alerts

    def check_ids(self) -> list[str]:
        return [check for target in self.targets for check in target.check_ids()]


def _number(document: dict[str, Any], key: str, default: float, low: float, high: float,
            where: str) -> float:
    value = document.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise HarnessError(f"{where}: '{key}' must be a number between {low:g} and {high:g}")
    return float(value)


def _path(document: dict[str, Any], key: str, base: Path, where: str) -> Path | None:
    value = document.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise HarnessError(f"{where}: '{key}' must be a path")
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


def _names(value: Any, key: str, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise HarnessError(f"{where}: '{key}' must be a non-empty list of names")
    return tuple(value)


def _target(item: Any, index: int, base: Path, source: str) -> CanaryTarget:
    where = f"{source}: targets[{index}]"
    if not isinstance(item, dict):
        raise HarnessError(f"{where} must be a mapping with name and url")
    known = {"name", "url", "config", "agents", "channels", "checks", "profile",
             "admin_token_env"}
    reject_unknown(item, known, where)
    name, url = item.get("name"), item.get("url")
    if not isinstance(name, str) or not name or not set(name) <= NAME_CHARS:
        raise HarnessError(f"{where}: 'name' must be letters, digits, '-', '_' or '.'")
    if not isinstance(url, str) or not url.startswith(("http://", "https://", "ws://",
                                                        "wss://")):
        raise HarnessError(f"{where}: 'url' must be an http(s):// or ws(s):// URL")
    target = load_target(_path(item, "config", base, where))
    token_env = item.get("admin_token_env")
    if token_env is not None:
        if not isinstance(token_env, str) or not token_env:
            raise HarnessError(f"{where}: 'admin_token_env' must name an environment variable")
        # Secrets stay out of the file and off the command line (ps shows those).
        target = replace(target, admin_token=os.environ.get(token_env) or target.admin_token)
    wanted_agents = _names(item.get("agents"), "agents", where)
    agents = target.agents
    if wanted_agents is not None:
        by_id = {agent.id: agent for agent in target.agents}
        missing = [a for a in wanted_agents if a not in by_id]
        if missing:
            raise HarnessError(f"{where}: agent(s) {', '.join(missing)} have no credentials "
                               "in the target config")
        agents = tuple(by_id[a] for a in wanted_agents)
    channels = _names(item.get("channels"), "channels", where) or target.channels
    checks = _names(item.get("checks"), "checks", where) or CHECK_KINDS
    bad = [c for c in checks if c not in CHECK_KINDS]
    if bad:
        raise HarnessError(f"{where}: unknown check(s) {', '.join(bad)}; "
                           f"known: {', '.join(CHECK_KINDS)}")
    profile = item.get("profile")
    if profile is not None and not isinstance(profile, str):
        raise HarnessError(f"{where}: 'profile' must be a network profile name")
    if profile is not None and profile.endswith((".yaml", ".yml", ".json")):
        profile = str(_path(item, "profile", base, where))
    if profile is not None:
        from chatprobe.profiles import load_profile

        load_profile(profile)  # a bad profile is a config error now, not a failed check
    return CanaryTarget(name, url, target, agents, channels,
                        tuple(k for k in CHECK_KINDS if k in checks), profile)


def parse_canary(document: Any, source: Path) -> CanaryConfig:
    where = str(source)
    if not isinstance(document, dict):
        raise HarnessError(f"{where}: a canary config must be a mapping")
    known = {"targets", "budget_s", "thresholds", "idle_s", "history", "retention_days",
             "stale_after_s", "lock", "control_url", "alluredir", "prometheus", "alert",
             "tls_warn_days"}
    reject_unknown(document, known, where)
    base = source.parent
    raw_targets = document.get("targets")
    if not isinstance(raw_targets, list) or not raw_targets:
        raise HarnessError(f"{where}: 'targets' must be a non-empty list")
    targets = tuple(_target(item, i, base, where) for i, item in enumerate(raw_targets))
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise HarnessError(f"{where}: target names must be unique")
    thresholds = document.get("thresholds", {})
    if not isinstance(thresholds, dict):
        raise HarnessError(f"{where}: 'thresholds' must be a mapping of warning_ms, "
                           "critical_ms")
    warning = _number(thresholds, "warning_ms", 3000, 1, 600_000, f"{where}: thresholds")
    critical = _number(thresholds, "critical_ms", 12000, 1, 600_000, f"{where}: thresholds")
    if critical < warning:
        raise HarnessError(f"{where}: thresholds.critical_ms must be at least warning_ms")
    budget = _number(document, "budget_s", DEFAULT_BUDGET_S, 1, 3600, where)
    control = document.get("control_url")
    if control is not None and (not isinstance(control, str) or "://" not in control):
        raise HarnessError(f"{where}: 'control_url' must be a URL")
    prometheus = alert = None
    if document.get("prometheus") is not None:
        from chatprobe.canary.metrics import parse_prometheus_config

        prometheus = parse_prometheus_config(document["prometheus"], f"{where}: prometheus",
                                             base=base)
    if document.get("alert") is not None:
        from chatprobe.canary.alerts import parse_alert_config

        alert = parse_alert_config(document["alert"], f"{where}: alert")
    history = _path(document, "history", base, where) or state_dir() / "canary.sqlite3"
    return CanaryConfig(
        source=source,
        targets=targets,
        budget_s=budget,
        warning_ms=warning,
        critical_ms=critical,
        idle_s=_number(document, "idle_s", 2, 0, 3600, where),
        history=history,
        retention_days=_number(document, "retention_days", 30, 0.001, 36500, where),
        stale_after_s=_number(document, "stale_after_s", 180, 1, 10 ** 7, where),
        tls_warn_days=_number(document, "tls_warn_days", 14, 0, 3650, where),
        # One lock per history store: runs that would write the same history never overlap.
        lock=_path(document, "lock", base, where) or history.with_name(history.name + ".lock"),
        control_url=control,
        alluredir=_path(document, "alluredir", base, where),
        prometheus=prometheus,
        alert=alert,
    )


def load_canary(path: Path) -> CanaryConfig:
    document = read_document(path, "canary config",
                             missing=f"cannot read canary config {path}")
    return parse_canary(document, path.resolve())
