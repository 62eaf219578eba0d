"""The worker engine: one asyncio (uvloop) thread per process holding every chat connection.

Locust runs users as gevent greenlets; chatprobe's adapters are asyncio. Greenlets never wait
on the loop: each hands over whole rounds of its script (planned times and bodies, up to a
second ahead) through a deque and one ``call_soon_threadsafe`` per burst, and the loop's send
clock (one heap, one timer) stamps and sends each message at its planned time, so no message
crosses the two threads on its own. The loop thread hands back what it saw through flat lists
and deques (atomic extends and appends, no locks shared across the two schedulers, which
gevent does not support, gevent issue #1739). A flusher greenlet takes them into batches for
the master's collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import socket
import time
import zlib
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatprobe.config import AgentCredential, TargetConfig
from chatprobe.errors import TargetError
from chatprobe.protocols.base import (
    Ack,
    Adapter,
    AgentSession,
    CustomerSession,
    adapter_for,
)
from chatprobe.protocols.link import SeenIds
from chatprobe.stamp import StampCodec
from chatprobe.swarm.collector import empty_batch
from chatprobe.swarm.scripts import AGENT_REPLIES, Script
from chatprobe.verdict import LATE_SEND_US

REPLY_SUFFIX = ">r"  # an agent's reply travels in its own stamped conversation
# A planned message: (intended time µs, script step kind, body).
Planned = tuple[int, str, str]


def clock_domain() -> str:
    """Processes with the same boot id share CLOCK_MONOTONIC (containers on one host do;
    two machines never do), unlike the hostname."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return f"host:{socket.gethostname()}"


def now_us() -> int:
    return time.monotonic_ns() // 1000


async def watch_loop_lag(record: Callable[[int], None], period_us: int = 100_000) -> None:
    """Forever: how late the running loop fires a timer of ``period_us`` (µs), handed to
    ``record``: the generator's own delay, not the target's. A stall shorter than the period
    may end before the timer is due, unseen."""
    while True:
        before = now_us()
        await asyncio.sleep(period_us / 1e6)
        record(now_us() - before - period_us)


def start_real_thread(target: Callable[[], None]) -> None:
    """An OS thread even when gevent has monkey-patched `threading` (Locust does)."""
    try:
        from gevent import monkey

        start = monkey.get_original("_thread", "start_new_thread")
    except ImportError:  # not under gevent
        import _thread

        start = _thread.start_new_thread
    start(target, ())


# Libraries that log from the loop thread (asyncio, uvloop, websockets, aiohttp).
LOOP_THREAD_LOGGERS = ("asyncio", "websockets", "aiohttp")


class _KeepLines(logging.Handler):
    """Keeps log lines in a deque without taking the handler's lock: under gevent that lock
    is a greenlet lock, and a second OS thread taking it can hang the process."""

    def __init__(self, lines: deque[str]) -> None:
        super().__init__(logging.WARNING)
        self.lines = lines

    def handle(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level:
            self.lines.append(f"{record.name}: {record.getMessage()}")
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)


