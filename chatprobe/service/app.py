"""The reference customer-service chat service (aiohttp): chatprobe's embedded default target.

It models a merchant chat platform, not an echo server: shops with sub-account agents,
routing with eligibility rules and a queue, keyword filters, a push switch, a minimum client
version, persistence with resume, and an admin API that injects faults on the customer -> agent
path and reports ground-truth counters. The wire protocol and admin API are documented in
docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import hmac
import itertools
import json
import logging
import random
import sqlite3
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import WSMsgType, web

from chatprobe.protocols import wire
from chatprobe.service import longpoll
from chatprobe.service.faults import FaultError, Faults
from chatprobe.service.model import (
    Agent,
    ModelError,
    Shop,
    apply_agent_fields,
    apply_shop_fields,
    ineligibility,
)
from chatprobe.service.store import ConversationRow, MessageRow, Store

log = logging.getLogger("chatprobe.service")

REORDER_FLUSH_S = 0.5  # a held-back message with no successor is pushed in order after this
PUSH_LOG_LIMIT = 1_000_000  # message ids whose push time the trace endpoint remembers
TICK_S = 0.5  # re-evaluate queue (business hours) and session validity this often
COUNTER_NAMES = (
    "accepted", "pushed", "dropped", "duplicated", "reordered", "filtered", "queued",
    "delayed", "paused", "push_disabled", "client_too_old", "conversation_closed",
    "replies", "replies_pushed", "resumed_frames", "bad_frames",
)


class Channel(Protocol):
    """What a session writes to: a WebSocket, or a long-polling channel (longpoll.py)."""

    @property
    def closed(self) -> bool: ...

    async def send_str(self, data: str) -> None: ...

    async def close(self) -> object: ...


class Session:
    """One client connection; frames go out through a queue so pushes never interleave."""

    def __init__(self, ws: Channel, role: str, shop: str, user: str,
                 version_ok: bool) -> None:
        self.ws = ws
        self.role = role
        self.shop = shop
        self.user = user
        self.version_ok = version_ok
        self.outbox: asyncio.Queue[str | None] = asyncio.Queue()
        self.resume_after: int | None = None

    def send(self, frame: wire.Frame) -> None:
        self.outbox.put_nowait(wire.encode(frame))

    async def pump(self) -> None:
        """Write queued frames in order; None means: flush what came before, then hang up."""
        while True:
            text = await self.outbox.get()
            if self.ws.closed:
                return
            if text is None:
                await self.ws.close()
                return
            try:
                await self.ws.send_str(text)
            except (ConnectionError, RuntimeError):
                return

    def end(self, frame: wire.Frame | None = None) -> None:
        """Send a last frame (optional) and close the connection after everything queued."""
        if frame is not None:
            self.send(frame)
        self.outbox.put_nowait(None)


@dataclass
class Held:
    frames: list[tuple[tuple[str, str], wire.Frame]]
    handle: asyncio.TimerHandle


@dataclass
class ServiceState:
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTER_NAMES, 0))
    push_log: dict[int, float] = field(default_factory=dict)


class ChatService:
    def __init__(self, shops: dict[str, Shop], store: Store, admin_token: str,
                 faults: Faults | None = None) -> None:
        self.shops = shops
        self.store = store
        self.admin_token = admin_token
        self.faults = faults or Faults()
        self.rng = random.Random(self.faults.seed)
        self.state = ServiceState()
        self.conversations: dict[int, ConversationRow] = {}
        self.queued: OrderedDict[int, None] = OrderedDict()
        self.active: dict[tuple[str, str], int] = {}
        self.agent_sessions: dict[tuple[str, str], set[Session]] = {}
        self.customer_sessions: dict[tuple[str, str], set[Session]] = {}
        self.held: dict[int, Held] = {}
        self.last_due: dict[int, float] = {}
        self.paused: list[tuple[int, tuple[str, str], wire.Frame]] = []
        self._tick_task: asyncio.Task[None] | None = None
        self.background: set[asyncio.Task[None]] = set()  # long-poll connections
        self._expiry_task: asyncio.Task[None] | None = None
        for conv in store.open_conversations():
            self.conversations[conv.id] = conv
            if conv.agent is None:
                self.queued[conv.id] = None
        self.active = {k: v for k, v in store.active_conversation_counts().items()}

    @property
    def counters(self) -> dict[str, int]:
        return self.state.counters

    # -- routing ------------------------------------------------------------------------

    def _now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    def queue_reasons(self, conv: ConversationRow) -> dict[str, str]:
        shop = self.shops[conv.shop]
        now = self._now()
        reasons: dict[str, str] = {}
        for agent in shop.agents.values():
            reason = ineligibility(shop, agent, conv.channel, conv.skill_group,
                                   self.active.get((shop.id, agent.id), 0),
                                   bool(self.agent_sessions.get((shop.id, agent.id))), now)
            if reason is not None:
                reasons[agent.id] = reason
        return reasons

    def _pick_agent(self, conv: ConversationRow) -> Agent | None:
        shop = self.shops.get(conv.shop)
        if shop is None:
            return None
        now = self._now()
        best: Agent | None = None
        best_load = 0
        for agent in sorted(shop.agents.values(), key=lambda a: a.id):
            load = self.active.get((shop.id, agent.id), 0)
            connected = bool(self.agent_sessions.get((shop.id, agent.id)))
            if ineligibility(shop, agent, conv.channel, conv.skill_group, load, connected,
                             now) is None and (best is None or load < best_load):
                best, best_load = agent, load
        return best

    def _assign(self, conv: ConversationRow, agent: Agent) -> None:
        conv.agent = agent.id
        self.store.set_agent(conv.id, agent.id)
        key = (conv.shop, agent.id)
        self.active[key] = self.active.get(key, 0) + 1
        self.queued.pop(conv.id, None)
        for session in self.agent_sessions.get(key, ()):
            session.send({"type": "assigned", "conversation": conv.id, "customer": conv.customer,
                          "channel": conv.channel})
        for session in self.customer_sessions.get((conv.shop, conv.customer), ()):
            session.send({"type": "status", "conversation": conv.id, "state": "assigned",
                          "agent": agent.id})

    def drain_queue(self) -> None:
        """Assign queued conversations to agents that became eligible, oldest first."""
        for conv_id in list(self.queued):
            conv = self.conversations.get(conv_id)
            if conv is None or conv.state != "open":
                self.queued.pop(conv_id, None)
                continue
            agent = self._pick_agent(conv)
            if agent is None:
                continue
            self.assign_and_flush(conv, agent)

    def assign_and_flush(self, conv: ConversationRow, agent: Agent) -> None:
        """Assign a conversation and send on what waited in its queue (re-checking the push
        switch, which may have changed while the messages waited)."""
        self._assign(conv, agent)
        push_enabled = self.shops[conv.shop].push_enabled
        for row in self.store.messages_with_status(conv.id, "queued"):
            if push_enabled:
                self._route_accepted(conv, row)
            else:
                self.store.set_status(row.id, "push_disabled", None, conv.agent)
                self.counters["push_disabled"] += 1

    # -- the customer -> agent path -----------------------------------------------------

    def _status_for_new_message(self, conv: ConversationRow, text: str) -> tuple[str, str | None]:
        shop = self.shops[conv.shop]
        if conv.state != "open":
            return "conversation_closed", None
        rule = shop.filtered_by(text)
        if rule is not None:
            return "filtered", f"{rule.action}: {rule.keyword}"
        if not shop.push_enabled:
            return "push_disabled", None
        if conv.agent is None:
            return "queued", None
        # Routable: stored as assigned right away, one write per message.
        return "assigned", None

    def accept_customer_message(self, session: Session, conv: ConversationRow,
                                client_msg_id: str, text: str) -> MessageRow:
        status, reason = self._status_for_new_message(conv, text)
        try:
            row = self.store.add_message(conv.id, "in", session.user, client_msg_id, text,
                                         status, reason, conv.agent)
        except sqlite3.IntegrityError:
            # A resend of a message we already hold (the client missed our ack): same id.
            existing = self.store.find_message(conv.id, "in", client_msg_id)
            assert existing is not None
            return existing
        counters = self.counters
        counters["accepted"] += 1
        if status == "assigned":
            self._route_accepted(conv, row, stored_as_assigned=True)
        elif status == "queued":
            counters["queued"] += 1
        else:
            counters[status] += 1
        return row

    def _route_accepted(self, conv: ConversationRow, row: MessageRow,
                        stored_as_assigned: bool = False) -> None:
        """Apply injected faults and push a routed message towards its agent."""
        assert conv.agent is not None
        faults = self.faults
        rng = self.rng
        if faults.drop and rng.random() < faults.drop:
            self.store.set_status(row.id, "dropped", "fault", conv.agent)
            self.counters["dropped"] += 1
            return
        if not stored_as_assigned:
            self.store.set_status(row.id, "assigned", None, conv.agent)
        agent_key = (conv.shop, conv.agent)
        frames = [(agent_key, self._agent_frame(conv, row))]
        if faults.duplicate and rng.random() < faults.duplicate:
            copy = self.store.add_message(conv.id, "in", row.sender,
                                          f"{row.client_msg_id}#dup{row.id}", row.text,
                                          "assigned", f"duplicate_of:{row.id}", conv.agent)
            frames.append((agent_key, self._agent_frame(conv, copy)))
            self.counters["duplicated"] += 1
        held = self.held.pop(conv.id, None)
        if held is not None:
            held.handle.cancel()
            self.counters["reordered"] += 1
            for key, frame in frames + held.frames:
                self._push(conv.id, key, frame)
        elif faults.reorder and rng.random() < faults.reorder:
            loop = asyncio.get_running_loop()
            handle = loop.call_later(REORDER_FLUSH_S, self._flush_held, conv.id)
            self.held[conv.id] = Held(frames, handle)
        else:
            for key, frame in frames:
                self._push(conv.id, key, frame)

    def _flush_held(self, conv_id: int) -> None:
        held = self.held.pop(conv_id, None)
        if held is not None:
            for key, frame in held.frames:
                self._push(conv_id, key, frame)

    @staticmethod
    def _agent_frame(conv: ConversationRow, row: MessageRow) -> wire.Frame:
        return {"type": "message", "id": row.id, "conversation": conv.id,
                "customer": conv.customer, "channel": conv.channel, "text": row.text,
                "ts": row.ts}

    def _push(self, conv_id: int, agent_key: tuple[str, str], frame: wire.Frame) -> None:
        faults = self.faults
        if faults.pause_push:
            self.paused.append((conv_id, agent_key, frame))
            self.counters["paused"] += 1
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        delay = 0.0
        if faults.delays:
            jitter = faults.delay_jitter_ms
            delay = max(0.0, faults.delay_ms + (self.rng.uniform(-jitter, jitter)
                                                 if jitter else 0.0)) / 1000.0
        previous_due = self.last_due.get(conv_id, 0.0)
        if delay == 0.0 and previous_due <= now:
            self._deliver(agent_key, frame)
            return
        # Keep each conversation in order even with jitter: no natural reordering that the
        # service would not count.
        due = max(now + delay, previous_due + 1e-6)
        self.last_due[conv_id] = due
        self.counters["delayed"] += 1
        loop.call_at(due, self._deliver, agent_key, frame)

    def _deliver(self, agent_key: tuple[str, str], frame: wire.Frame) -> None:
        sessions = self.agent_sessions.get(agent_key)
        if not sessions:
            return  # stays 'assigned': delivered when the agent resumes
        good = [s for s in sessions if s.version_ok]
        if not good:
            self.counters["client_too_old"] += 1
            self.store.set_status(frame["id"], "client_too_old")
            return
        for session in good:
            session.send(frame)
        self.counters["pushed"] += 1
        push_log = self.state.push_log
        push_log[frame["id"]] = time.time()
        if len(push_log) > PUSH_LOG_LIMIT:
            # Traces of the oldest pushes go first: bounded memory for long soak runs.
            for old_id in list(itertools.islice(push_log, PUSH_LOG_LIMIT // 10)):
                del push_log[old_id]

    def set_faults(self, faults: Faults) -> None:
        was_paused = self.faults.pause_push
        self.faults = faults
        if faults.seed is not None:
            self.rng.seed(faults.seed)
        if was_paused and not faults.pause_push:
            paused, self.paused = self.paused, []
            for conv_id, key, frame in paused:
                self._push(conv_id, key, frame)

    # -- sessions -----------------------------------------------------------------------

    def check_sessions(self) -> None:
        """Close agent sessions whose token expired or whose account was frozen."""
        now = time.time()
        for (shop_id, agent_id), sessions in list(self.agent_sessions.items()):
            agent = self.shops[shop_id].agents.get(agent_id)
            code = _login_problem(agent, now) if agent else wire.ERR_AUTH_FAILED
            if code is None:
                continue
            for session in list(sessions):
                # Unregister at once so the router stops counting this agent as connected.
                _logout(self, session)
                session.end({"type": "error", "code": code, "message": "session ended"})

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.check_sessions()
                self.drain_queue()
            except Exception:  # keep ticking: one bad state must not stop routing
                log.exception("tick failed")


def _login_problem(agent: Agent, now: float) -> str | None:
    if agent.status != "active":
        return wire.ERR_ACCOUNT_FROZEN
    if agent.token_expires_at is not None and agent.token_expires_at <= now:
        return wire.ERR_SESSION_EXPIRED
    return None


# -- WebSocket handler ---------------------------------------------------------------------


class FrameError(Exception):
    def __init__(self, code: str, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    service: ChatService = request.app[SERVICE_KEY]
    ws = web.WebSocketResponse(heartbeat=None, max_msg_size=1 << 20)
    await ws.prepare(request)

    async def messages() -> AsyncIterator[str | bytes]:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                yield str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                yield bytes(msg.data)

    await serve_channel(service, ws, messages())
    return ws


async def serve_channel(service: ChatService, ws: Channel,
                        messages: AsyncIterator[str | bytes]) -> None:
    """One client connection, whatever carries it: log in, handle frames, log out."""
    session: Session | None = None
    pump: asyncio.Task[None] | None = None
    try:
        async for data in messages:
            frame: wire.Frame | None = None
            try:
                if isinstance(data, bytes):
                    raise wire.ProtocolError("binary frames not supported")
                frame = wire.decode(data)
                if session is None:
                    session = _hello(service, ws, frame)
                    pump = asyncio.get_running_loop().create_task(session.pump())
                    _after_login(service, session)
                else:
                    _handle(service, session, frame)
            except wire.ProtocolError as exc:
                service.counters["bad_frames"] += 1
                error = {"type": "error", "code": wire.ERR_BAD_FRAME, "message": str(exc)}
                _echo_request_ids(error, frame)
                if session is not None:
                    session.send(error)
                else:
                    await ws.send_str(wire.encode(error))
            except FrameError as exc:
                error = {"type": "error", "code": exc.code, "message": exc.message}
                _echo_request_ids(error, frame)
                if session is not None:
                    session.send(error)
                else:
                    await ws.send_str(wire.encode(error))
                if exc.fatal:
                    break
    finally:
        if session is not None:
            _logout(service, session)
            session.outbox.put_nowait(None)
        if pump is not None:
            await pump
        await ws.close()


def _echo_request_ids(error: wire.Frame, frame: wire.Frame | None) -> None:
    """Let the client tell which request failed."""
    if isinstance(frame, dict):
        for key in ("client_msg_id", "ref"):
            if isinstance(frame.get(key), str):
                error[key] = frame[key]


def _hello(service: ChatService, ws: Channel, frame: wire.Frame) -> Session:
    if frame["type"] != "hello":
        raise FrameError(wire.ERR_NOT_LOGGED_IN, "first frame must be hello", fatal=True)
    role = frame.get("role")
    shop_id = wire.require_str(frame, "shop")
    shop = service.shops.get(shop_id)
    if shop is None:
        raise FrameError(wire.ERR_UNKNOWN_SHOP, f"no shop {shop_id!r}", fatal=True)
    resume_after = wire.optional_int(frame, "resume_after")
    version = str(frame.get("client_version", "0"))
    version_ok = wire.version_tuple(version) >= wire.version_tuple(shop.min_client_version)
    if role == "agent":
        agent_id = wire.require_str(frame, "agent")
        token = frame.get("token")
        agent = shop.agents.get(agent_id)
        if agent is None or not isinstance(token, str) or not hmac.compare_digest(
                token.encode(), agent.token.encode()):
            raise FrameError(wire.ERR_AUTH_FAILED, "unknown agent or wrong token", fatal=True)
        problem = _login_problem(agent, time.time())
        if problem is not None:
            raise FrameError(problem, "login refused", fatal=True)
        session = Session(ws, "agent", shop_id, agent_id, version_ok)
    elif role == "customer":
        customer = wire.require_str(frame, "customer", 128)
        session = Session(ws, "customer", shop_id, customer, version_ok)
    else:
        raise FrameError(wire.ERR_BAD_FRAME, "role must be 'agent' or 'customer'", fatal=True)
    session.resume_after = resume_after
    return session


def _after_login(service: ChatService, session: Session) -> None:
    resume_after = session.resume_after
    key = (session.shop, session.user)
    shop = service.shops[session.shop]
    welcome: wire.Frame = {"type": "welcome", "role": session.role, "server_time": time.time(),
                           "protocol": wire.PROTOCOL_VERSION,
                           "client_supported": session.version_ok,
                           # Where a client that has seen nothing yet resumes from later.
                           "last_id": service.store.last_message_id()}
    if session.role == "agent":
        agent = shop.agents[session.user]
        hours = agent.business_hours or shop.business_hours
        welcome["profile"] = agent.public() | {
            "within_hours": hours is None or hours.contains(service._now())}
        session.send(welcome)
        service.agent_sessions.setdefault(key, set()).add(session)
        for conv in service.conversations.values():
            if conv.shop == session.shop and conv.agent == session.user:
                session.send({"type": "assigned", "conversation": conv.id,
                              "customer": conv.customer, "channel": conv.channel})
        if resume_after is not None and session.version_ok:
            for row in service.store.agent_backlog(session.shop, session.user, resume_after):
                open_conv = service.conversations.get(row.conversation)
                if open_conv is not None:
                    session.send(service._agent_frame(open_conv, row))
                    service.counters["resumed_frames"] += 1
        service.drain_queue()
    else:
        session.send(welcome)
        service.customer_sessions.setdefault(key, set()).add(session)
        if resume_after is not None:
            for row in service.store.customer_backlog(session.shop, session.user, resume_after):
                session.send(_customer_frame(row))
                service.counters["resumed_frames"] += 1


def _customer_frame(row: MessageRow) -> wire.Frame:
    return {"type": "message", "id": row.id, "conversation": row.conversation,
            "from": "agent", "agent": row.sender, "text": row.text, "ts": row.ts}


def _logout(service: ChatService, session: Session) -> None:
    table = service.agent_sessions if session.role == "agent" else service.customer_sessions
    sessions = table.get((session.shop, session.user))
    if sessions is not None:
        sessions.discard(session)
        if not sessions:
            del table[(session.shop, session.user)]


def _conversation_for(service: ChatService, session: Session, frame: wire.Frame) -> ConversationRow:
    conv_id = frame.get("conversation")
    if not isinstance(conv_id, int) or isinstance(conv_id, bool):
        raise wire.ProtocolError("'conversation' must be an integer id")
    conv = service.conversations.get(conv_id)
    if conv is None:
        # Closed conversations are no longer in memory; customers may still write to them.
        row = service.store.db.execute(
            "SELECT id, shop, customer, ref, channel, skill_group, agent, state"
            " FROM conversations WHERE id=?", (conv_id,)).fetchone()
        conv = ConversationRow(*row) if row else None
    if conv is None or conv.shop != session.shop:
        raise FrameError(wire.ERR_UNKNOWN_CONVERSATION, f"no conversation {conv_id}")
    return conv


def _handle(service: ChatService, session: Session, frame: wire.Frame) -> None:
    kind = frame["type"]
    if kind == "ping":
        session.send({"type": "pong", "server_time": time.time(), "echo": frame.get("echo")})
    elif session.role == "customer" and kind == "open":
        _open(service, session, frame)
    elif session.role == "customer" and kind == "send":
        conv = _conversation_for(service, session, frame)
        if conv.customer != session.user:
            raise FrameError(wire.ERR_UNKNOWN_CONVERSATION, "not your conversation")
        client_msg_id = wire.require_str(frame, "client_msg_id", 128)
        text = wire.require_str(frame, "text", 65536)
        row = service.accept_customer_message(session, conv, client_msg_id, text)
        session.send({"type": "ack", "client_msg_id": client_msg_id, "id": row.id,
                      "conversation": conv.id, "ts": row.ts})
    elif session.role == "agent" and kind == "reply":
        _reply(service, session, frame)
    elif session.role == "agent" and kind == "presence":
        presence = frame.get("presence")
        agent = service.shops[session.shop].agents[session.user]
        try:
            apply_agent_fields(agent, {"presence": presence}, "presence")
        except ModelError as exc:
            raise wire.ProtocolError(str(exc)) from None
        session.send({"type": "presence", "presence": agent.presence})
        service.drain_queue()
    elif kind == "close":
        conv = _conversation_for(service, session, frame)
        allowed = (conv.agent == session.user if session.role == "agent"
                   else conv.customer == session.user)
        if not allowed:
            raise FrameError(wire.ERR_UNKNOWN_CONVERSATION, "not your conversation")
        close_conversation(service, conv)
        session.send({"type": "closed", "conversation": conv.id})
    else:
        raise wire.ProtocolError(f"unknown frame type {kind!r} for a {session.role}")


def _open(service: ChatService, session: Session, frame: wire.Frame) -> None:
    ref = wire.require_str(frame, "ref", 128)
    channel = frame.get("channel", "web")
    if channel not in ("web", "app", "mini_program"):
        raise wire.ProtocolError("channel must be web, app or mini_program")
    group = frame.get("skill_group")
    if group is not None and not isinstance(group, str):
        raise wire.ProtocolError("'skill_group' must be a string")
    conv, created = service.store.open_conversation(session.shop, session.user, ref, channel,
                                                    group)
    known = service.conversations.get(conv.id)
    if known is not None:
        conv = known
    elif conv.state == "open":
        service.conversations[conv.id] = conv
    if created:
        agent = service._pick_agent(conv)
        if agent is not None:
            service._assign(conv, agent)
        else:
            service.queued[conv.id] = None
    state = conv.state if conv.state != "open" else ("assigned" if conv.agent else "queued")
    session.send({"type": "opened", "ref": ref, "conversation": conv.id, "state": state,
                  "agent": conv.agent, "channel": conv.channel})


def _reply(service: ChatService, session: Session, frame: wire.Frame) -> None:
    conv = _conversation_for(service, session, frame)
    if conv.agent != session.user or conv.state != "open":
        raise FrameError(wire.ERR_NOT_YOUR_CONVERSATION, "conversation is not assigned to you")
    client_msg_id = wire.require_str(frame, "client_msg_id", 128)
    text = wire.require_str(frame, "text", 65536)
    try:
        row = service.store.add_message(conv.id, "out", session.user, client_msg_id, text,
                                        "pushed", None, session.user)
        fresh = True
    except sqlite3.IntegrityError:
        existing = service.store.find_message(conv.id, "out", client_msg_id)
        assert existing is not None
        row, fresh = existing, False
    session.send({"type": "ack", "client_msg_id": client_msg_id, "id": row.id,
                  "conversation": conv.id, "ts": row.ts})
    if fresh:
        service.counters["replies"] += 1
        targets = service.customer_sessions.get((conv.shop, conv.customer), ())
        for customer_session in targets:
            customer_session.send(_customer_frame(row))
        if targets:
            service.counters["replies_pushed"] += 1


def close_conversation(service: ChatService, conv: ConversationRow) -> None:
    if conv.state != "open":
        return
    conv.state = "closed"
    service.store.close_conversation(conv.id)
    for row in service.store.messages_with_status(conv.id, "queued"):
        service.store.set_status(row.id, "conversation_closed")
        service.counters["conversation_closed"] += 1
    service.conversations.pop(conv.id, None)
    service.queued.pop(conv.id, None)
    if conv.agent is not None:
        key = (conv.shop, conv.agent)
        service.active[key] = max(0, service.active.get(key, 0) - 1)
    service.drain_queue()


# -- admin API -----------------------------------------------------------------------------

SERVICE_KEY = web.AppKey("service", ChatService)


def _check_admin(request: web.Request) -> None:
    service = request.app[SERVICE_KEY]
    header = request.headers.get("Authorization", "")
    token = header[7:] if header.startswith("Bearer ") else request.headers.get("X-Admin-Token",
                                                                                 "")
    if not hmac.compare_digest(token.encode(), service.admin_token.encode()):
        raise web.HTTPUnauthorized(text=json.dumps({"error": "admin token required"}),
                                   content_type="application/json")


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text=json.dumps({"error": "body must be JSON"}),
                                 content_type="application/json") from None


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


def _not_found(message: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(text=json.dumps({"error": message}), content_type="application/json")


def _int_id(request: web.Request) -> int:
    try:
        return int(request.match_info["id"])
    except ValueError:
        raise _bad("id must be an integer") from None


async def admin_stats(request: web.Request) -> web.Response:
    _check_admin(request)
    service = request.app[SERVICE_KEY]
    body = dict(service.counters)
    body["queued_conversations"] = len(service.queued)
    body["agent_sessions"] = sum(len(s) for s in service.agent_sessions.values())
    body["customer_sessions"] = sum(len(s) for s in service.customer_sessions.values())
    body["held_for_reorder"] = len(service.held)
    body["paused_frames"] = len(service.paused)
    return web.json_response(body)


async def admin_get_faults(request: web.Request) -> web.Response:
    _check_admin(request)
    return web.json_response(request.app[SERVICE_KEY].faults.as_dict())


async def admin_set_faults(request: web.Request) -> web.Response:
    _check_admin(request)
    try:
        faults = Faults.parse(await _json_body(request))
    except FaultError as exc:
        raise _bad(str(exc)) from None
    service = request.app[SERVICE_KEY]
    service.set_faults(faults)
    return web.json_response(faults.as_dict())


async def admin_reset_stats(request: web.Request) -> web.Response:
    _check_admin(request)
    service = request.app[SERVICE_KEY]
    service.state.counters = dict.fromkeys(COUNTER_NAMES, 0)
    return web.json_response(service.counters)


async def admin_get_shop(request: web.Request) -> web.Response:
    _check_admin(request)
    shop = request.app[SERVICE_KEY].shops.get(request.match_info["shop"])
    if shop is None:
        raise _not_found("no such shop")
    return web.json_response(shop.public())


async def _json_object(request: web.Request) -> dict[str, Any]:
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise _bad("body must be a JSON object")
    return body


def _after_config_change(service: ChatService) -> None:
    service.check_sessions()
    service.drain_queue()


async def admin_patch_shop(request: web.Request) -> web.Response:
    """PATCH changes fields of a shop; PUT also creates it. All-or-nothing on errors."""
    _check_admin(request)
    service = request.app[SERVICE_KEY]
    shop_id = request.match_info["shop"]
    body = await _json_object(request)
    current = service.shops.get(shop_id)
    if current is None and request.method != "PUT":
        raise _not_found("no such shop (PUT creates one)")
    shop = copy.deepcopy(current) if current is not None else Shop(id=shop_id)
    try:
        apply_shop_fields(shop, body, f"shops.{shop_id}")
    except ModelError as exc:
        raise _bad(str(exc)) from None
    service.shops[shop_id] = shop
    _after_config_change(service)
    return web.json_response(shop.public())


async def admin_patch_agent(request: web.Request) -> web.Response:
    """PATCH changes fields of an agent; PUT also creates it. All-or-nothing on errors."""
    _check_admin(request)
    service = request.app[SERVICE_KEY]
    shop = service.shops.get(request.match_info["shop"])
    if shop is None:
        raise _not_found("no such shop")
    agent_id = request.match_info["agent"]
    body = await _json_object(request)
    current = shop.agents.get(agent_id)
    if current is None and request.method != "PUT":
        raise _not_found("no such agent (PUT creates one)")
    agent = copy.deepcopy(current) if current is not None else Agent(id=agent_id, token="")
    try:
        apply_agent_fields(agent, body, f"agents.{agent_id}")
    except ModelError as exc:
        raise _bad(str(exc)) from None
    if not agent.token:
        raise _bad("agents need a token")
    shop.agents[agent_id] = agent
    _after_config_change(service)
    return web.json_response(agent.public())


async def admin_trace(request: web.Request) -> web.Response:
    """Where one message went: the platform's push log for a message id."""
    _check_admin(request)
    service = request.app[SERVICE_KEY]
    message_id = _int_id(request)
    row = service.store.get_message(message_id)
    if row is None:
        raise _not_found("no such message")
    conv_row = service.store.db.execute(
        "SELECT id, shop, customer, ref, channel, skill_group, agent, state"
        " FROM conversations WHERE id=?", (row.conversation,)).fetchone()
    conv = service.conversations.get(row.conversation) or ConversationRow(*conv_row)
    status = row.status
    if status == "assigned" and message_id in service.state.push_log:
        status = "pushed"
    elif status == "assigned" and any(f[2]["id"] == message_id for f in service.paused):
        status = "paused"
    elif status == "assigned" and not service.agent_sessions.get((conv.shop, conv.agent or "")):
        status = "agent_not_connected"
    body: dict[str, Any] = {
        "id": row.id, "conversation": row.conversation, "direction": row.direction,
        "status": status, "reason": row.reason, "agent": row.agent, "accepted_ts": row.ts,
        "pushed_ts": service.state.push_log.get(message_id),
        "conversation_state": conv.state, "conversation_agent": conv.agent,
        "channel": conv.channel,
    }
    if status == "queued":
        body["queue_reasons"] = service.queue_reasons(conv)
    return web.json_response(body)


