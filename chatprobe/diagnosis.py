"""Diagnoses: the named causes of lost or late messages (domain.md) and how evidence maps to them.

Pure code. Adapters translate what their platform says (an error code, a message trace, an
agent's own settings) into :class:`Evidence`; :func:`diagnose` picks the most specific cause.
A probe never reports a bare "timeout" when the evidence names something better.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Cause(StrEnum):
    """Every cause chatprobe can name. The domain.md row is in the comment."""

    RECEIVE_PERMISSION = "permission.receive_off"  # 1
    WRONG_ROLE = "permission.role"  # 2
    CHANNEL_PERMISSION = "permission.channel"  # 3
    BUSINESS_HOURS = "routing.business_hours"  # 4
    PRESENCE = "presence.not_online"  # 5
    CAPACITY = "routing.capacity_full"  # 6
    ROUTING_RULE = "routing.rule"  # 6
    FILTERED = "filter.blocked"  # 7
    PUSH_DISABLED = "push.disabled"  # 8
    PUSH_LOST = "push.lost"  # 8: accepted and routed, then lost on the push path
    PUSH_STALLED = "push.stalled"  # 8: accepted, push held back
    CLIENT_VERSION = "client.version_too_old"  # 9
    CONVERSATION_CLOSED = "conversation.closed"  # 10
    CONVERSATION_TRANSFERRED = "conversation.transferred"  # 10
    AUTH_REJECTED = "auth.rejected"  # 11
    SESSION_EXPIRED = "auth.session_expired"  # 11
    ACCOUNT_FROZEN = "auth.account_frozen"  # 11
    TRANSPORT = "transport.unreachable"  # 12-15: could not connect at all
    DISCONNECTED = "transport.disconnected"  # 12-14: connection died mid-run
    UPGRADE_REFUSED = "transport.upgrade_refused"  # 13: plain HTTP instead of the upgrade
    TLS_EXPIRED = "tls.certificate_expired"  # 12: the push channel dies the day it expires
    TLS_HOST_NAME = "tls.wrong_host_name"  # 12: certificate for another name
    TLS_UNKNOWN_CA = "tls.unknown_ca"  # 12: issuer not trusted (private CA, MITM proxy)
    TLS_FAILED = "tls.handshake_failed"  # 12: any other TLS failure
    PROTOCOL = "protocol.invalid_frames"  # the target spoke something we cannot read
    NOT_ACCEPTED = "platform.not_accepted"  # no ack: the platform never took the message
    SLOW = "sla.slow"  # delivered, but after the SLA, with no more specific cause
    UNEXPLAINED = "unexplained"  # acked, nothing else visible (the protocol shows no more)


DESCRIPTIONS: dict[Cause, str] = {
    Cause.RECEIVE_PERMISSION: "agent lacks the receive-messages permission",
    Cause.WRONG_ROLE: "agent's role cannot receive conversations (e.g. read-only)",
    Cause.CHANNEL_PERMISSION: "agent is not permitted on this channel",
    Cause.BUSINESS_HOURS: "outside the agent's or shop's business hours; conversation queued",
    Cause.PRESENCE: "agent presence is not online (away/offline); router skips it",
    Cause.CAPACITY: "agent at its maximum concurrent conversations; conversation queued",
    Cause.ROUTING_RULE: "routing rule sends this conversation to another agent or group",
    Cause.FILTERED: "platform accepted the message but a filter rule blocked it",
    Cause.PUSH_DISABLED: "platform stored the message but the push switch is off",
    Cause.PUSH_LOST: "platform accepted and routed the message, then lost it on the push path",
    Cause.PUSH_STALLED: "platform accepted the message but held back its push",
    Cause.CLIENT_VERSION: "agent client version is below the platform minimum",
    Cause.CONVERSATION_CLOSED: "message went to a closed conversation no agent sees",
    Cause.CONVERSATION_TRANSFERRED: "conversation was transferred to another agent",
    Cause.AUTH_REJECTED: "login rejected (bad credentials or banned account)",
    Cause.SESSION_EXPIRED: "agent session expired",
    Cause.ACCOUNT_FROZEN: "agent account frozen or banned",
    Cause.TRANSPORT: "target unreachable (connection refused, DNS, TLS or timeout)",
    Cause.DISCONNECTED: "connection to the target died during the run",
    Cause.UPGRADE_REFUSED: "the WebSocket upgrade was answered with plain HTTP: a proxy or "
                           "firewall on the way stripped or refused it (or the URL is not a "
                           "chat endpoint)",
    Cause.TLS_EXPIRED: "the target's TLS certificate has expired (or is not yet valid)",
    Cause.TLS_HOST_NAME: "the target's TLS certificate is for another host name",
    Cause.TLS_UNKNOWN_CA: "the target's TLS certificate is signed by a CA not trusted here "
                          "(a private CA needs ca_bundle; or a TLS-intercepting proxy)",
    Cause.TLS_FAILED: "the TLS handshake with the target failed",
    Cause.PROTOCOL: "target sent frames that do not follow the protocol",
    Cause.NOT_ACCEPTED: "the platform never acknowledged the message",
    Cause.SLOW: "delivered after the SLA; no more specific cause visible",
    Cause.UNEXPLAINED: "acknowledged but never delivered; the protocol shows no reason",
}


@dataclass(frozen=True)
class AgentSelf:
    """What a logged-in agent can see of its own settings (the permission self-check)."""

    agent: str
    role: str = "customer_service"
    receive_messages: bool = True
    channels: frozenset[str] = frozenset()
    presence: str = "online"
    within_hours: bool = True
    client_supported: bool = True


@dataclass(frozen=True)
class Evidence:
    """What the harness saw for one undelivered or late message."""

    acked: bool
    channel: str = ""
    platform_cause: Cause | None = None  # the platform's own trace, mapped by the adapter
    platform_detail: str = ""
    connection_lost: bool = False
    agents: tuple[AgentSelf, ...] = field(default_factory=tuple)
    delivered_late: bool = False


@dataclass(frozen=True)
class Diagnosis:
    cause: Cause
    detail: str = ""

    def line(self) -> str:
        text = DESCRIPTIONS[self.cause]
        return f"{self.cause.value}: {text}" + (f" ({self.detail})" if self.detail else "")


def self_check(agent: AgentSelf, channel: str) -> Cause | None:
    """The first reason this agent, by its own settings, would not get a conversation."""
    if agent.role not in ("customer_service", "admin"):
        return Cause.WRONG_ROLE
    if not agent.receive_messages:
        return Cause.RECEIVE_PERMISSION
    if channel and agent.channels and channel not in agent.channels:
        return Cause.CHANNEL_PERMISSION
    if not agent.client_supported:
        return Cause.CLIENT_VERSION
    if agent.presence != "online":
        return Cause.PRESENCE
    if not agent.within_hours:
        return Cause.BUSINESS_HOURS
    return None


def diagnose(evidence: Evidence) -> Diagnosis:
    """Most specific cause first: the platform's own word, then self-checks, then hops."""
    if evidence.platform_cause is not None:
        return Diagnosis(evidence.platform_cause, evidence.platform_detail)
    if not evidence.acked:
        if evidence.connection_lost:
            return Diagnosis(Cause.DISCONNECTED, "no ack before the connection dropped")
        return Diagnosis(Cause.NOT_ACCEPTED)
    if evidence.agents:
        causes = [self_check(a, evidence.channel) for a in evidence.agents]
        if all(c is not None for c in causes):
            first = causes[0]
            assert first is not None
            names = ", ".join(a.agent for a in evidence.agents)
            return Diagnosis(first, f"every probe agent ineligible: {names}")
    if evidence.connection_lost:
        return Diagnosis(Cause.DISCONNECTED)
    if evidence.delivered_late:
        return Diagnosis(Cause.SLOW)
    return Diagnosis(Cause.UNEXPLAINED)
