"""The end-to-end probe: customers send stamped messages, probe agents confirm receipt.

This is an edge module: it owns the event loop, the clock and the adapter's sockets, and feeds
the pure ledger. One run: log probe agents in, open one conversation per customer, send N
messages on an open-model schedule (latency counts from the intended send time), wait until
every message is received or past its deadline, then explain what was lost or late.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from chatprobe.config import TargetConfig
from chatprobe.diagnosis import Cause, Diagnosis, Evidence, diagnose
from chatprobe.errors import TargetError
from chatprobe.ledger import Ledger, MessageRecord, stamp_fields
from chatprobe.protocols.base import (
    Ack,
    Adapter,
    AgentSession,
    Conversation,
    CustomerSession,
    Frame,
    adapter_for,
)
from chatprobe.stamp import StampCodec
from chatprobe.swarm.engine import watch_loop_lag
from chatprobe.verdict import LATE_SEND_US, RunSummary

PRODUCTS = ("down jacket", "running shoes", "rice cooker", "phone case", "silk scarf",
            "coffee beans", "kids' backpack", "bluetooth speaker")
QUESTIONS = (
    "Hi, is the {p} still in stock in size {s}?",
    "When will order {o} ship? I paid for express.",
    "Can I still get the promotion price on the {p} tonight?",
    "The {p} I received is the wrong colour, how do I return it? Order {o}.",
    "Does the {p} come with an invoice? Need it for my company.",
    "Hello? I asked about order {o} an hour ago and nobody answered.",
)
SIZES = ("S", "M", "L", "XL", "38", "39", "42")
FRAME_LOG = 400  # frames each probe session keeps for the evidence of lost messages
FRAMES_BEFORE_US = 2_000_000
FRAMES_SHOWN = 30
FRAME_CHARS = 500


def customer_body(rng: random.Random) -> str:
    """A realistic, high-entropy customer message (never hits the demo shop's filters)."""
    template = rng.choice(QUESTIONS)
    return template.format(p=rng.choice(PRODUCTS), s=rng.choice(SIZES),
                           o=f"{rng.randrange(10**11, 10**12)}")


@dataclass
class ProbeOptions:
    messages: int = 200
    customers: int = 10
    rate_per_s: float = 500.0
    run_id: str | None = None
    explain_limit: int = 200
    example_limit: int = 20
    progress: Callable[[str], None] | None = None
    progress_every_s: float = 5.0


@dataclass
class ProbeHooks:
    """Test and integration seams; each runs on the probe's loop."""

    after_open: Callable[[list[Conversation]], Awaitable[None]] | None = None
    after_send: Callable[[int], Awaitable[None]] | None = None  # called with the count sent
    # Called once when the probe, its counts final, listens on for lost messages that may
    # still arrive (it sent late or lagged), with how many.
    lingering: Callable[[int], Awaitable[None]] | None = None


def now_us() -> int:
    return time.monotonic_ns() // 1000


# The probe's loop-lag timer: a stall shorter than this may go unseen, so the probe never
# claims its timestamps were held back by less (a finer grain than a swarm's 100 ms: here
# it bounds the band of lateness the probe cannot tell from its own).
LAG_WATCH_PERIOD_US = 20_000


@dataclass
class _SelfWatch:
    """The probe's own share of the numbers (measurement.md, rules 3 and 8): how late its
    loop ran, how late its sends left their plan, how busy its process was. Its worst delay
    makes a verdict UNKNOWN when they could explain it (RunSummary.status)."""

    sends: int = 0
    late_sends: int = 0
    send_lag_max_us: int = 0
    loop_lag_max_us: int = 0
    started_cpu_s: float = field(default_factory=time.process_time)
    started_s: float = field(default_factory=time.monotonic)

    def sent(self, intended_us: int, sent_us: int) -> None:
        self.sends += 1
        lag = sent_us - intended_us
        if lag > LATE_SEND_US:
            self.late_sends += 1
        if lag > self.send_lag_max_us:
            self.send_lag_max_us = lag

    def lagged(self, lag_us: int) -> None:
        if lag_us > self.loop_lag_max_us:
            self.loop_lag_max_us = lag_us

    def receipt_delay_us(self) -> int:
        """The most the probe may have held back a receipt's timestamp: its worst loop lag,
        plus the grain of the timer that measures it (a shorter stall may go unseen)."""
        return self.loop_lag_max_us + LAG_WATCH_PERIOD_US

    def report(self, summary: RunSummary) -> None:
        wall_s = time.monotonic() - self.started_s
        cpu = 100 * (time.process_time() - self.started_cpu_s) / wall_s if wall_s > 0 else 0.0
        summary.generator = {"probe": {
            "cpu_percent": round(cpu, 1), "loop_lag_max_ms": round(self.loop_lag_max_us / 1000, 3),
            "late_sends": self.late_sends, "sends": self.sends,
            "send_lag_max_ms": round(self.send_lag_max_us / 1000, 3),
            "receipt_delay_max_ms": round(self.receipt_delay_us() / 1000, 3)}}


@dataclass
class _RunState:
    ledger: Ledger
    arrived: asyncio.Event
    events: Counter[str] = field(default_factory=Counter)
    dead_customers: dict[str, TargetError] = field(default_factory=dict)
    disconnected: set[str] = field(default_factory=set)
    watch: _SelfWatch = field(default_factory=_SelfWatch)


async def run_probe(target_url: str, config: TargetConfig, options: ProbeOptions,
                    hooks: ProbeHooks | None = None,
                    agent_url: str | None = None) -> RunSummary:
    """Run one probe and return its summary. Raises HarnessError only for harness faults.
    ``agent_url``: where the agents connect when it differs from the customers' (each side
    behind its own network profile); the diagnosis asks the target there too."""
    hooks = hooks or ProbeHooks()
    codec = StampCodec.new_run(options.run_id)
    ledger = Ledger(codec, int(config.sla_ms * 1000), int(config.deadline_ms * 1000))
    state = _RunState(ledger, asyncio.Event())
    summary = RunSummary(codec.run, target_url, ledger.counts, ledger.latency, config.sla_ms,
                         config.deadline_ms, config.p99_warning_ms, events=state.events)
    started = time.monotonic()
    adapter = adapter_for(config.protocol)(target_url, config)
    agent_adapter = adapter if agent_url in (None, target_url) else adapter_for(
        config.protocol)(agent_url or target_url, config)
    adapter.frame_log_size = agent_adapter.frame_log_size = FRAME_LOG
    agents: dict[str, AgentSession] = {}
    customers: list[CustomerSession] = []
    try:
        try:
            await _login_agents(agent_adapter, config, state, agents)
            conversations = await _open_customers(adapter, config, options, state, customers)
        except TargetError as exc:
            summary.fatal = exc.diagnosis
            return summary
        probe_agents = frozenset(agents)
        for i in range(len(customers)):
            ledger.expect_receivers(f"c{i}", probe_agents)
        if hooks.after_open is not None:
            await hooks.after_open(conversations)
        # From the first send on: logging in and opening wait for the target, not for us.
        state.watch = _SelfWatch()
        watcher = asyncio.get_running_loop().create_task(
            watch_loop_lag(state.watch.lagged, LAG_WATCH_PERIOD_US))
        # Let it take its first reading: the first sends need not yield (the reference
        # adapter's do not), and a stall before that reading would go unseen.
        await asyncio.sleep(0)
        finished = False
        try:
            await _send_all(options, customers, conversations, state, hooks)
            await _wait_for_outcomes(state, agents, options)
            ledger.finish()
            finished = True
            # Still watched: receipts that arrive now are judged by the loop's lag too.
            await _linger_for_late_sends(state, int(config.deadline_ms * 1000), agents,
                                         options, hooks)
        except asyncio.CancelledError:
            # SIGINT or SIGTERM: what was measured so far is the result, marked partial.
            # Messages still in flight stay pending (not lost: the run, not the target,
            # stopped waiting for them).
            summary.partial = True
            summary.harness_error = (
                "interrupted while listening on for lost messages that may still arrive "
                "(the probe sent late or lagged); the counts are complete, but whether "
                "those losses were its own delay is unknown and they have no diagnosis"
                if finished else
                "interrupted before every message had its outcome; the results are partial")
            return summary
        finally:
            watcher.cancel()
            state.watch.report(summary)
        try:
            await _explain(agent_adapter, config, options, state, agents, conversations,
                           summary, customers)
        except asyncio.CancelledError:
            # Every message has its outcome; only the diagnosis was cut short.
            summary.partial = True
            summary.harness_error = ("interrupted while the losses were being explained; "
                                     "the counts are complete, the diagnosis partial")
        _own_delay_evidence(summary, ledger, state.watch)
    finally:
        for agent_session in agents.values():
            await agent_session.close()
        for customer_session in customers:
            await customer_session.close()
        await adapter.close()
        if agent_adapter is not adapter:
            await agent_adapter.close()
        summary.duration_s = time.monotonic() - started
    return summary


def _own_delay_evidence(summary: RunSummary, ledger: Ledger, watch: _SelfWatch) -> None:
    """What the verdict needs to tell the probe's own delay from the target's."""
    summary.receipt_delay_us = watch.receipt_delay_us()
    summary.send_lag_max_us = max(0, watch.send_lag_max_us)
    summary.late_from_send_us = [r.first_receipt_us - r.sent_us for r in ledger.late_records
                                 if r.first_receipt_us is not None]
    summary.lost_from_send_us = [None if r.first_receipt_us is None
                                 else r.first_receipt_us - r.sent_us
                                 for r in ledger.lost_records]


async def _linger_for_late_sends(state: _RunState, deadline_us: int,
                                 agents: dict[str, AgentSession], options: ProbeOptions,
                                 hooks: ProbeHooks) -> None:
    """A message the probe itself sent late had less than its deadline to arrive before
    the ledger gave up on it (deadlines count from the plan): listen on until each lost
    message that never turned up has had its deadline from its actual send, so that its
    arrival, if it comes, tells the probe's delay from the target's (bounded by the probe's
    own send lag and loop lag)."""
    ledger = state.ledger
    started = False
    last_progress: float | None = None
    while not agents or any(agent.failure is None for agent in agents.values()):
        unseen = [r.sent_us for r in ledger.lost_records if r.first_receipt_us is None]
        until_us = (max(unseen) + deadline_us + state.watch.receipt_delay_us()
                    if unseen else 0)
        remaining_s = (until_us - now_us()) / 1e6
        if remaining_s <= 0:
            return
        if not started:
            started = True
            if hooks.lingering is not None:
                await hooks.lingering(len(unseen))
        # Seconds of silence after the counts are in would look like a hang.
        now_s = time.monotonic()
        if options.progress and (remaining_s >= 1.0 if last_progress is None
                                 else now_s - last_progress >= options.progress_every_s):
            last_progress = now_s
            options.progress(f"listening on {remaining_s:.1f} s more: {len(unseen)} lost "
                             "messages may still arrive (the probe sent late or lagged)")
        state.arrived.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(0.25, remaining_s)):
                await state.arrived.wait()


