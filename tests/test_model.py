"""The reference service's shop model: business hours, eligibility, field validation, loading."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from chatprobe.service.model import (
    NOT_CONNECTED,
    Agent,
    BusinessHours,
    FilterRule,
    ModelError,
    Shop,
    apply_agent_fields,
    apply_shop_fields,
    ineligibility,
    shops_from_document,
)

ROOT = Path(__file__).resolve().parent.parent


def at(hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(2024, 5, 6, hour, minute, tzinfo=dt.UTC)


def hours(start: str, end: str) -> BusinessHours:
    parsed = BusinessHours.parse({"start": start, "end": end})
    assert parsed is not None
    return parsed


# -- business hours ---------------------------------------------------------------------


def test_parse_business_hours() -> None:
    assert BusinessHours.parse(None) is None
    assert hours("09:30", "17:05") == BusinessHours(570, 1025)
    assert hours("00:00", "24:00") == BusinessHours(0, 1440)


@pytest.mark.parametrize("value", [
    "09:00-17:00", [], {"start": "09:00"}, {"start": "09:00", "end": "17:00", "tz": "UTC"},
    {"start": "9:00", "end": "17:00"}, {"start": "09-00", "end": "17:00"},
    {"start": "09:00", "end": "25:00"}, {"start": "09:00", "end": "24:01"},
    {"start": "09:60", "end": "17:00"}, {"start": "ab:cd", "end": "17:00"},
    {"start": 900, "end": "17:00"}, {"start": None, "end": "17:00"},
    {"start": "09:00:00", "end": "17:00"}, {"start": "-1:00", "end": "17:00"},
])
def test_parse_business_hours_rejects(value: Any) -> None:
    with pytest.raises(ModelError):
        BusinessHours.parse(value)


@pytest.mark.parametrize("minute, inside", [
    ((8, 59), False), ((9, 0), True), ((12, 0), True), ((16, 59), True), ((17, 0), False),
    ((0, 0), False), ((23, 59), False),
])
def test_day_window(minute: tuple[int, int], inside: bool) -> None:
    assert hours("09:00", "17:00").contains(at(*minute)) is inside


@pytest.mark.parametrize("minute, inside", [
    ((21, 59), False), ((22, 0), True), ((23, 59), True), ((0, 0), True), ((5, 59), True),
    ((6, 0), False), ((12, 0), False),
])
def test_overnight_window(minute: tuple[int, int], inside: bool) -> None:
    assert hours("22:00", "06:00").contains(at(*minute)) is inside


def test_whole_day_window() -> None:
    window = hours("00:00", "24:00")
    assert all(window.contains(at(h, m)) for h in range(24) for m in (0, 59))


@settings(max_examples=200)
@given(start=st.integers(0, 1440), end=st.integers(0, 1440), minute=st.integers(0, 1439))
def test_contains_matches_clock_arithmetic(start: int, end: int, minute: int) -> None:
    """Inside iff the minute is less than the window's length past its start (mod a day)."""
    length = end - start if start <= end else end - start + 1440
    expected = (minute - start) % 1440 < length
    assert BusinessHours(start, end).contains(at(minute // 60, minute % 60)) is expected


@settings(max_examples=100)
@given(start=st.integers(0, 1440), end=st.integers(0, 1440))
def test_as_dict_round_trip(start: int, end: int) -> None:
    assume(start != end)
    window = BusinessHours(start, end)
    assert BusinessHours.parse(window.as_dict()) == window


def test_equal_start_and_end_is_rejected_not_silently_never_open() -> None:
    with pytest.raises(ModelError, match="use null for always open"):
        BusinessHours.parse({"start": "09:00", "end": "09:00"})


def test_unknown_filter_action_is_rejected() -> None:
    shop = Shop(id="s")
    with pytest.raises(ModelError, match="action"):
        apply_shop_fields(shop, {"filters": [{"keyword": "x", "action": "tickle"}]}, "shop")


# -- eligibility --------------------------------------------------------------------------


def broken() -> tuple[Shop, Agent, dict[str, Any]]:
    """A shop and agent with every problem ineligibility() knows, plus the call's context."""
    agent = Agent(id="a1", token="t", role="read_only", receive_messages=False,
                  channels={"app"}, skill_group="vip", presence="away", capacity=1,
                  business_hours=BusinessHours(0, 60), status="frozen")
    shop = Shop(id="s", fixed_agent="someone-else", agents={"a1": agent})
    context: dict[str, Any] = {"channel": "web", "skill_group": "general",
                               "active_conversations": 1, "connected": False, "now": at(12)}
    return shop, agent, context


# (reason, how to fix it); applied cumulatively in this order.
FIXES: list[tuple[str, str]] = [
    ("account_frozen", "status"),
    ("role_read_only", "role"),
    ("no_receive_permission", "receive_messages"),
    ("channel_not_permitted", "channels"),
    ("routing_rule", "fixed_agent"),
    ("skill_group_mismatch", "skill_group"),
    ("presence_away", "presence"),
    ("outside_business_hours", "business_hours"),
    (NOT_CONNECTED, "connected"),
    ("capacity_full", "capacity"),
]


def fix(shop: Shop, agent: Agent, context: dict[str, Any], what: str) -> None:
    if what == "status":
        agent.status = "active"
    elif what == "role":
        agent.role = "customer_service"
    elif what == "receive_messages":
        agent.receive_messages = True
    elif what == "channels":
        agent.channels.add("web")
    elif what == "fixed_agent":
        shop.fixed_agent = agent.id
    elif what == "skill_group":
        agent.skill_group = "general"
    elif what == "presence":
        agent.presence = "online"
    elif what == "business_hours":
        agent.business_hours = BusinessHours(9 * 60, 17 * 60)
    elif what == "connected":
        context["connected"] = True
    elif what == "capacity":
        agent.capacity = 2
    else:  # pragma: no cover
        raise AssertionError(what)


def test_ineligibility_reasons_in_order() -> None:
    shop, agent, context = broken()
    seen: list[str | None] = []
    for _, what in FIXES:
        seen.append(ineligibility(shop, agent, **context))
        fix(shop, agent, context, what)
    assert seen == [reason for reason, _ in FIXES]
    assert ineligibility(shop, agent, **context) is None


@pytest.mark.parametrize("index", range(len(FIXES)))
def test_each_reason_alone(index: int) -> None:
    """Only the problem at ``index`` left: that reason and no other."""
    shop, agent, context = broken()
    for i, (_, what) in enumerate(FIXES):
        if i != index:
            fix(shop, agent, context, what)
    assert ineligibility(shop, agent, **context) == FIXES[index][0]


def test_banned_account() -> None:
    agent = Agent(id="a", token="t", status="banned")
    assert ineligibility(Shop(id="s"), agent, "web", None, 0, True, at(12)) == "account_banned"


def test_offline_presence() -> None:
    agent = Agent(id="a", token="t", presence="offline")
    assert ineligibility(Shop(id="s"), agent, "web", None, 0, True, at(12)) == (
        "presence_offline")


def test_no_skill_group_requested_matches_any_agent() -> None:
    agent = Agent(id="a", token="t", skill_group="vip")
    assert ineligibility(Shop(id="s"), agent, "web", None, 0, True, at(12)) is None


def test_shop_hours_apply_when_agent_has_none() -> None:
    shop = Shop(id="s", business_hours=BusinessHours(9 * 60, 17 * 60))
    agent = Agent(id="a", token="t")
    assert ineligibility(shop, agent, "web", None, 0, True, at(8)) == "outside_business_hours"
    assert ineligibility(shop, agent, "web", None, 0, True, at(10)) is None


def test_agent_hours_override_shop_hours() -> None:
    shop = Shop(id="s", business_hours=BusinessHours(9 * 60, 17 * 60))
    agent = Agent(id="a", token="t", business_hours=BusinessHours(22 * 60, 6 * 60))
    assert ineligibility(shop, agent, "web", None, 0, True, at(23)) is None
    assert ineligibility(shop, agent, "web", None, 0, True, at(10)) == "outside_business_hours"


def test_capacity_boundary() -> None:
    agent = Agent(id="a", token="t", capacity=3)
    shop = Shop(id="s")
    assert ineligibility(shop, agent, "web", None, 2, True, at(12)) is None
    assert ineligibility(shop, agent, "web", None, 3, True, at(12)) == "capacity_full"
    zero = Agent(id="z", token="t", capacity=0)
    assert ineligibility(shop, zero, "web", None, 0, True, at(12)) == "capacity_full"


# -- agent fields -----------------------------------------------------------------------


def test_apply_agent_fields_all_good() -> None:
    agent = Agent(id="a", token="old")
    apply_agent_fields(agent, {
        "token": "new", "role": "admin", "receive_messages": False, "channels": ["web", "app"],
        "skill_group": "vip", "presence": "away", "capacity": 0,
        "business_hours": {"start": "08:00", "end": "20:00"}, "status": "frozen",
        "token_expires_at": 1_700_000_000}, "agents.a")
    assert agent == Agent(id="a", token="new", role="admin", receive_messages=False,
                          channels={"web", "app"}, skill_group="vip", presence="away",
                          capacity=0, business_hours=BusinessHours(480, 1200),
                          status="frozen", token_expires_at=1_700_000_000.0)
    apply_agent_fields(agent, {"business_hours": None, "token_expires_at": None}, "agents.a")
    assert agent.business_hours is None and agent.token_expires_at is None


def test_apply_agent_fields_partial_keeps_others() -> None:
    agent = Agent(id="a", token="t", capacity=7)
    apply_agent_fields(agent, {"presence": "offline"}, "agents.a")
    assert agent.presence == "offline" and agent.capacity == 7 and agent.token == "t"


@pytest.mark.parametrize("field, value", [
    ("token", ""), ("token", 5), ("role", "boss"), ("role", None),
    ("receive_messages", "yes"), ("receive_messages", 1),
    ("channels", "web"), ("channels", ["web", "sms"]), ("channels", None),
    ("skill_group", ""), ("presence", "busy"), ("capacity", -1), ("capacity", True),
    ("capacity", 1.5), ("capacity", "3"), ("status", "gone"), ("token_expires_at", "soon"),
    ("nickname", "x"),
])
def test_apply_agent_fields_rejects(field: str, value: Any) -> None:
    with pytest.raises(ModelError) as info:
        apply_agent_fields(Agent(id="a", token="t"), {field: value}, "agents.a")
    assert f"agents.a.{field}" in str(info.value)


def test_apply_agent_fields_rejects_bad_hours() -> None:
    with pytest.raises(ModelError):
        apply_agent_fields(Agent(id="a", token="t"), {"business_hours": {"start": "x"}},
                           "agents.a")


def test_apply_agent_fields_rejects_boolean_expiry() -> None:
    with pytest.raises(ModelError):
        apply_agent_fields(Agent(id="a", token="t"), {"token_expires_at": True}, "agents.a")


# -- shop fields ------------------------------------------------------------------------


def test_apply_shop_fields_all_good() -> None:
    shop = Shop(id="s")
    apply_shop_fields(shop, {
        "name": "My Shop", "push_enabled": False, "min_client_version": "4.2",
        "business_hours": {"start": "10:00", "end": "02:00"}, "fixed_agent": "a1",
        "filters": [{"keyword": "spam"}, {"keyword": "wechat", "action": "block"}],
        "agents": {"a1": {"token": "t1", "capacity": 3}},
    }, "shops.s")
    assert shop.name == "My Shop" and shop.push_enabled is False
    assert shop.min_client_version == "4.2"
    assert shop.business_hours == BusinessHours(600, 120)
    assert shop.fixed_agent == "a1"
    assert shop.filters == [FilterRule("spam", "block"), FilterRule("wechat", "block")]
    assert shop.agents["a1"].token == "t1" and shop.agents["a1"].capacity == 3
    apply_shop_fields(shop, {"fixed_agent": None, "business_hours": None}, "shops.s")
    assert shop.fixed_agent is None and shop.business_hours is None


def test_apply_shop_fields_updates_existing_agent() -> None:
    shop = Shop(id="s", agents={"a1": Agent(id="a1", token="t1", capacity=9)})
    apply_shop_fields(shop, {"agents": {"a1": {"presence": "away"}}}, "shops.s")
    assert shop.agents["a1"].presence == "away"
    assert shop.agents["a1"].capacity == 9 and shop.agents["a1"].token == "t1"


def test_filtered_by_is_case_insensitive() -> None:
    shop = Shop(id="s", filters=[FilterRule("Add Me On WeChat")])
    assert shop.filtered_by("please ADD ME ON wechat now") == shop.filters[0]
    assert shop.filtered_by("hello") is None


@pytest.mark.parametrize("data, place", [
    ({"push_enabled": "no"}, "shops.s.push_enabled"),
    ({"min_client_version": ""}, "shops.s.min_client_version"),
    ({"business_hours": "always"}, "business_hours"),
    ({"fixed_agent": ""}, "shops.s.fixed_agent"),
    ({"fixed_agent": 3}, "shops.s.fixed_agent"),
    ({"filters": "spam"}, "shops.s.filters"),
    ({"filters": [{"action": "block"}]}, "shops.s.filters[0]"),
    ({"filters": ["spam"]}, "shops.s.filters[0]"),
    ({"filters": [{"keyword": ""}]}, "shops.s.filters[0].keyword"),
    ({"agents": ["a1"]}, "shops.s.agents"),
    ({"agents": {"a1": "t1"}}, "shops.s.agents.a1"),
    ({"agents": {"a1": {"capacity": 3}}}, "shops.s.agents.a1.token"),
    ({"agents": {"a1": {"token": "t", "role": "boss"}}}, "shops.s.agents.a1.role"),
    ({"owner": "x"}, "shops.s.owner"),
])
def test_apply_shop_fields_rejects(data: dict[str, Any], place: str) -> None:
    with pytest.raises(ModelError) as info:
        apply_shop_fields(Shop(id="s"), data, "shops.s")
    assert place in str(info.value)


# -- documents ------------------------------------------------------------------------


def test_shops_from_document() -> None:
    shops = shops_from_document({"shops": {
        "a": {"name": "A", "agents": {"x": {"token": "tx"}}},
        "b": {},
    }})
    assert sorted(shops) == ["a", "b"]
    assert shops["a"].id == "a" and shops["a"].name == "A"
    assert shops["a"].agents["x"].id == "x"
    assert shops["b"].agents == {} and shops["b"].push_enabled is True


@pytest.mark.parametrize("document", [
    None, [], {"shop": {}}, {"shops": []}, {"shops": {}}, {"shops": {"a": "x"}},
    {"shops": {"a": {"colour": "red"}}},
])
def test_shops_from_document_rejects(document: Any) -> None:
    with pytest.raises(ModelError):
        shops_from_document(document)


def test_shipped_demo_shop_loads() -> None:
    document = yaml.safe_load((ROOT / "fixtures" / "shops" / "demo.yaml").read_text("utf-8"))
    shops = shops_from_document(document)
    assert list(shops) == ["demo"]
    demo = shops["demo"]
    assert demo.push_enabled and demo.business_hours is None and demo.fixed_agent is None
    assert set(demo.agents) == {"probe-1", "probe-2", "supervisor"}
    assert len(demo.filters) == 3
    for agent_id in ("probe-1", "probe-2"):
        agent = demo.agents[agent_id]
        assert ineligibility(demo, agent, "web", "general", 0, True, at(3)) is None
    supervisor = demo.agents["supervisor"]
    assert ineligibility(demo, supervisor, "web", None, 0, True, at(3)) == "role_read_only"
    assert demo.filtered_by("Add me on WeChat please") is not None


def test_public_views() -> None:
    agent = Agent(id="a", token="secret", business_hours=BusinessHours(60, 120))
    public = agent.public()
    assert "secret" not in str(public)
    assert public["business_hours"] == {"start": "01:00", "end": "02:00"}
    assert public["channels"] == ["app", "mini_program", "web"]
    shop = Shop(id="s", agents={"a": agent}, filters=[FilterRule("x")])
    view = shop.public()
    assert view["agents"]["a"] == public
    assert view["filters"] == [{"keyword": "x", "action": "block"}]
    assert "secret" not in str(view)
