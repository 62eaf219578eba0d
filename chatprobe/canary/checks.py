"""The canary's checks against one target (edge: sockets and clocks; verdicts are pure).

Per listed sub-account, one at a time (the platform routes a conversation to any connected
agent, so only the agent under test is logged in): the agent logs in; for each of its
channels a synthetic customer opens a conversation, sends a stamped message the agent must
receive (receive, latency), the agent answers and the customer must receive it (reply); on
the first channel the connections then stay idle and must still deliver (idle). The
conversation is closed afterwards so it does not linger in the shop's queues or figures.

Every wait is bounded by the critical threshold and by the run's budget; a failure carries
a domain.md cause, and a check that could not be judged says why (UNKNOWN).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

from chatprobe.canary.config import CanaryTarget
from chatprobe.canary.model import CERTIFICATE, IDLE, LATENCY, RECEIVE, REPLY, CheckResult
from chatprobe.config import AgentCredential
from chatprobe.diagnosis import DESCRIPTIONS, AgentSelf, Cause, Diagnosis, Evidence, diagnose
from chatprobe.errors import TargetError
from chatprobe.protocols.base import (
    Adapter,
    AgentSession,
    CustomerSession,
    Explanation,
    adapter_for,
)
from chatprobe.stamp import StampCodec
from chatprobe.verdict import Status

# Marks every canary message as synthetic for people and filters reading the shop's chats.
SYNTHETIC_MARK = "[chatprobe canary: synthetic test message, no reply needed]"
TRACE_POLL_S = 1.0  # how often a missing message's platform trace is read while waiting
TRACE_TIMEOUT_S = 6.0  # above the reference adapter's own 5 s HTTP timeout
# Platform trace states after which a message will never arrive: stop waiting for it.
FINAL_CAUSES = frozenset({Cause.FILTERED, Cause.PUSH_DISABLED, Cause.PUSH_LOST,
                          Cause.CLIENT_VERSION, Cause.CONVERSATION_CLOSED})
UNREACHABLE = frozenset({Cause.TRANSPORT, Cause.UPGRADE_REFUSED, Cause.PROTOCOL,
                         Cause.TLS_EXPIRED, Cause.TLS_HOST_NAME, Cause.TLS_UNKNOWN_CA,
                         Cause.TLS_FAILED})
T = TypeVar("T")


@dataclass(frozen=True)
class CheckSettings:
    warning_ms: float
    critical_ms: float
    idle_s: float
    deadline: float  # time.monotonic() by which the whole run must be done
    tls_warn_days: float = 14.0


class OutOfBudget(Exception):
    """The run's time budget ran out before a check could finish."""


def latency_status(latency_ms: float | None, warning_ms: float, critical_ms: float) -> Status:
    if latency_ms is None or latency_ms > critical_ms:
        return Status.CRITICAL
    return Status.WARNING if latency_ms > warning_ms else Status.OK


@dataclass
class _Inbox:
    """Receipts of this agent check's stamped messages, by (conversation, seq)."""

    codec: StampCodec
    arrived: dict[tuple[str, int], float] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: bool = False

    def receiver(self) -> Callable[[str, str | None], None]:
        def on_receive(text: str, server_id: str | None) -> None:
            stamp = self.codec.parse(text)
            if stamp is not None and stamp.valid and not stamp.foreign:
                self.arrived.setdefault((stamp.conversation, stamp.seq), time.monotonic())
                self.changed.set()
        return on_receive

    def on_event(self, kind: str, detail: str) -> None:
        if kind == "disconnected":
            self.disconnected = True
            self.changed.set()