async def _login_agents(adapter: Adapter, config: TargetConfig, state: _RunState,
                        agents: dict[str, AgentSession]) -> None:
    ledger = state.ledger

    for credential in config.agents:
        agent_id = credential.id

        def on_receive(text: str, server_id: str | None, agent_id: str = agent_id) -> None:
            ledger.record_received(text, agent_id, now_us())
            state.arrived.set()

        def on_event(kind: str, detail: str, agent_id: str = agent_id) -> None:
            state.events[f"agent {kind}"] += 1
            if kind == "disconnected":
                state.disconnected.add(agent_id)
            state.arrived.set()

        agents[agent_id] = await adapter.login_agent(credential, on_receive, on_event)


async def _open_customers(adapter: Adapter, config: TargetConfig, options: ProbeOptions,
                          state: _RunState, customers: list[CustomerSession]
                          ) -> list[Conversation]:
    ledger = state.ledger
    run = ledger.codec.run

    def make_callbacks(name: str) -> tuple[Callable[[str, str | None], None],
                                           Callable[[str, str], None]]:
        def on_receive(text: str, server_id: str | None) -> None:
            # A customer receiving a customer's stamp would be misrouted; replies are unstamped.
            ledger.record_received(text, f"customer:{name}", now_us())
            state.arrived.set()

        def on_event(kind: str, detail: str) -> None:
            state.events[f"customer {kind}"] += 1
            if kind == "disconnected":
                state.disconnected.add(name)

        return on_receive, on_event

    async def open_one(i: int) -> Conversation:
        name = f"c{i}"
        on_receive, on_event = make_callbacks(name)
        session = await adapter.connect_customer(f"probe-{run}-{name}", on_receive, on_event)
        customers.append(session)
        channel = config.channels[i % len(config.channels)]
        try:
            async with asyncio.timeout(config.connect_timeout_s):
                return await session.open_conversation(f"{run}-{name}", channel)
        except TimeoutError:
            raise TargetError(Cause.PROTOCOL, "no reply to opening a conversation") from None

    # Opening in order keeps customer i <-> conversation i; small batches keep it quick.
    conversations: list[Conversation] = []
    for i in range(options.customers):
        conversations.append(await open_one(i))
    for conv in conversations:
        state.events[f"conversation {conv.state}"] += 1
    return conversations


