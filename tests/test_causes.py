"""Every cause in domain.md rows 1-11, reproduced on the reference service, named by the probe.

Each test breaks the demo shop the way a merchant's settings break in the field, runs a short
probe, and checks the probe's own output (the diagnosis table of its JSON summary).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import pytest

from chatprobe.config import AgentCredential
from chatprobe.probe import ProbeHooks, ProbeOptions, run_probe
from chatprobe.protocols.base import Conversation
from chatprobe.verdict import RunSummary, Status
from tests.conftest import ServiceProcess, scaled

PROBE_AGENTS = ("probe-1", "probe-2")


def run(service: ServiceProcess, messages: int = 20, customers: int = 2,
        hooks: ProbeHooks | None = None, **changes: Any) -> dict[str, Any]:
    config = service.target_config(**changes)
    options = ProbeOptions(messages=messages, customers=customers, rate_per_s=200.0)
    summary: RunSummary = asyncio.run(asyncio.wait_for(
        run_probe(service.base_url, config, options, hooks), timeout=scaled(60)))
    doc = summary.to_json()
    doc["_status"] = summary.status()
    return doc


def causes(doc: dict[str, Any], outcome: str = "lost") -> set[str]:
    return {row["cause"] for row in doc["diagnoses"] if row["outcome"] == outcome}


def patch_agents(service: ServiceProcess, fields: dict[str, Any]) -> None:
    for agent in PROBE_AGENTS:
        service.ok("PATCH", f"/admin/shops/demo/agents/{agent}", fields)


def test_row1_receive_permission_off(reference_service: ServiceProcess) -> None:
    patch_agents(reference_service, {"receive_messages": False})
    doc = run(reference_service)
    assert doc["lost"] == 20 and doc["delivered"] == 0
    assert causes(doc) == {"permission.receive_off"}
    assert doc["_status"] is Status.CRITICAL


def test_row1_permission_self_check_works_without_back_office_access(
        reference_service: ServiceProcess) -> None:
    patch_agents(reference_service, {"receive_messages": False})
    doc = run(reference_service, admin_token=None)
    assert doc["lost"] == 20
    assert causes(doc) == {"permission.receive_off"}


def test_row2_wrong_role(reference_service: ServiceProcess) -> None:
    patch_agents(reference_service, {"role": "read_only"})
    doc = run(reference_service)
    assert doc["lost"] == 20
    assert causes(doc) == {"permission.role"}


def test_row3_channel_permission_only_some_channels_reach_the_agents(
        reference_service: ServiceProcess) -> None:
    patch_agents(reference_service, {"channels": ["web"]})
    doc = run(reference_service, messages=40, customers=4, channels=("web", "app"))
    # Customers 0 and 2 write on web, 1 and 3 on the app: half arrives, half is lost.
    assert doc["delivered"] == 20 and doc["lost"] == 20
    assert causes(doc) == {"permission.channel"}


def test_row4_outside_business_hours(reference_service: ServiceProcess) -> None:
    now = dt.datetime.now(dt.UTC)
    start = (now + dt.timedelta(hours=2)).strftime("%H:%M")
    end = (now + dt.timedelta(hours=3)).strftime("%H:%M")
    reference_service.ok("PATCH", "/admin/shops/demo",
                         {"business_hours": {"start": start, "end": end}})
    doc = run(reference_service)
    assert doc["lost"] == 20
    assert causes(doc) == {"routing.business_hours"}


def test_row4_queued_outside_hours_is_delivered_late_when_hours_open(
        reference_service: ServiceProcess) -> None:
    now = dt.datetime.now(dt.UTC)
    closed = {"start": (now + dt.timedelta(hours=2)).strftime("%H:%M"),
              "end": (now + dt.timedelta(hours=3)).strftime("%H:%M")}
    reference_service.ok("PATCH", "/admin/shops/demo", {"business_hours": closed})

    async def open_hours_later(sent: int) -> None:
        if sent == 20:
            await asyncio.sleep(1.2)  # the fault window itself, not synchronisation
            await asyncio.to_thread(reference_service.ok, "PATCH", "/admin/shops/demo",
                                    {"business_hours": None})

    doc = run(reference_service, hooks=ProbeHooks(after_send=open_hours_later),
              sla_ms=1000.0, deadline_ms=scaled(8000.0))
    assert doc["late"] > 0 and doc["lost"] == 0
    # The agents' own profiles said "outside hours" at login: the lateness gets that name.
    assert causes(doc, "late") == {"routing.business_hours"}
    assert doc["_status"] is Status.WARNING


def test_row5_presence_away(reference_service: ServiceProcess) -> None:
    patch_agents(reference_service, {"presence": "away"})
    doc = run(reference_service)
    assert doc["lost"] == 20
    assert causes(doc) == {"presence.not_online"}


def test_row6_capacity_reached(reference_service: ServiceProcess) -> None:
    patch_agents(reference_service, {"capacity": 0})
    doc = run(reference_service)
    assert doc["lost"] == 20
    assert causes(doc) == {"routing.capacity_full"}


def test_row6_routing_rule_sends_everything_to_one_other_agent(
        reference_service: ServiceProcess) -> None:
    reference_service.ok("PUT", "/admin/shops/demo/agents/alice",
                         {"token": "alice-token", "presence": "online", "capacity": 1000})
    reference_service.ok("PATCH", "/admin/shops/demo", {"fixed_agent": "alice"})
    doc = run(reference_service)
    assert doc["lost"] == 20
    assert causes(doc) == {"routing.rule"}


def test_row7_keyword_filter_blocks_the_message(reference_service: ServiceProcess) -> None:
    reference_service.ok("PATCH", "/admin/shops/demo",
                         {"filters": [{"keyword": "order", "action": "block"},
                                      {"keyword": "[cp:", "action": "block"}]})
    doc = run(reference_service)
    assert doc["lost"] == 20
    assert causes(doc) == {"filter.blocked"}
    assert reference_service.stats()["filtered"] == 20


def test_row8_push_switch_off(reference_service: ServiceProcess) -> None:
    reference_service.ok("PATCH", "/admin/shops/demo", {"push_enabled": False})
    doc = run(reference_service)
    assert doc["lost"] == 20
    assert causes(doc) == {"push.disabled"}
    stats = reference_service.stats()
    assert stats["accepted"] == 20 and stats["pushed"] == 0


def test_row8_push_service_stalled(reference_service: ServiceProcess) -> None:
    reference_service.ok("POST", "/admin/faults", {"pause_push": True})
    doc = run(reference_service)
    assert doc["lost"] == 20
    assert causes(doc) == {"push.stalled"}


def test_row9_client_version_too_old(reference_service: ServiceProcess) -> None:
    reference_service.ok("PATCH", "/admin/shops/demo", {"min_client_version": "9.0.0"})
    doc = run(reference_service)
    assert doc["lost"] == 20
    assert causes(doc) == {"client.version_too_old"}


def test_row10_conversation_closed(reference_service: ServiceProcess) -> None:
    async def close_all(conversations: list[Conversation]) -> None:
        for conv in conversations:
            await asyncio.to_thread(reference_service.ok, "POST",
                                    f"/admin/conversations/{conv.id}/close")

    doc = run(reference_service, hooks=ProbeHooks(after_open=close_all))
    assert doc["lost"] == 20
    assert causes(doc) == {"conversation.closed"}


def test_row10_conversation_transferred_away_from_the_probe_agent(
        reference_service: ServiceProcess) -> None:
    reference_service.ok("PUT", "/admin/shops/demo/agents/alice",
                         {"token": "alice-token", "presence": "online"})

    async def transfer_all(conversations: list[Conversation]) -> None:
        for conv in conversations:
            await asyncio.to_thread(reference_service.ok, "POST",
                                    f"/admin/conversations/{conv.id}/transfer",
                                    {"agent": "alice"})

    doc = run(reference_service, hooks=ProbeHooks(after_open=transfer_all))
    assert doc["lost"] == 20
    assert causes(doc) == {"conversation.transferred"}


@pytest.mark.parametrize(("fields", "cause"), [
    ({"status": "frozen"}, "auth.account_frozen"),
    ({"token_expires_at": 1_000_000}, "auth.session_expired"),
])
def test_row11_login_refused(reference_service: ServiceProcess, fields: dict[str, Any],
                             cause: str) -> None:
    reference_service.ok("PATCH", "/admin/shops/demo/agents/probe-1", fields)
    doc = run(reference_service)
    assert doc["diagnoses"][0]["outcome"] == "run"
    assert doc["diagnoses"][0]["cause"] == cause
    assert doc["_status"] is Status.CRITICAL


def test_row11_wrong_token(reference_service: ServiceProcess) -> None:
    doc = run(reference_service, agents=(AgentCredential("probe-1", "wrong"),))
    assert doc["diagnoses"][0]["cause"] == "auth.rejected"


def test_row11_session_expires_mid_run(reference_service: ServiceProcess) -> None:
    async def expire_sessions(sent: int) -> None:
        if sent == 10:
            for agent in PROBE_AGENTS:
                await asyncio.to_thread(reference_service.ok, "PATCH",
                                        f"/admin/shops/demo/agents/{agent}",
                                        {"token_expires_at": time.time() - 1})

    doc = run(reference_service, hooks=ProbeHooks(after_send=expire_sessions))
    assert doc["lost"] > 0
    assert "auth.session_expired" in causes(doc)