class AgentCheck:
    """All checks of one sub-account on one target."""

    def __init__(self, spec: CanaryTarget, agent: AgentCredential, settings: CheckSettings,
                 codec: StampCodec, customer_url: str, profile: str = "",
                 on_result: Callable[[CheckResult], None] | None = None) -> None:
        self.spec = spec
        self.agent = agent
        self.settings = settings
        self.codec = codec
        self.customer_url = customer_url
        self.profile = profile
        self.results: list[CheckResult] = []
        self.on_result = on_result
        self.inbox = _Inbox(codec)
        self.customer_inbox = _Inbox(codec)
        self.self_view: AgentSelf | None = None

    # -- results -------------------------------------------------------------------------

    def _result(self, channel: str, kind: str, status: Status, started: float,
                cause: Cause | None = None, detail: str = "",
                latency_ms: float | None = None) -> None:
        result = CheckResult(
            self.spec.name, self.agent.id, channel, kind, status,
            cause.value if cause is not None else None, detail, latency_ms, self.profile,
            time.time() - (time.monotonic() - started), time.monotonic() - started)
        self.results.append(result)
        if self.on_result is not None:
            # Recorded at once: a run stopped at its budget keeps every finished check.
            self.on_result(result)

    def fail_rest(self, status: Status, cause: Cause | None, detail: str) -> None:
        """Every check of this agent not yet reported gets the same verdict."""
        done = {(r.channel, r.kind) for r in self.results}
        now = time.monotonic()
        for number, channel in enumerate(self.spec.channels):
            for kind in self.spec.checks:
                if (kind == IDLE and number > 0) or (channel, kind) in done:
                    continue
                self._result(channel, kind, status, now, cause, detail)

    def _customer_name(self, channel: str) -> str:
        """The synthetic customer (and its conversation) of this agent on ``channel``."""
        return f"canary-{self.codec.run}-{self.agent.id}-{channel}"

    # -- time ----------------------------------------------------------------------------

    def _left(self, wanted_s: float) -> float:
        left = self.settings.deadline - time.monotonic()
        if left <= 0:
            raise OutOfBudget
        return min(wanted_s, left)

    async def _bounded(self, awaitable: asyncio.Future[T], wanted_s: float) -> T:
        # The budget is the hard bound; a platform that hangs costs one timeout, not more.
        limit = self._left(wanted_s)
        try:
            async with asyncio.timeout(limit):
                return await awaitable
        except TimeoutError:
            if limit < wanted_s:
                raise OutOfBudget from None
            raise

    # -- the sequence --------------------------------------------------------------------

    async def run(self, adapter: Adapter, customer_adapter: Adapter) -> list[CheckResult]:
        agent_session: AgentSession | None = None
        try:
            try:
                agent_session = await self._bounded(asyncio.ensure_future(adapter.login_agent(
                    self.agent, self.inbox.receiver(), self.inbox.on_event)),
                    self.spec.target.connect_timeout_s + 1)
            except TimeoutError:
                self.fail_rest(Status.CRITICAL, Cause.TRANSPORT,
                                "the target did not answer the agent's login in "
                                f"{self.spec.target.connect_timeout_s:g} s (hanging)")
                return self.results
            except TargetError as exc:
                self.fail_rest(Status.CRITICAL, exc.cause, f"agent login: {exc.detail}")
                return self.results
            self.self_view = getattr(agent_session, "profile", None)
            for number, channel in enumerate(self.spec.channels):
                await self._channel(adapter, customer_adapter, agent_session, channel,
                                    first=number == 0)
        except OutOfBudget:
            self.fail_rest(Status.UNKNOWN, None, "not run: the canary's time budget ran out")
        finally:
            if agent_session is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(agent_session.close(), 2)
        return self.results

    async def _channel(self, adapter: Adapter, customer_adapter: Adapter,
                       agent_session: AgentSession, channel: str, first: bool) -> None:
        started = time.monotonic()
        kinds = self.spec.checks
        name = self._customer_name(channel)
        customer: CustomerSession | None = None
        try:
            try:
                customer = await self._bounded(asyncio.ensure_future(
                    customer_adapter.connect_customer(name, self.customer_inbox.receiver(),
                                                      self.customer_inbox.on_event)),
                    self.spec.target.connect_timeout_s + 1)
                conversation = await self._bounded(asyncio.ensure_future(
                    customer.open_conversation(name, channel)),
                    self.spec.target.connect_timeout_s + 1)
            except TimeoutError:
                self._fail_channel(channel, first, Status.CRITICAL, Cause.TRANSPORT,
                                   "the target did not answer a customer in "
                                   f"{self.spec.target.connect_timeout_s:g} s (hanging)")
                return
            except TargetError as exc:
                self._fail_channel(channel, first, Status.CRITICAL, exc.cause,
                                   f"customer: {exc.detail}")
                return
            # Not routed to the agent under test: no need to wait for a message that cannot
            # come (queued, or another agent took it), but still send one so the platform's
            # trace can say why.
            routed_here = conversation.state != "queued" and conversation.agent in (
                None, self.agent.id)
            sent_at, server_id, diagnosis = await self._send_and_wait(
                customer, agent_session, adapter, conversation.id, channel, seq=1,
                wait=routed_here)
            received = self.inbox.arrived.get((name, 1))
            latency_ms = None if received is None else (received - sent_at) * 1000
            if not routed_here and diagnosis is None:
                diagnosis = (Diagnosis(Cause.ROUTING_RULE, f"routed to {conversation.agent}")
                             if conversation.agent else self._queued_diagnosis(channel))
            if RECEIVE in kinds:
                if received is not None:
                    self._result(channel, RECEIVE, Status.OK, started, latency_ms=latency_ms)
                else:
                    assert diagnosis is not None
                    self._result(channel, RECEIVE, Status.CRITICAL, started, diagnosis.cause,
                                 self._line(diagnosis), latency_ms)
            if LATENCY in kinds:
                status = latency_status(latency_ms, self.settings.warning_ms,
                                        self.settings.critical_ms)
                cause = diagnosis.cause if diagnosis else (
                    Cause.SLOW if status is not Status.OK else None)
                detail = (f"{latency_ms:.0f} ms (warning {self.settings.warning_ms:g}, "
                          f"critical {self.settings.critical_ms:g})" if latency_ms is not None
                          else self._line(diagnosis) if diagnosis else "not delivered")
                self._result(channel, LATENCY, status, started, cause, detail, latency_ms)
            if REPLY in kinds:
                await self._reply(customer, agent_session, channel, name, server_id,
                                  delivered=received is not None)
            if IDLE in kinds and first:
                await self._idle(customer, agent_session, adapter, conversation.id, channel,
                                 name, delivered=received is not None)
            with contextlib.suppress(TargetError, TimeoutError, OutOfBudget):
                await self._bounded(asyncio.ensure_future(
                    customer.close_conversation(conversation.id)), 2)
        finally:
            if customer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(customer.close(), 2)

    def _fail_channel(self, channel: str, first: bool, status: Status, cause: Cause,
                      detail: str) -> None:
        now = time.monotonic()
        for kind in self.spec.checks:
            if kind != IDLE or first:
                self._result(channel, kind, status, now, cause, detail)

    def _queued_diagnosis(self, channel: str) -> Diagnosis:
        evidence = Evidence(acked=True, channel=channel,
                            agents=(self.self_view,) if self.self_view else ())
        found = diagnose(evidence)
        if found.cause is Cause.UNEXPLAINED:
            return Diagnosis(Cause.ROUTING_RULE, "the conversation was queued, not assigned "
                                                 f"to {self.agent.id}")
        return Diagnosis(found.cause, f"the conversation was queued; {self.agent.id}'s own "
                                      "settings say why")

    @staticmethod
    def _line(diagnosis: Diagnosis) -> str:
        """What a person reads: the cause's meaning and what was seen (the cause itself is
        a field of its own)."""
        text = DESCRIPTIONS[diagnosis.cause]
        return f"{text} ({diagnosis.detail})" if diagnosis.detail else text

    async def _send_and_wait(self, customer: CustomerSession, agent_session: AgentSession,
                             adapter: Adapter, conversation_id: str, channel: str, seq: int,
                             wait: bool) -> tuple[float, str | None, Diagnosis | None]:
        """Send stamped message ``seq``; wait (bounded) for the agent to get it. Returns the
        send time, the platform's id for it and, if it did not arrive, the diagnosis."""
        name = self._customer_name(channel)
        sent_at = time.monotonic()
        text = self.codec.stamp_text(SYNTHETIC_MARK, name, name, seq,
                                     time.monotonic_ns() // 1000)
        try:
            ack_future = await customer.send(conversation_id, f"{name}-{seq}", text)
            ack = await self._bounded(ack_future, self.settings.critical_ms / 1000)
        except TimeoutError:
            return sent_at, None, Diagnosis(Cause.NOT_ACCEPTED,
                                            "no ack within the critical threshold")
        except TargetError as exc:
            return sent_at, None, Diagnosis(exc.cause, exc.detail)
        server_id = ack.server_id
        key = (name, seq)
        until = sent_at + self.settings.critical_ms / 1000
        next_trace = time.monotonic() + (TRACE_POLL_S if wait else 0)
        while key not in self.inbox.arrived:
            now = time.monotonic()
            if now >= until:
                break
            if agent_session.failure is not None:
                failure = agent_session.failure
                return sent_at, server_id, Diagnosis(failure.cause, failure.detail)
            if now >= next_trace and server_id is not None:
                explanation = await self._explain(adapter, server_id)
                next_trace = time.monotonic() + TRACE_POLL_S
                if explanation is not None and explanation.cause is not None and (
                        not wait or explanation.cause in FINAL_CAUSES):
                    return sent_at, server_id, Diagnosis(explanation.cause,
                                                         explanation.detail)
                if not wait:
                    break
            self.inbox.changed.clear()
            with contextlib.suppress(TimeoutError):
                await self._bounded(asyncio.ensure_future(self.inbox.changed.wait()),
                                    max(0.001, min(until, next_trace) - time.monotonic()))
        if key in self.inbox.arrived:
            return sent_at, server_id, None
        if server_id is not None:
            # The platform's own word on where it stopped beats anything seen from outside.
            with contextlib.suppress(OutOfBudget):
                explanation = await self._explain(adapter, server_id)
                if explanation is not None and explanation.cause is not None:
                    return sent_at, server_id, Diagnosis(explanation.cause, explanation.detail)
        evidence = Evidence(acked=True, channel=channel,
                            connection_lost=self.inbox.disconnected,
                            agents=(self.self_view,) if self.self_view else ())
        diagnosis = diagnose(evidence)
        if diagnosis.cause is Cause.UNEXPLAINED:
            diagnosis = Diagnosis(Cause.UNEXPLAINED, "acked by the platform, never pushed to "
                                  f"{self.agent.id} within {self.settings.critical_ms:g} ms")
        elif evidence.agents and diagnosis.cause is not Cause.DISCONNECTED:
            diagnosis = Diagnosis(diagnosis.cause, f"{self.agent.id}'s own settings")
        return sent_at, server_id, diagnosis

    async def _explain(self, adapter: Adapter, server_id: str) -> Explanation | None:
        """The platform's trace of a message, or None when it cannot tell in time: a
        back office that hangs must not turn the check into a harness error."""
        try:
            return await self._bounded(asyncio.ensure_future(adapter.explain(
                server_id, frozenset({self.agent.id}))), TRACE_TIMEOUT_S)
        except (TimeoutError, TargetError):
            return None

    async def _reply(self, customer: CustomerSession, agent_session: AgentSession,
                     channel: str, name: str, server_id: str | None, delivered: bool) -> None:
        started = time.monotonic()
        if not delivered or server_id is None:
            self._result(channel, REPLY, Status.UNKNOWN, started, None,
                         "not checked: the agent never got the customer's message")
            return
        reply_conversation = f"{name}>r"
        text = self.codec.stamp_text(SYNTHETIC_MARK, self.agent.id, reply_conversation, 1,
                                     time.monotonic_ns() // 1000)
        try:
            future = await agent_session.reply_to(server_id, f"{name}-r1", text)
            if future is None:
                self._result(channel, REPLY, Status.UNKNOWN, started, None,
                             "not checked: this protocol's adapter cannot reply")
                return
            await self._bounded(future, self.settings.critical_ms / 1000)
        except TimeoutError:
            self._result(channel, REPLY, Status.CRITICAL, started, Cause.NOT_ACCEPTED,
                         "the platform did not accept the agent's reply")
            return
        except TargetError as exc:
            self._result(channel, REPLY, Status.CRITICAL, started, exc.cause, exc.detail)
            return
        key = (reply_conversation, 1)
        until = started + self.settings.critical_ms / 1000
        while key not in self.customer_inbox.arrived and time.monotonic() < until:
            if customer.failure is not None:
                break
            self.customer_inbox.changed.clear()
            with contextlib.suppress(TimeoutError):
                await self._bounded(asyncio.ensure_future(self.customer_inbox.changed.wait()),
                                    max(0.001, until - time.monotonic()))
        arrived = self.customer_inbox.arrived.get(key)
        if arrived is None:
            cause = (customer.failure.cause if customer.failure is not None
                     else Cause.DISCONNECTED if self.customer_inbox.disconnected
                     else Cause.UNEXPLAINED)
            self._result(channel, REPLY, Status.CRITICAL, started, cause,
                         "the agent's reply did not reach the customer within "
                         f"{self.settings.critical_ms:g} ms")
            return
        self._result(channel, REPLY, Status.OK, started,
                     latency_ms=(arrived - started) * 1000)

    async def _idle(self, customer: CustomerSession, agent_session: AgentSession,
                    adapter: Adapter, conversation_id: str, channel: str, name: str,
                    delivered: bool) -> None:
        started = time.monotonic()
        if not delivered:
            self._result(channel, IDLE, Status.UNKNOWN, started, None,
                         "not checked: nothing was delivered before the idle period")
            return
        # The idle period is the condition under test (a push channel that dies quietly
        # when nothing flows), not a wait for an event.
        idle_until = time.monotonic() + self._left(self.settings.idle_s)
        with contextlib.suppress(TimeoutError):
            await self._bounded(asyncio.ensure_future(asyncio.sleep(
                max(0.0, idle_until - time.monotonic()))), self.settings.idle_s + 1)
        if agent_session.failure is not None:
            failure = agent_session.failure
            self._result(channel, IDLE, Status.CRITICAL, started, failure.cause,
                         f"the agent's connection died while idle: {failure.detail}")
            return
        sent_at, _, diagnosis = await self._send_and_wait(
            customer, agent_session, adapter, conversation_id, channel, seq=2, wait=True)
        received = self.inbox.arrived.get((name, 2))
        if received is None:
            assert diagnosis is not None
            self._result(channel, IDLE, Status.CRITICAL, started, diagnosis.cause,
                         f"after {self.settings.idle_s:g} s idle: {self._line(diagnosis)}")
            return
        self._result(channel, IDLE, Status.OK, started,
                     latency_ms=(received - sent_at) * 1000)


async def check_target(spec: CanaryTarget, settings: CheckSettings, run_id: str,
                       on_result: Callable[[CheckResult], None]) -> list[CheckResult]:
    """Every check of one target, agent after agent. A target that cannot be reached at
    all is reported once per check with the same cause, without trying every agent."""
    from chatprobe.netem.session import behind, via_proxy
    from chatprobe.profiles import load_profile

    codec = StampCodec.new_run(run_id)
    profile = load_profile(spec.profile) if spec.profile else None
    results: list[CheckResult] = []
    if spec.secure:
        certificate = await check_certificate(spec, settings)
        on_result(certificate)
        results.append(certificate)
    adapter_class = adapter_for(spec.target.protocol)
    async with behind(spec.url, profile) as (customer_url, _proxy):
        adapter = adapter_class(spec.url, spec.target)
        customer_adapter = adapter if customer_url == spec.url else adapter_class(
            customer_url, via_proxy(spec.target, spec.url))
        unreachable: CheckResult | None = None
        try:
            for agent in spec.agents:
                check = AgentCheck(spec, agent, settings, codec, customer_url,
                                   profile.name if profile is not None else "", on_result)
                if unreachable is not None:
                    check.fail_rest(unreachable.status, Cause(unreachable.cause or
                                                               Cause.TRANSPORT.value),
                                     f"not tried: {unreachable.detail}")
                else:
                    await check.run(adapter, customer_adapter)
                results.extend(check.results)
                first = check.results[0] if check.results else None
                if (first is not None and first.cause is not None
                        and Cause(first.cause) in UNREACHABLE and all(
                            r.cause == first.cause for r in check.results)):
                    unreachable = first
        finally:
            await adapter.close()
            if customer_adapter is not adapter:
                await customer_adapter.close()
    return results


async def check_certificate(spec: CanaryTarget, settings: CheckSettings) -> CheckResult:
    """How long the target's TLS certificate has left (an expiring certificate is a classic
    cause of a silent push-channel outage): WARNING within ``tls_warn_days``, CRITICAL when
    the handshake refuses it (expired, wrong name, unknown CA)."""
    from chatprobe.protocols.link import tls_error

    parts = urlsplit(spec.url)
    host = parts.hostname or ""
    port = parts.port or 443
    started = time.monotonic()

    def result(status: Status, cause: Cause | None, detail: str) -> CheckResult:
        return CheckResult(spec.name, "*", "*", CERTIFICATE, status,
                           cause.value if cause else None, detail, None, "",
                           time.time() - (time.monotonic() - started),
                           time.monotonic() - started)

    try:
        limit = max(0.1, min(spec.target.connect_timeout_s,
                             settings.deadline - time.monotonic()))
        async with asyncio.timeout(limit):
            _, writer = await asyncio.open_connection(
                host, port, ssl=spec.target.tls_context(),
                server_hostname=spec.target.tls_server_name or host)
    except ssl.SSLCertVerificationError as exc:
        failure = tls_error(spec.url, exc, spec.target.tls_server_name)
        return result(Status.CRITICAL, failure.cause, failure.detail)
    except (ssl.SSLError, OSError, TimeoutError) as exc:
        return result(Status.CRITICAL, Cause.TRANSPORT,
                      f"{host}:{port}: {type(exc).__name__}: {exc}")
    try:
        peer = writer.get_extra_info("peercert") or {}
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    not_after = peer.get("notAfter")
    if not isinstance(not_after, str):
        return result(Status.UNKNOWN, None, "the certificate's expiry could not be read")
    days = (ssl.cert_time_to_seconds(not_after) - time.time()) / 86400
    detail = f"expires {not_after} ({days:.1f} days left)"
    if days < settings.tls_warn_days:
        return result(Status.WARNING, None,
                      f"{detail}, within the {settings.tls_warn_days:g}-day warning")
    return result(Status.OK, None, detail)