async def admin_close_conversation(request: web.Request) -> web.Response:
    _check_admin(request)
    service = request.app[SERVICE_KEY]
    conv = service.conversations.get(_int_id(request))
    if conv is None:
        raise _not_found("no open conversation with that id")
    close_conversation(service, conv)
    return web.json_response({"conversation": conv.id, "state": conv.state})


async def admin_transfer_conversation(request: web.Request) -> web.Response:
    _check_admin(request)
    service = request.app[SERVICE_KEY]
    conv = service.conversations.get(_int_id(request))
    body = await _json_object(request)
    if conv is None:
        raise _not_found("no open conversation with that id")
    target = body.get("agent")
    shop = service.shops[conv.shop]
    if not isinstance(target, str) or target not in shop.agents:
        raise _bad("'agent' must name an agent of the conversation's shop")
    if conv.agent is not None:
        key = (conv.shop, conv.agent)
        service.active[key] = max(0, service.active.get(key, 0) - 1)
    # An admin transfer is a forced assignment: no eligibility check, like a supervisor's.
    service.assign_and_flush(conv, shop.agents[target])
    return web.json_response({"conversation": conv.id, "agent": target})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "protocol": wire.PROTOCOL_VERSION})


def build_app(service: ChatService) -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app[SERVICE_KEY] = service
    app.router.add_get("/ws", websocket_handler)
    app.router.add_get("/healthz", health)
    app.router.add_get("/admin/stats", admin_stats)
    app.router.add_post("/admin/stats/reset", admin_reset_stats)
    app.router.add_get("/admin/faults", admin_get_faults)
    app.router.add_post("/admin/faults", admin_set_faults)
    app.router.add_get("/admin/shops/{shop}", admin_get_shop)
    app.router.add_patch("/admin/shops/{shop}", admin_patch_shop)
    app.router.add_put("/admin/shops/{shop}", admin_patch_shop)
    app.router.add_patch("/admin/shops/{shop}/agents/{agent}", admin_patch_agent)
    app.router.add_put("/admin/shops/{shop}/agents/{agent}", admin_patch_agent)
    app.router.add_get("/admin/messages/{id}", admin_trace)
    app.router.add_post("/admin/conversations/{id}/close", admin_close_conversation)
    app.router.add_post("/admin/conversations/{id}/transfer", admin_transfer_conversation)
    app[longpoll.CHANNELS_KEY] = {}
    app.add_routes(longpoll.routes(service, serve_channel))

    async def expire_long_polls() -> None:
        while True:
            await asyncio.sleep(longpoll.IDLE_CLOSE_S / 6)
            await longpoll.expire_idle(app)

    async def start_tick(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        service._tick_task = loop.create_task(service.tick())
        service._expiry_task = loop.create_task(expire_long_polls())

    async def stop_tick(app: web.Application) -> None:
        for task in (service._tick_task, service._expiry_task):
            if task is not None:
                task.cancel()
        for channel in list(app[longpoll.CHANNELS_KEY].values()):
            await channel.close()
        if service.background:
            await asyncio.wait(service.background, timeout=5)
        service.store.close()

    app.on_startup.append(start_tick)
    app.on_cleanup.append(stop_tick)
    return app