class LoopThread:
    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lag_max_us = 0  # written by the loop thread, read (atomically) by greenlets
        # What went wrong inside the loop thread, for the run's connection events.
        self.problems: deque[str] = deque(maxlen=100)
        for name in LOOP_THREAD_LOGGERS:
            logger = logging.getLogger(name)
            logger.handlers = [_KeepLines(self.problems)]
            logger.propagate = False
        start_real_thread(self._run)

    def _run(self) -> None:
        try:
            import uvloop

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(self._unhandled)
        self._lag_task = loop.create_task(self._watch_lag())
        self.loop = loop
        loop.run_forever()

    def _unhandled(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # asyncio's default handler logs, and `logging` takes gevent-patched locks, which a
        # second OS thread must never touch (it hung a starved run at exit): keep a line.
        exception = context.get("exception")
        what = f"{type(exception).__name__}: {exception}" if exception else context["message"]
        self.problems.append(f"unhandled in the chat loop: {what}")

    async def _watch_lag(self) -> None:
        """How late the loop runs a 100 ms timer: the generator's own delay, not the target's.
        The first second (imports, first connections) is warm-up, not measured."""
        await asyncio.sleep(1.0)
        await watch_loop_lag(self._lagged)

    def _lagged(self, lag_us: int) -> None:
        if lag_us > self.lag_max_us:
            self.lag_max_us = lag_us

    def wait_ready(self, sleep: Callable[[float], None], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.loop is None:
            if time.monotonic() > deadline:
                raise RuntimeError("chatprobe loop thread did not start")
            sleep(0.01)

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(fn, *args)


RECENT_CONVERSATIONS = 8  # a customer's closed conversations whose late replies still count


@dataclass
class _Conversation:
    """One round of the script: a conversation of its own on the customer's connection."""

    id: str  # the platform's
    closed: bool = False
    awaiting_replies: set[int] = field(default_factory=set)
    replies_done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Customer:
    """One fake customer (a Locust user) and its one connection, kept across script rounds as
    a real chat client keeps its socket; its sends leave strictly in order, one at a time, so
    the harness never reorders a conversation itself."""

    name: str
    # Rounds to play, in order: (conversation name, plan, index of the message after which
    # the connection drops or -1, the round's planned start); None when the customer leaves.
    rounds: asyncio.Queue[tuple[str, list[Planned], int, int] | None] = field(
        default_factory=asyncio.Queue)
    conversations: dict[str, _Conversation] = field(default_factory=dict)
    leaving: bool = False
    # Set while the first round waits for the connection (handshake, login): the target's
    # time, like the open's.
    connecting_since_us: int | None = None
    playing: _Round | None = None  # the round whose messages are on the send clock


@dataclass
class EngineOutput:
    """What the loop thread and the users produced since the last flush."""

    # Records laid end to end (see collector.empty_batch), not a tuple each: a tuple lives
    # until the flush, and tens of thousands of them made the young garbage collections
    # that stalled the chat loop for tens of milliseconds.
    sends: list[Any] = field(default_factory=list)
    acks: list[Any] = field(default_factory=list)
    receipts: list[Any] = field(default_factory=list)
    events: deque[str] = field(default_factory=deque)
    forged: int = 0  # cumulative counters, written by the loop thread only
    foreign: int = 0
    late_sends: int = 0
    send_lag_max_us: int = 0  # a maximum, reset by the reader (a lost reset only repeats it)


@dataclass(slots=True, eq=False)
class _Round:
    """A round being played: the send clock calls :meth:`send_next` when its next message is
    due, and the next message is scheduled only once this one is handed to the adapter, so a
    customer's messages leave in order."""

    engine: WorkerEngine
    session: CustomerSession
    customer: _Customer
    name: str
    plan: list[Planned]
    drop_after: int
    earliest_us: int
    conversation: _Conversation
    index: int = 0  # the plan's next message
    done: int = 0  # messages of the plan recorded as sent so far
    # Done when the round is over; cancelled with the task awaiting it.
    finished: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())

    def send_next(self, sent: int) -> None:
        finished = self.finished
        if finished.done():
            return
        if self.customer.leaving:
            finished.set_result(None)  # the user was stopped: the rest never happens
            return
        try:
            self._send(sent)
        except Exception as exc:  # the round's coroutine raises it; the clock goes on
            if not finished.done():
                finished.set_exception(exc)

    def _send(self, sent: int) -> None:
        engine, name = self.engine, self.name
        out, codec = engine.out, engine.codec
        intended_us, kind, body = self.plan[self.index]
        # Latency still counts from the plan; lateness is the generator's own share.
        lag = sent - max(intended_us, self.earliest_us)
        if lag > LATE_SEND_US:
            out.late_sends += 1
        if lag > out.send_lag_max_us:
            out.send_lag_max_us = lag
        seq = self.index + 1
        out.sends.extend((name, name, seq, intended_us, sent, kind))
        self.done = seq
        conversation = self.conversation
        text = codec.stamp_text(body, name, name, seq, intended_us)
        if seq in engine.reply_kinds:
            conversation.awaiting_replies.add(seq)
            conversation.replies_done.clear()
        # The ack arrives later; not waiting for it keeps the open-model pace.
        client_msg_id = f"{codec.run}-{name}-{seq}"
        session = self.session
        if session.send_tagged(conversation.id, client_msg_id, text,
                               (self.customer.name, name, seq), engine.ack_sink):
            self._sent()
            return
        ack = session.send_soon(conversation.id, client_msg_id, text)
        if ack is None:  # an adapter whose send waits
            engine._spawn(self._send_waiting(client_msg_id, text, seq))
            return
        ack.add_done_callback(engine._ack_recorder(self.customer.name, name, seq))
        self._sent()

    async def _send_waiting(self, client_msg_id: str, text: str, seq: int) -> None:
        finished = self.finished
        try:
            ack = await self.session.send(self.conversation.id, client_msg_id, text)
            ack.add_done_callback(self.engine._ack_recorder(self.customer.name, self.name,
                                                            seq))
            if not finished.done():
                self._sent()
        except Exception as exc:
            if not finished.done():
                finished.set_exception(exc)

    def _sent(self) -> None:
        if self.index == self.drop_after and self.session.drop_connection():
            self.engine.out.events.append(f"{self.customer.name} dropped its connection")
        self.index += 1
        if self.index < len(self.plan):
            self.engine._schedule(self.plan[self.index][0], self)
        elif not self.finished.done():
            self.finished.set_result(None)


def agents_of_worker(agents: Sequence[AgentCredential], index: int,
                     workers: Sequence[int]) -> tuple[AgentCredential, ...]:
    """The probe agents worker ``index`` logs in, ``workers`` being the indexes of the
    workers the run started with (Locust's indexes only count up, so they may have gaps):
    agent i on the (i mod N)-th of them, so that confirming and answering, about a fifth of
    the work of a message, is shared instead of loading one worker. A worker not among them
    (a late joiner) logs in none, as a second session of an agent's account would take its
    conversations; with none named, worker 0 logs in all."""
    started = sorted(set(workers)) or [0]
    if index not in started:
        return ()
    position = started.index(index)
    return tuple(agent for i, agent in enumerate(agents) if i % len(started) == position)


class WorkerEngine:
    """One per Locust process: customers (this worker's users) and its share of the agents."""

    def __init__(self, target_url: str, config: TargetConfig, codec: StampCodec,
                 worker: str, script: Script | None = None, agent_url: str | None = None,
                 agents: Sequence[AgentCredential] | None = None) -> None:
        """``script``: the conversation script, so agents know which messages to answer.
        ``agent_url``: where the agents connect when not at ``target_url`` (each side behind
        its own network profile). ``agents``: the credentials this worker logs in (default:
        all of the config's; none, for a worker of customers only)."""
        self.target_url = target_url
        self.agent_url = agent_url or target_url
        self.config = config
        self.codec = codec
        self.worker = worker
        self.host = socket.gethostname()
        self.agent_credentials = tuple(config.agents if agents is None else agents)
        self.run_agents = bool(self.agent_credentials)
        self.out = EngineOutput()
        self.thread = LoopThread()
        self.adapter: Adapter | None = None
        self.agent_adapter: Adapter | None = None
        # The messages an agent answers, by their number in the conversation: the kind its
        # reply is reported under.
        self.reply_kinds: dict[int, str] = {} if script is None else {
            seq: f"reply:{step.kind}" for seq, step in enumerate(script.steps, start=1)
            if step.expects_reply}
        self.ack_sink = self._on_ack  # one bound method for every tagged send
        self._senders: dict[str, str] = {}  # agent id -> its id as a stamp field
        self.customers: dict[str, _Customer] = {}
        self.agents: list[AgentSession] = []
        self.agent_by_id: dict[str, AgentSession] = {}
        self._replied = SeenIds()
        self._sent_forged = 0
        self._sent_foreign = 0
        self._sent_late = 0
        self.clock_domain = clock_domain()
        self.agents_ready = False
        self.failure: str | None = None
        self.failure_cause: str | None = None
        self.started_at = time.monotonic()
        self._tasks: set[asyncio.Task[None]] = set()
        self._handoff: deque[tuple[str, tuple[str, list[Planned], int, int] | None]] = deque()
        self._wake_pending = False
        self._due: list[tuple[int, int, _Round]] = []  # (due µs, tie-breaker, round)
        self._due_order = itertools.count()
        self._due_timer: asyncio.TimerHandle | None = None
        self._due_timer_at = 0
        self._sending_due = False

    # -- greenlet side -----------------------------------------------------------------

    def start(self, sleep: Callable[[float], None]) -> None:
        """Start the loop thread and (on the agents' worker) the agents' login, without
        waiting for it: Locust's spawning greenlet must not block. Users ask `ready`."""
        self.thread.wait_ready(sleep)
        self.thread.call(self._start_in_loop)
        self.started_at = time.monotonic()

    @property
    def ready(self) -> bool:
        if not self.run_agents:
            return True
        if not self.agents_ready and self.failure is None and (
                time.monotonic() - self.started_at > self.config.connect_timeout_s * 2):
            self.failure = "probe agents did not log in in time"
        return self.agents_ready

    def play_round(self, customer: str, round_name: str, plan: list[Planned],
                   drop_after: int = -1, start_us: int | None = None) -> None:
        """Hand over one round of ``customer``'s script: a new conversation ``round_name``
        whose messages the chat loop sends at their planned times (open model: a send the
        loop makes late is counted, and its latency still counts from the plan). The
        connection drops after message number ``drop_after`` (mobile users), if >= 0.
        ``start_us``: when the round was planned to begin (default: its first message)."""
        start = start_us if start_us is not None else (plan[0][0] if plan else now_us())
        self._hand_over(customer, (round_name, plan, drop_after, start))

    def leave(self, customer: str) -> None:
        """The customer goes away (the shape took its user): what it has not sent yet is
        never sent, and its connection closes once the answers are in."""
        self._hand_over(customer, None)

    def _hand_over(self, customer: str,
                   item: tuple[str, list[Planned], int, int] | None) -> None:
        self._handoff.append((f"{self.worker}{customer}", item))
        if not self._wake_pending:
            # One wake-up per burst: the cross-thread call is the costly part.
            self._wake_pending = True
            self.thread.call(self._drain_handoff)

    def take_batch(self, cpu_percent: float | None) -> dict[str, Any]:
        out = self.out
        batch = empty_batch(self.worker, self.host)
        batch["clock"] = self.clock_domain
        batch["engine"] = "python"
        # Acks first: every ack taken now belongs to a send made before it, so that send is
        # in this batch or an earlier one (the collector records sends before acks).
        for key in ("acks", "sends", "receipts"):
            records = getattr(out, key)
            # The loop thread only ever extends these, by whole records (an extend by a tuple
            # holds the interpreter lock throughout): the first `taken` items stay put.
            taken = len(records)
            batch[key] = records[:taken]
            del records[:taken]
        forged, foreign = out.forged, out.foreign  # cumulative, owned by the loop thread
        batch["forged"], self._sent_forged = forged - self._sent_forged, forged
        batch["foreign"], self._sent_foreign = foreign - self._sent_foreign, foreign
        late = out.late_sends
        batch["late_sends"], self._sent_late = late - self._sent_late, late
        batch["send_lag_max_us"], out.send_lag_max_us = out.send_lag_max_us, 0
        # A max, not a count: a lost reset only means a lag is reported twice, never missed.
        batch["loop_lag_max_us"], self.thread.lag_max_us = self.thread.lag_max_us, 0
        batch["cpu"] = cpu_percent
        batch["agents"] = list(self.agent_by_id)  # appended to by the loop thread only
        problems = self.thread.problems
        for _ in range(len(problems)):
            out.events.append(problems.popleft())
        return batch

    def stop(self) -> None:
        if self.thread.loop is not None:
            self.thread.call(self._stop_in_loop)

    # -- loop side ---------------------------------------------------------------------

    def _start_in_loop(self) -> None:
        try:
            adapter_class = adapter_for(self.config.protocol)
            self.adapter = adapter_class(self.target_url, self.config)
            self.agent_adapter = self.adapter if self.agent_url == self.target_url else (
                adapter_class(self.agent_url, self.config))
        except Exception as exc:  # reported to the master as the run's failure
            self.failure = f"cannot set up the adapter: {exc}"
            return
        if self.run_agents:
            self._spawn(self._login_agents())

    async def _login_agents(self) -> None:
        assert self.agent_adapter is not None
        try:
            for credential in self.agent_credentials:
                agent = await self.agent_adapter.login_agent(
                    credential, self._receiver(credential.id), self._event(credential.id))
                self.agents.append(agent)
                self.agent_by_id[credential.id] = agent
        except TargetError as exc:
            self.failure = f"agent login failed: {exc}"
            self.failure_cause = exc.cause.value
            return
        self.agents_ready = True

    def _receiver(self, agent_id: str) -> Callable[[str, str | None], None]:
        parse = self.codec.parse
        out = self.out
        receipts = out.receipts
        reply_kinds = self.reply_kinds

        def on_receive(text: str, server_id: str | None) -> None:
            received = now_us()
            stamp = parse(text)
            if stamp is None:
                return
            if stamp.foreign:
                out.foreign += 1
            elif not stamp.valid:
                out.forged += 1
            else:
                receipts.extend((stamp.conversation, stamp.seq, agent_id, received))
                kind = reply_kinds.get(stamp.seq)
                if server_id is not None and kind is not None:
                    self._maybe_reply(agent_id, stamp.conversation, stamp.seq, kind,
                                      server_id, received)

        return on_receive

    def _maybe_reply(self, agent_id: str, conversation: str, seq: int, kind: str,
                     server_id: str, received_us: int) -> None:
        """Answer at once a message the script expects a reply to (its reply ``kind``): the
        reply is a stamped message of its own (agent -> customer), planned for the moment the
        question arrived."""
        agent = self.agent_by_id.get(agent_id)
        if agent is None:
            return
        if not self._replied.first_time((conversation, seq)):
            return  # a duplicate of a question already answered: a person answers once
        reply_conversation = f"{conversation}{REPLY_SUFFIX}"
        sender = self._senders.get(agent_id)
        if sender is None:
            # Agent ids may carry ':' (Matrix user ids), which a stamp field cannot.
            sender = self._senders[agent_id] = agent_id.replace(":", "_").replace("]", "_")
        text = self.codec.stamp_text(AGENT_REPLIES[seq % len(AGENT_REPLIES)], sender,
                                     reply_conversation, seq, received_us)
        # Planned for the question's arrival: the reply's latency includes all of the
        # generator's own wait, up to its write at the end of the agent's burst of frames.
        self.out.sends.extend((sender, reply_conversation, seq, received_us, now_us(), kind))

        client_msg_id = f"{self.codec.run}-r-{conversation}-{seq}"
        try:
            # Most adapters reply without waiting: no task (nor closure) per reply.
            sent = agent.reply_tagged(server_id, client_msg_id, text,
                                      (agent_id, reply_conversation, seq), self.ack_sink)
            if sent is not False:
                if sent is None:
                    self._reply_sent(None, agent_id, reply_conversation, seq)
                return
            soon = agent.reply_to_soon(server_id, client_msg_id, text)
        except TargetError as exc:
            self._reply_failed(agent_id, conversation, exc)
            return
        if soon is False:
            self._spawn(self._reply_later(agent, agent_id, server_id, client_msg_id, text,
                                          conversation, seq))
        else:
            self._reply_sent(soon, agent_id, reply_conversation, seq)

    async def _reply_later(self, agent: AgentSession, agent_id: str, server_id: str,
                           client_msg_id: str, text: str, conversation: str,
                           seq: int) -> None:
        """The reply of an adapter whose reply_to waits."""
        try:
            future = await agent.reply_to(server_id, client_msg_id, text)
        except TargetError as exc:
            self._reply_failed(agent_id, conversation, exc)
            return
        self._reply_sent(future, agent_id, f"{conversation}{REPLY_SUFFIX}", seq)

    def _reply_sent(self, future: asyncio.Future[Ack] | None, agent_id: str,
                    reply_conversation: str, seq: int) -> None:
        if future is None:
            self.out.events.append(f"{agent_id}: adapter cannot reply; reply counted lost")
            return
        # A refusal (e.g. the customer already closed the conversation) is reported.
        future.add_done_callback(self._ack_recorder(agent_id, reply_conversation, seq))

    def _reply_failed(self, agent_id: str, conversation: str, exc: TargetError) -> None:
        self.out.events.append(f"{agent_id}: reply to {conversation} failed: {exc}")

    def _customer_receiver(self, customer: _Customer) -> Callable[[str, str | None], None]:
        parse = self.codec.parse
        receipts = self.out.receipts
        receiver = f"customer:{customer.name}"
        conversations = customer.conversations

        def on_receive(text: str, server_id: str | None) -> None:
            received = now_us()
            stamp = parse(text)
            # Only answers to this customer's own conversations: another session of a shared
            # account (Matrix syncs every room of the account) must not count as a receipt.
            if stamp is None or stamp.foreign or not stamp.valid or not (
                    stamp.conversation.endswith(REPLY_SUFFIX)):
                return
            conversation = conversations.get(stamp.conversation[:-len(REPLY_SUFFIX)])
            if conversation is None:
                return
            receipts.extend((stamp.conversation, stamp.seq, receiver, received))
            conversation.awaiting_replies.discard(stamp.seq)
            if not conversation.awaiting_replies:
                conversation.replies_done.set()

        return on_receive

    def _event(self, who: str) -> Callable[[str, str], None]:
        def on_event(kind: str, detail: str) -> None:
            self.out.events.append(f"{who} {kind}: {detail}")
        return on_event

    def _drain_handoff(self) -> None:
        # Clear the flag before draining: a hand-over after this point schedules another
        # drain, so nothing is left behind.
        self._wake_pending = False
        handoff = self._handoff
        for _ in range(len(handoff)):
            name, item = handoff.popleft()
            customer = self.customers.get(name)
            if customer is None:
                if item is None:
                    continue  # leaving, but already gone
                customer = self.customers[name] = _Customer(name)
                self._spawn(self._run_customer(customer))
            if item is None:
                # The round in play ends now: its next message may be a long think away, and
                # a user the shape took must not keep its connection open until then.
                customer.leaving = True
                playing = customer.playing
                if playing is not None and not playing.finished.done():
                    playing.finished.set_result(None)
            customer.rounds.put_nowait(item)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_customer(self, customer: _Customer) -> None:
        """Connect once, play the rounds handed over, leave when the user goes. A connection
        the target kills for good loses the round in play and those whose time has come;
        rounds planned for later (users hand them over ahead) get a new connection then."""
        assert self.adapter is not None
        session: CustomerSession | None = None
        customer.connecting_since_us = now_us()
        try:
            while True:
                try:
                    session = await self.adapter.connect_customer(
                        f"swarm-{self.codec.run}-{customer.name}",
                        self._customer_receiver(customer), self._event(customer.name))
                    while (item := await customer.rounds.get()) is not None:
                        await self._play(session, customer, *item)
                    # Leaving: the open conversations wait for their answers side by side.
                    await asyncio.gather(*(self._close_when_answered(session, customer, name, c)
                                           for name, c in list(customer.conversations.items())))
                    return
                except TargetError as exc:
                    self.out.events.append(f"{customer.name} dead: {exc}")
                    if session is not None:
                        with contextlib.suppress(Exception):
                            await session.close()
                        session = None
                    next_start_us = self._drop_due_rounds(customer)
                    if next_start_us is None:
                        return
                    await asyncio.sleep(max(0, next_start_us - now_us()) / 1e6)
                    if customer.leaving:
                        return
                    customer.connecting_since_us = now_us()
        finally:
            self.customers.pop(customer.name, None)
            if session is not None:
                with contextlib.suppress(Exception):
                    await session.close()

    def _drop_due_rounds(self, customer: _Customer) -> int | None:
        """After the connection died: the queued rounds whose time has come are recorded as
        sent (the ledger calls their messages lost at their deadline); later ones stay
        queued. Returns the start of the first of those, None when none or leaving."""
        now = now_us()
        later: list[tuple[str, list[Planned], int, int]] = []
        while not customer.rounds.empty():
            item = customer.rounds.get_nowait()
            if item is None or customer.leaving:
                return None  # the user went: its rounds never happen
            if item[3] <= now:
                self._record_unsent(f"{self.worker}{item[0]}", item[1], 0)
            else:
                later.append(item)
        for item in later:
            customer.rounds.put_nowait(item)
        return later[0][3] if later else None

    async def _play(self, session: CustomerSession, customer: _Customer, round_name: str,
                    plan: list[Planned], drop_after: int, start_us: int) -> None:
        """One round: each message stamped and sent at its planned time, in order. If the
        target fails the round, what was planned but not sent is recorded as sent (the
        customer tried), so the ledger calls it lost instead of never knowing of it."""
        name = f"{self.worker}{round_name}"
        if customer.leaving:
            return
        channels = self.config.channels
        channel = channels[zlib.crc32(name.encode()) % len(channels)]
        playing: _Round | None = None
        try:
            # The customer opens the chat window, then types: the open overlaps the first
            # think time. A send held up by the target's answer waited for the target, so
            # that wait is not the generator's lateness; a generator late to ask still shows.
            asked_us = customer.connecting_since_us or now_us()
            customer.connecting_since_us = None
            opened = await session.open_conversation(name, channel)
            conversation = customer.conversations[name] = _Conversation(opened.id)
            if plan:
                # An on-time generator could send no sooner than the round's start plus the
                # time the target took (connecting, opening); later is the generator's delay.
                playing = _Round(self, session, customer, name, plan, drop_after,
                                 start_us + now_us() - asked_us, conversation)
                self._schedule(plan[0][0], playing)
                customer.playing = playing
                try:
                    await playing.finished
                finally:
                    customer.playing = None
            self._spawn(self._close_when_answered(session, customer, name, conversation))
        except TargetError:
            self._record_unsent(name, plan, playing.done if playing is not None else 0)
            raise

    # The send clock: every customer's next message waits in one heap under one timer, so a
    # message costs a heap push and pop instead of a sleeping coroutine and a timer of its own.

    def _schedule(self, at_us: int, playing: _Round) -> None:
        heapq.heappush(self._due, (at_us, next(self._due_order), playing))
        if self._sending_due:
            return  # _send_due arms the timer for what is left when it is done
        timer = self._due_timer
        if timer is None or at_us < self._due_timer_at:
            if timer is not None:
                timer.cancel()
            self._arm_due(at_us)

    def _arm_due(self, at_us: int) -> None:
        # Whole milliseconds, rounded up: uvloop rounds a shorter delay to 0 and the loop
        # would spin (a core busy doing nothing, read as a saturated generator) until the
        # message is due. A message thus leaves up to ~1 ms after its plan; that delay is
        # the generator's, measured (latency counts from the plan) and far below LATE_SEND_US.
        self._due_timer_at = at_us
        wait_ms = -(-(at_us - now_us()) // 1000)
        self._due_timer = asyncio.get_running_loop().call_later(
            max(0, wait_ms) / 1000, self._send_due)

    def _send_due(self) -> None:
        self._due_timer = None
        due = self._due
        self._sending_due = True
        try:
            while due:
                now = now_us()
                # uvloop keeps timers in whole milliseconds and may wake early: a message
                # sent before its planned time could even arrive "before" it. Never early.
                if due[0][0] > now:
                    break
                heapq.heappop(due)[2].send_next(now)
        finally:
            self._sending_due = False
            if due:
                self._arm_due(due[0][0])

    def _record_unsent(self, name: str, plan: list[Planned], done: int) -> None:
        now = now_us()
        for seq, (intended_us, kind, _) in enumerate(plan[done:], start=done + 1):
            self.out.sends.extend((name, name, seq, intended_us, now, kind))

    async def _close_when_answered(self, session: CustomerSession, customer: _Customer,
                                   name: str, conversation: _Conversation) -> None:
        """Stay for the answers (bounded by the deadline), as a customer would, then close
        the conversation so the agent's capacity frees up."""
        if conversation.awaiting_replies:
            # A timer that gives up waiting, not asyncio.timeout: this runs every round.
            done = conversation.replies_done
            timer = asyncio.get_running_loop().call_later(self.config.deadline_ms / 1000,
                                                          done.set)
            try:
                await done.wait()
            finally:
                timer.cancel()
        if not conversation.closed:
            conversation.closed = True
            with contextlib.suppress(TargetError):
                await session.close_conversation(conversation.id)
        # Late answers to a recently closed round still count; older closed rounds are
        # forgotten (one still waiting for its answers is kept).
        rounds = customer.conversations
        if len(rounds) > RECENT_CONVERSATIONS:
            closed = [name for name, c in rounds.items() if c.closed]
            for name in closed[:len(rounds) - RECENT_CONVERSATIONS]:
                del rounds[name]

    def _on_ack(self, tag: tuple[str, str, int], server_id: str | None,
                error: TargetError | None) -> None:
        """The outcome of a tagged send (who, conversation, seq), as :meth:`_ack_recorder`
        reads a future's."""
        if error is None:
            self.out.acks.extend((tag[1], tag[2], now_us(), server_id))
        else:
            self.out.events.append(f"{tag[0]}: message refused: {error}")

    def _ack_recorder(self, who: str, conversation: str,
                      seq: int) -> Callable[[asyncio.Future[Ack]], None]:
        """Reads each ack: its time and the target's message id are the first hop of the
        message's evidence; a refusal is reported (the ledger calls the message lost at its
        deadline), never left in an unread future."""
        acks = self.out.acks

        def record(future: asyncio.Future[Ack]) -> None:
            if future.cancelled():
                return
            exception = future.exception()
            if exception is not None:
                self.out.events.append(f"{who}: message refused: {exception}")
            else:
                acks.extend((conversation, seq, now_us(), future.result().server_id))
        return record

    def _stop_in_loop(self) -> None:
        async def close_all() -> None:
            for customer in list(self.customers.values()):
                customer.leaving = True
                customer.rounds.put_nowait(None)
            for agent in self.agents:
                with contextlib.suppress(Exception):
                    await agent.close()
            if self.adapter is not None:
                await self.adapter.close()
            if self.agent_adapter is not None and self.agent_adapter is not self.adapter:
                await self.agent_adapter.close()
            # The thread ends with its loop: nothing of it runs while the process exits.
            asyncio.get_running_loop().stop()

        self._spawn(close_all())