async def _send_all(options: ProbeOptions, customers: list[CustomerSession],
                    conversations: list[Conversation], state: _RunState,
                    hooks: ProbeHooks) -> None:
    ledger = state.ledger
    rng = random.Random()
    interval_us = int(1_000_000 / options.rate_per_s) if options.rate_per_s > 0 else 0
    start = now_us()
    run = ledger.codec.run
    last_progress = time.monotonic()

    def on_ack(record: MessageRecord) -> Callable[[asyncio.Future[Ack]], None]:
        def done(future: asyncio.Future[Ack]) -> None:
            if future.cancelled() or future.exception() is not None:
                state.events["send failed"] += 1
                return
            ledger.record_ack(record, future.result().server_id, now_us())
        return done

    for j in range(options.messages):
        i = j % len(customers)
        intended = start + j * interval_us
        wait_us = intended - now_us()
        if wait_us > 0:
            await asyncio.sleep(wait_us / 1e6)
        name = f"c{i}"
        if name in state.dead_customers:
            continue
        sent_us = now_us()
        state.watch.sent(intended, sent_us)
        text, record = ledger.stamp_and_record(customer_body(rng), name, name, intended,
                                               sent_us)
        try:
            future = await customers[i].send(conversations[i].id,
                                              f"{run}-{name}-{record.seq}", text)
        except TargetError as exc:
            state.dead_customers[name] = exc
            state.events["customer dead"] += 1
            continue
        future.add_done_callback(on_ack(record))
        if hooks.after_send is not None:
            await hooks.after_send(j + 1)
        if options.progress and time.monotonic() - last_progress >= options.progress_every_s:
            last_progress = time.monotonic()
            counts = ledger.counts
            options.progress(f"sent {counts.sent}/{options.messages}, delivered "
                             f"{counts.delivered}, late {counts.late}, pending {counts.pending}")


