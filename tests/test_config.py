"""Target configuration: good documents, one-line HarnessErrors naming the bad field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from chatprobe.config import (
    AgentCredential,
    TargetConfig,
    default_target_path,
    load_target,
    parse_target,
    with_overrides,
)
from chatprobe.errors import HarnessError

ROOT = Path(__file__).resolve().parent.parent
AGENTS = [{"id": "probe-1", "token": "t1"}, {"id": "probe-2", "token": "t2"}]


def good(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "protocol": "reference", "shop": "demo", "client_version": "5.1.0",
        "channels": ["web", "app"], "agents": AGENTS, "admin_token": "adm",
        "sla_ms": 1500, "deadline_ms": 4000.5, "connect_timeout_s": 2,
        "reconnect_window_s": 0, "extra": {"k": 1},
    }
    doc.update(changes)
    return doc


def harness_error(document: Any) -> str:
    with pytest.raises(HarnessError) as info:
        parse_target(document, "cfg.yaml")
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


def test_parse_good_document() -> None:
    config = parse_target(good(), "cfg.yaml")
    assert config == TargetConfig(
        protocol="reference", shop="demo",
        agents=(AgentCredential("probe-1", "t1"), AgentCredential("probe-2", "t2")),
        admin_token="adm", client_version="5.1.0", channels=("web", "app"), sla_ms=1500.0,
        deadline_ms=4000.5, connect_timeout_s=2.0, reconnect_window_s=0.0, extra={"k": 1})
    assert isinstance(config.sla_ms, float)


def test_defaults_for_missing_fields() -> None:
    config = parse_target({"agents": AGENTS[:1]}, "cfg.yaml")
    assert config == TargetConfig(agents=(AgentCredential("probe-1", "t1"),))
    assert config.channels == ("web",) and config.admin_token is None


def test_single_channel_string() -> None:
    assert parse_target(good(channels="app"), "x").channels == ("app",)


def test_a_p99_threshold_is_optional_and_overridable() -> None:
    assert parse_target(good(), "x").p99_warning_ms is None
    assert parse_target(good(p99_warning_ms=None), "x").p99_warning_ms is None
    config = parse_target(good(p99_warning_ms=800), "x")
    assert config.p99_warning_ms == 800.0
    assert with_overrides(config, p99_warning_ms=250.0).p99_warning_ms == 250.0
    assert with_overrides(config).p99_warning_ms == 800.0  # no flag: the file's


def test_sla_equal_to_deadline_allowed() -> None:
    config = parse_target(good(sla_ms=2000, deadline_ms=2000), "x")
    assert config.sla_ms == config.deadline_ms == 2000.0


@pytest.mark.parametrize("changes, field", [
    ({"agents": []}, "agents"),
    ({"agents": "probe-1"}, "agents"),
    ({"agents": None}, "agents"),
    ({"agents": [{"id": "a"}]}, "agents[0]"),
    ({"agents": [{"id": "a", "token": "t"}, {"id": 2, "token": "t"}]}, "agents[1]"),
    ({"agents": [{"id": "a", "token": None}]}, "agents[0]"),
    ({"agents": ["probe-1"]}, "agents[0]"),
    ({"channels": []}, "channels"),
    ({"channels": ["web", "sms"]}, "channels"),
    ({"channels": "sms"}, "channels"),
    ({"channels": {"web": True}}, "channels"),
    ({"protocol": 1}, "protocol"),
    ({"shop": ["demo"]}, "shop"),
    ({"client_version": 5.1}, "client_version"),
    ({"admin_token": 123}, "admin_token"),
    ({"sla_ms": "fast"}, "sla_ms"),
    ({"sla_ms": 0}, "sla_ms"),
    ({"sla_ms": True}, "sla_ms"),
    ({"sla_ms": None}, "sla_ms"),
    ({"sla_ms": float("nan")}, "sla_ms"),
    ({"deadline_ms": 3_600_001}, "deadline_ms"),
    ({"deadline_ms": float("inf")}, "deadline_ms"),
    ({"p99_warning_ms": "1s"}, "p99_warning_ms"),
    ({"p99_warning_ms": 0}, "p99_warning_ms"),
    ({"p99_warning_ms": False}, "p99_warning_ms"),
    ({"sla_ms": 5000, "deadline_ms": 4000}, "deadline_ms"),
    ({"sla_ms": 2000, "deadline_ms": 1999.5}, "deadline_ms"),
    ({"connect_timeout_s": 0.05}, "connect_timeout_s"),
    ({"connect_timeout_s": 301}, "connect_timeout_s"),
    ({"reconnect_window_s": -1}, "reconnect_window_s"),
    ({"reconnect_window_s": "30"}, "reconnect_window_s"),
    ({"extra": []}, "extra"),
    ({"agent": AGENTS}, "agent"),  # a typo is an unknown field, named
    ({"sla": 1000}, "sla"),
])
def test_bad_field_names_the_field(changes: dict[str, Any], field: str) -> None:
    message = harness_error(good(**changes))
    assert field in message
    assert message.startswith("cfg.yaml")


def test_missing_agents() -> None:
    doc = good()
    del doc["agents"]
    assert "agents" in harness_error(doc)


def test_unknown_fields_all_named() -> None:
    message = harness_error(good(zeta=1, alpha=2))
    assert "alpha" in message and "zeta" in message


@pytest.mark.parametrize("document", [None, [], "text", 3])
def test_document_must_be_mapping(document: Any) -> None:
    assert "mapping" in harness_error(document)


@pytest.mark.parametrize("key", [1, None, True])
def test_non_string_unknown_key_is_harness_error(key: Any) -> None:
    doc: dict[Any, Any] = good()
    doc[key] = "x"
    assert str(key) in harness_error(doc)


def test_yaml_file_with_integer_key_is_harness_error(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("agents: [{id: a, token: b}]\n1: x\n", encoding="utf-8")
    with pytest.raises(HarnessError):
        load_target(path)


# -- files ------------------------------------------------------------------------------


def test_load_yaml_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "t.yaml"
    yaml_file.write_text("agents:\n  - {id: a, token: b}\nsla_ms: 100\ndeadline_ms: 200\n",
                         encoding="utf-8")
    json_file = tmp_path / "t.json"
    json_file.write_text(json.dumps(good()), encoding="utf-8")
    assert load_target(yaml_file).sla_ms == 100.0
    assert load_target(json_file) == parse_target(good(), "x")


def test_load_names_the_file_in_field_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("agents: []\n", encoding="utf-8")
    with pytest.raises(HarnessError, match="agents") as info:
        load_target(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["missing.yaml", "."])
def test_unreadable_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with pytest.raises(HarnessError) as info:
        load_target(path)
    message = str(info.value)
    assert "cannot read config" in message and "\n" not in message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_bytes(b"agents: \xff\xfe\n")
    with pytest.raises(HarnessError, match="UTF-8"):
        load_target(path)


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "agents: [\n  - {id: a\n"),
    (".yaml", "a: b: c\n"),
    (".yaml", "\tagents: 1\n"),
    (".yml", "key: [unclosed\n"),
    (".json", "{\"agents\": [}"),
    (".json", ""),
])
def test_invalid_yaml_or_json(tmp_path: Path, suffix: str, text: str) -> None:
    path = tmp_path / f"t{suffix}"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(HarnessError) as info:
        load_target(path)
    message = str(info.value)
    assert "not valid YAML/JSON" in message and "\n" not in message


def test_empty_yaml_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(HarnessError, match="mapping"):
        load_target(path)


def test_shipped_reference_target_loads() -> None:
    path = ROOT / "fixtures" / "targets" / "reference.yaml"
    config = load_target(path)
    assert config.protocol == "reference" and config.shop == "demo"
    assert [a.id for a in config.agents] == ["probe-1", "probe-2"]
    assert config.sla_ms == 3000.0 and config.deadline_ms == 10000.0
    assert config.admin_token is None


def test_default_target_path_is_the_shipped_one() -> None:
    assert default_target_path().resolve() == (
        ROOT / "fixtures" / "targets" / "reference.yaml").resolve()
    assert load_target(None) == load_target(default_target_path())
