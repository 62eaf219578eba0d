"""Diagnoses: the agent self-check's order, diagnose()'s priority, and every cause described."""

from __future__ import annotations

import dataclasses

import pytest

from chatprobe.diagnosis import (
    DESCRIPTIONS,
    AgentSelf,
    Cause,
    Diagnosis,
    Evidence,
    diagnose,
    self_check,
)

OK_AGENT = AgentSelf(agent="probe-1", channels=frozenset({"web", "app"}))

# Every way the self-check can fail, in the order self_check tests them.
FAULTS: list[tuple[dict[str, object], Cause]] = [
    ({"role": "read_only"}, Cause.WRONG_ROLE),
    ({"receive_messages": False}, Cause.RECEIVE_PERMISSION),
    ({"channels": frozenset({"app"})}, Cause.CHANNEL_PERMISSION),
    ({"client_supported": False}, Cause.CLIENT_VERSION),
    ({"presence": "away"}, Cause.PRESENCE),
    ({"within_hours": False}, Cause.BUSINESS_HOURS),
]


def agent_with(*faults: dict[str, object], name: str = "probe-1") -> AgentSelf:
    changes: dict[str, object] = {"agent": name}
    for fault in faults:
        changes.update(fault)
    return dataclasses.replace(OK_AGENT, **changes)  # type: ignore[arg-type]


def test_eligible_agent_has_no_cause() -> None:
    assert self_check(OK_AGENT, "web") is None


@pytest.mark.parametrize("role", ["customer_service", "admin"])
def test_receiving_roles(role: str) -> None:
    assert self_check(agent_with({"role": role}), "web") is None


@pytest.mark.parametrize("fault, cause", FAULTS, ids=[c.value for _, c in FAULTS])
def test_self_check_each_cause(fault: dict[str, object], cause: Cause) -> None:
    assert self_check(agent_with(fault), "web") is cause


@pytest.mark.parametrize("presence", ["away", "offline", "busy"])
def test_any_presence_but_online_is_presence(presence: str) -> None:
    assert self_check(agent_with({"presence": presence}), "web") is Cause.PRESENCE


@pytest.mark.parametrize("start", range(len(FAULTS)))
def test_self_check_order(start: int) -> None:
    """With every fault from ``start`` on, the first one in the documented order wins."""
    agent = agent_with(*(fault for fault, _ in FAULTS[start:]))
    assert self_check(agent, "web") is FAULTS[start][1]


def test_channel_check_skipped_without_channel_or_channel_list() -> None:
    restricted = agent_with({"channels": frozenset({"app"})})
    assert self_check(restricted, "") is None  # channel unknown
    assert self_check(agent_with({"channels": frozenset()}), "web") is None  # not visible
    assert self_check(restricted, "app") is None


# -- diagnose ---------------------------------------------------------------------------


def test_platform_cause_comes_first() -> None:
    evidence = Evidence(acked=False, platform_cause=Cause.FILTERED, platform_detail="rule 3",
                        connection_lost=True, agents=(agent_with(FAULTS[0][0]),),
                        delivered_late=True)
    assert diagnose(evidence) == Diagnosis(Cause.FILTERED, "rule 3")


def test_no_ack_is_not_accepted() -> None:
    evidence = Evidence(acked=False, agents=(agent_with(FAULTS[1][0]),), delivered_late=True)
    assert diagnose(evidence).cause is Cause.NOT_ACCEPTED


def test_no_ack_with_lost_connection_is_disconnected() -> None:
    evidence = Evidence(acked=False, connection_lost=True, agents=(agent_with(FAULTS[1][0]),))
    assert diagnose(evidence).cause is Cause.DISCONNECTED


def test_all_agents_ineligible_gives_first_agents_cause() -> None:
    agents = (agent_with(FAULTS[4][0], name="probe-1"), agent_with(FAULTS[0][0], name="probe-2"))
    result = diagnose(Evidence(acked=True, channel="web", agents=agents, connection_lost=True,
                               delivered_late=True))
    assert result.cause is Cause.PRESENCE
    assert "probe-1" in result.detail and "probe-2" in result.detail


def test_self_check_uses_evidence_channel() -> None:
    agents = (agent_with({"channels": frozenset({"app"})}),)
    assert diagnose(Evidence(acked=True, channel="web", agents=agents)).cause is (
        Cause.CHANNEL_PERMISSION)
    assert diagnose(Evidence(acked=True, channel="app", agents=agents)).cause is (
        Cause.UNEXPLAINED)


def test_one_eligible_agent_skips_self_check_causes() -> None:
    agents = (agent_with(FAULTS[1][0], name="probe-1"), OK_AGENT)
    assert diagnose(Evidence(acked=True, agents=agents)).cause is Cause.UNEXPLAINED
    assert diagnose(Evidence(acked=True, agents=agents, delivered_late=True)).cause is (
        Cause.SLOW)


def test_acked_then_connection_lost_is_disconnected() -> None:
    result = diagnose(Evidence(acked=True, connection_lost=True, delivered_late=True))
    assert result.cause is Cause.DISCONNECTED


def test_late_is_slow() -> None:
    assert diagnose(Evidence(acked=True, delivered_late=True)) == Diagnosis(Cause.SLOW)


def test_otherwise_unexplained() -> None:
    assert diagnose(Evidence(acked=True)) == Diagnosis(Cause.UNEXPLAINED)
    assert diagnose(Evidence(acked=True, agents=(OK_AGENT,))) == Diagnosis(Cause.UNEXPLAINED)


def test_every_cause_has_a_description() -> None:
    assert set(DESCRIPTIONS) == set(Cause)
    for cause in Cause:
        assert DESCRIPTIONS[cause].strip(), cause
        assert "\n" not in DESCRIPTIONS[cause]


def test_cause_values_unique() -> None:
    assert len({c.value for c in Cause}) == len(Cause)


def test_diagnosis_line() -> None:
    assert Diagnosis(Cause.SLOW).line() == f"sla.slow: {DESCRIPTIONS[Cause.SLOW]}"
    assert Diagnosis(Cause.PUSH_LOST, "id 7").line() == (
        f"push.lost: {DESCRIPTIONS[Cause.PUSH_LOST]} (id 7)")