async def _wait_for_outcomes(state: _RunState, agents: dict[str, AgentSession],
                             options: ProbeOptions) -> None:
    """Wait for every message to arrive or pass its deadline (event-driven, bounded)."""
    ledger = state.ledger
    last_progress = time.monotonic()
    while True:
        ledger.expire(now_us())
        if ledger.pending_count == 0:
            return
        if agents and all(a.failure is not None for a in agents.values()):
            return  # no probe agent can receive any more: the rest is lost now
        latest = ledger.latest_deadline_us()
        remaining_s = max(0.0, ((latest or now_us()) - now_us()) / 1e6)
        state.arrived.clear()
        try:
            async with asyncio.timeout(min(0.25, remaining_s + 0.001)):
                await state.arrived.wait()
        except TimeoutError:
            pass
        if options.progress and time.monotonic() - last_progress >= options.progress_every_s:
            last_progress = time.monotonic()
            options.progress(f"waiting for {ledger.pending_count} messages "
                             f"(deadline in {remaining_s:.1f} s)")


async def _explain(adapter: Adapter, config: TargetConfig, options: ProbeOptions,
                   state: _RunState, agents: dict[str, AgentSession],
                   conversations: list[Conversation], summary: RunSummary,
                   customers: list[CustomerSession]) -> None:
    ledger = state.ledger
    probe_agents = frozenset(agents)
    profiles = tuple(a.profile for a in agents.values())
    failures = {name: a.failure for name, a in agents.items() if a.failure is not None}
    all_dead = bool(agents) and len(failures) == len(agents)
    by_name = {f"c{i}": conv for i, conv in enumerate(conversations)}
    by_customer = {f"c{i}": session for i, session in enumerate(customers)}
    to_explain = [("lost", r) for r in ledger.lost_records] + [
        ("late", r) for r in ledger.late_records]
    for index, (outcome, record) in enumerate(to_explain):
        conv = by_name.get(record.conversation)
        platform_cause: Cause | None = None
        detail = ""
        hops: dict[str, object] = {}
        # A dead agent session explains a loss only where it was the one to receive it.
        dead = failures.get(conv.agent or "") if conv is not None else None
        if dead is None and all_dead:
            dead = next(iter(failures.values()))
        if dead is not None and outcome == "lost":
            platform_cause, detail = dead.cause, dead.detail
        elif record.server_id is not None and index < options.explain_limit:
            explanation = await adapter.explain(record.server_id, probe_agents)
            if explanation is not None:
                platform_cause, detail, hops = (explanation.cause, explanation.detail,
                                                dict(explanation.hops))
                if (platform_cause is Cause.ROUTING_RULE and conv is not None
                        and conv.agent in probe_agents):
                    platform_cause = Cause.CONVERSATION_TRANSFERRED
        if platform_cause is None and conv is not None and conv.state == "closed":
            platform_cause = Cause.CONVERSATION_CLOSED
        evidence = Evidence(
            acked=record.server_id is not None,
            channel=_channel_of(config, record.conversation),
            platform_cause=platform_cause,
            platform_detail=detail,
            connection_lost=record.conversation in state.disconnected or bool(
                state.disconnected & probe_agents),
            agents=profiles,
            delivered_late=outcome == "late",
        )
        diagnosis = diagnose(evidence)
        if outcome == "late" and diagnosis.cause is Cause.UNEXPLAINED:
            diagnosis = Diagnosis(Cause.SLOW)
        summary.diagnoses.append((outcome, diagnosis))
        if len(summary.examples) < options.example_limit:
            summary.examples.append({
                "outcome": outcome, "cause": diagnosis.cause.value,
                "stamp": stamp_fields(ledger.codec.run, record),
                "conversation": record.conversation, "seq": record.seq,
                "server_id": record.server_id,
                "agent": conv.agent if conv is not None else None,
                # Hops, in ms after the planned send time: sent, acked, received.
                "sent_after_ms": (record.sent_us - record.intended_us) / 1000,
                "acked_after_ms": None if record.ack_us is None
                else (record.ack_us - record.intended_us) / 1000,
                "latency_ms": None if record.latency_us is None else record.latency_us / 1000,
                "receiver": record.receiver, "platform": hops,
                "frames": _frames_around(record, config, by_customer.get(record.conversation),
                                         agents),
            })


