"""The reference service's shop model: shops, agents, routing eligibility, filters (pure).

Loaded from a YAML/JSON document (fixtures/shops/demo.yaml is the default) and changed at run
time through the admin API. Every rule here mirrors a platform behaviour from domain.md so the
probe can reproduce each cause of a missing message.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

ROLES = ("customer_service", "admin", "read_only")
CHANNELS = ("web", "app", "mini_program")
PRESENCES = ("online", "away", "offline")
ACCOUNT_STATES = ("active", "frozen", "banned")
FILTER_ACTIONS = ("block", "spam")  # both keep the message from the agent; the trace says which


class ModelError(ValueError):
    """A shop or agent definition is invalid."""


@dataclass
class BusinessHours:
    """Daily window in UTC, ``start`` inclusive, ``end`` exclusive; overnight when start > end."""

    start_minute: int
    end_minute: int

    @classmethod
    def parse(cls, value: Any) -> BusinessHours | None:
        if value is None:
            return None
        if not isinstance(value, dict) or set(value) != {"start", "end"}:
            raise ModelError("business_hours must be null or {start: 'HH:MM', end: 'HH:MM'}")
        start, end = _minute(value["start"]), _minute(value["end"])
        if start == end:
            raise ModelError("business_hours start and end are equal; use null for always open")
        return cls(start, end)

    def contains(self, now: dt.datetime) -> bool:
        minute = now.hour * 60 + now.minute
        if self.start_minute <= self.end_minute:
            return self.start_minute <= minute < self.end_minute
        return minute >= self.start_minute or minute < self.end_minute

    def as_dict(self) -> dict[str, str]:
        return {"start": _hhmm(self.start_minute), "end": _hhmm(self.end_minute)}


def _minute(text: Any) -> int:
    if not isinstance(text, str) or len(text) != 5 or text[2] != ":":
        raise ModelError(f"time {text!r} must look like 'HH:MM'")
    if not (text[:2] + text[3:]).isascii() or not (text[:2] + text[3:]).isdigit():
        raise ModelError(f"time {text!r} must look like 'HH:MM'")
    hours, minutes = int(text[:2]), int(text[3:])
    if not (0 <= hours <= 24 and 0 <= minutes < 60) or hours * 60 + minutes > 1440:
        raise ModelError(f"time {text!r} is not a time of day")
    return hours * 60 + minutes


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


@dataclass
class Agent:
    id: str
    token: str
    role: str = "customer_service"
    receive_messages: bool = True
    channels: set[str] = field(default_factory=lambda: set(CHANNELS))
    skill_group: str = "general"
    presence: str = "online"
    capacity: int = 100
    business_hours: BusinessHours | None = None
    status: str = "active"
    token_expires_at: float | None = None  # unix seconds; None = never

    def public(self) -> dict[str, Any]:
        """What the agent may see of itself (sent in its welcome frame)."""
        return {
            "agent": self.id,
            "role": self.role,
            "receive_messages": self.receive_messages,
            "channels": sorted(self.channels),
            "skill_group": self.skill_group,
            "presence": self.presence,
            "capacity": self.capacity,
            "business_hours": self.business_hours.as_dict() if self.business_hours else None,
            "status": self.status,
        }


@dataclass
class FilterRule:
    keyword: str
    action: str = "block"


@dataclass
class Shop:
    id: str
    name: str = ""
    push_enabled: bool = True
    min_client_version: str = "0"
    business_hours: BusinessHours | None = None
    fixed_agent: str | None = None  # routing rule: every conversation to this agent
    filters: list[FilterRule] = field(default_factory=list)
    agents: dict[str, Agent] = field(default_factory=dict)

    def filtered_by(self, text: str) -> FilterRule | None:
        lowered = text.casefold()
        for rule in self.filters:
            if rule.keyword.casefold() in lowered:
                return rule
        return None

    def public(self) -> dict[str, Any]:
        return {
            "shop": self.id,
            "name": self.name,
            "push_enabled": self.push_enabled,
            "min_client_version": self.min_client_version,
            "business_hours": self.business_hours.as_dict() if self.business_hours else None,
            "fixed_agent": self.fixed_agent,
            "filters": [{"keyword": f.keyword, "action": f.action} for f in self.filters],
            "agents": {a.id: a.public() for a in self.agents.values()},
        }


# Why an agent is not eligible for a conversation (the reference platform's own trace words).
NOT_CONNECTED = "not_connected"


def ineligibility(shop: Shop, agent: Agent, channel: str, skill_group: str | None,
                  active_conversations: int, connected: bool, now: dt.datetime) -> str | None:
    """None when the router may assign this conversation to ``agent``; else the reason."""
    if agent.status != "active":
        return "account_" + agent.status
    if agent.role == "read_only":
        return "role_read_only"
    if not agent.receive_messages:
        return "no_receive_permission"
    if channel not in agent.channels:
        return "channel_not_permitted"
    if shop.fixed_agent is not None and agent.id != shop.fixed_agent:
        return "routing_rule"
    if skill_group is not None and agent.skill_group != skill_group:
        return "skill_group_mismatch"
    if agent.presence != "online":
        return "presence_" + agent.presence
    hours = agent.business_hours or shop.business_hours
    if hours is not None and not hours.contains(now):
        return "outside_business_hours"
    if not connected:
        return NOT_CONNECTED
    if active_conversations >= agent.capacity:
        return "capacity_full"
    return None


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ModelError(f"{where} must be true or false")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ModelError(f"{where} must be a non-empty string")
    return value


def _choice(value: Any, allowed: tuple[str, ...], where: str) -> str:
    if value not in allowed:
        raise ModelError(f"{where} must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


def apply_agent_fields(agent: Agent, data: dict[str, Any], where: str) -> None:
    """Update an agent from a (partial) definition; raise ModelError on the first bad field."""
    for key, value in data.items():
        place = f"{where}.{key}"
        if key == "token":
            agent.token = _str(value, place)
        elif key == "role":
            agent.role = _choice(value, ROLES, place)
        elif key == "receive_messages":
            agent.receive_messages = _bool(value, place)
        elif key == "channels":
            if not isinstance(value, list):
                raise ModelError(f"{place} must be a list of {', '.join(CHANNELS)}")
            agent.channels = {_choice(v, CHANNELS, place) for v in value}
        elif key == "skill_group":
            agent.skill_group = _str(value, place)
        elif key == "presence":
            agent.presence = _choice(value, PRESENCES, place)
        elif key == "capacity":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ModelError(f"{place} must be a non-negative integer")
            agent.capacity = value
        elif key == "business_hours":
            agent.business_hours = BusinessHours.parse(value)
        elif key == "status":
            agent.status = _choice(value, ACCOUNT_STATES, place)
        elif key == "token_expires_at":
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, int | float)):
                raise ModelError(f"{place} must be null or unix seconds")
            agent.token_expires_at = None if value is None else float(value)
        else:
            raise ModelError(f"{place}: unknown field")


def apply_shop_fields(shop: Shop, data: dict[str, Any], where: str) -> None:
    for key, value in data.items():
        place = f"{where}.{key}"
        if key == "name":
            shop.name = str(value)
        elif key == "push_enabled":
            shop.push_enabled = _bool(value, place)
        elif key == "min_client_version":
            shop.min_client_version = _str(str(value), place)
        elif key == "business_hours":
            shop.business_hours = BusinessHours.parse(value)
        elif key == "fixed_agent":
            if value is not None:
                _str(value, place)
            shop.fixed_agent = value
        elif key == "filters":
            if not isinstance(value, list):
                raise ModelError(f"{place} must be a list of {{keyword, action}}")
            rules = []
            for i, item in enumerate(value):
                if not isinstance(item, dict) or "keyword" not in item:
                    raise ModelError(f"{place}[{i}] must have a keyword")
                action = _choice(item.get("action", "block"), FILTER_ACTIONS,
                                 f"{place}[{i}].action")
                rules.append(FilterRule(_str(item["keyword"], f"{place}[{i}].keyword"), action))
            shop.filters = rules
        elif key == "agents":
            if not isinstance(value, dict):
                raise ModelError(f"{place} must be a mapping of agent id to settings")
            for agent_id, agent_data in value.items():
                if not isinstance(agent_data, dict):
                    raise ModelError(f"{place}.{agent_id} must be a mapping")
                agent = shop.agents.get(agent_id) or Agent(id=str(agent_id), token="")
                apply_agent_fields(agent, agent_data, f"{place}.{agent_id}")
                if not agent.token:
                    raise ModelError(f"{place}.{agent_id}.token is required")
                shop.agents[agent.id] = agent
        else:
            raise ModelError(f"{place}: unknown field")


def shops_from_document(document: Any) -> dict[str, Shop]:
    """Build shops from a parsed config document ``{shops: {id: {...}}}``."""
    if not isinstance(document, dict) or not isinstance(document.get("shops"), dict):
        raise ModelError("config must be a mapping with a 'shops' mapping at the top")
    shops: dict[str, Shop] = {}
    for shop_id, data in document["shops"].items():
        if not isinstance(data, dict):
            raise ModelError(f"shops.{shop_id} must be a mapping")
        shop = Shop(id=str(shop_id))
        apply_shop_fields(shop, data, f"shops.{shop_id}")
        shops[shop.id] = shop
    if not shops:
        raise ModelError("config defines no shops")
    return shops