def _frames_around(record: MessageRecord, config: TargetConfig,
                   customer: CustomerSession | None,
                   agents: dict[str, AgentSession]) -> list[dict[str, object]]:
    """The frames on the customer's and the agents' connections from shortly before the
    message was due until its deadline, nearest first cut to a page, then in time order."""
    start = record.intended_us - FRAMES_BEFORE_US
    end = record.intended_us + int(config.deadline_ms * 1000)
    links: list[tuple[str, list[Frame]]] = [(f"agent {name}", session.recent_frames())
                                             for name, session in agents.items()]
    if customer is not None:
        links.insert(0, (f"customer {record.conversation}", customer.recent_frames()))
    found = [(at - record.intended_us, link, way, text)
             for link, kept in links for at, way, text in kept if start <= at <= end]
    nearest = sorted(sorted(found, key=lambda frame: abs(frame[0]))[:FRAMES_SHOWN])
    return [{"at_ms": at / 1000, "link": link, "direction": way, "frame": text[:FRAME_CHARS]}
            for at, link, way, text in nearest]


def _channel_of(config: TargetConfig, conversation: str) -> str:
    try:
        index = int(conversation[1:])
    except ValueError:
        return ""
    return config.channels[index % len(config.channels)]


def print_progress(line: str) -> None:
    print(f"chatprobe: {line}", file=sys.stderr, flush=True)
