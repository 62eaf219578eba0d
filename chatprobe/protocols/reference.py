"""Adapter for the reference chat protocol (docs/protocol.md) over `websockets` (asyncio).

Both sides share :class:`_Link`: one WebSocket with hello/welcome, a reader task, and
reconnect-with-resume. Unacked sends are resent after a reconnect with the same client id;
the service deduplicates them, so a reconnect creates neither loss nor duplicates.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson

from chatprobe.config import AgentCredential, TargetConfig
from chatprobe.diagnosis import AgentSelf, Cause
from chatprobe.errors import TargetError
from chatprobe.protocols import wire
from chatprobe.protocols.base import (
    Ack,
    AckSink,
    Adapter,
    AgentSession,
    Conversation,
    CustomerSession,
    Explanation,
    Frame,
    OnEvent,
    OnReceive,
    register,
)
from chatprobe.protocols.link import REPLY_MEMORY, RecentMap, ReconnectingLink, SeenIds
from chatprobe.protocols.websocket import MessageSocket

_loads = orjson.loads

LOGIN_ERRORS = {
    wire.ERR_AUTH_FAILED: Cause.AUTH_REJECTED,
    wire.ERR_SESSION_EXPIRED: Cause.SESSION_EXPIRED,
    wire.ERR_ACCOUNT_FROZEN: Cause.ACCOUNT_FROZEN,
    wire.ERR_UNKNOWN_SHOP: Cause.AUTH_REJECTED,
}

# The reference service's trace words -> causes (its queue reasons and message statuses).
QUEUE_REASONS = {
    "no_receive_permission": Cause.RECEIVE_PERMISSION,
    "role_read_only": Cause.WRONG_ROLE,
    "channel_not_permitted": Cause.CHANNEL_PERMISSION,
    "outside_business_hours": Cause.BUSINESS_HOURS,
    "presence_away": Cause.PRESENCE,
    "presence_offline": Cause.PRESENCE,
    "capacity_full": Cause.CAPACITY,
    "routing_rule": Cause.ROUTING_RULE,
    "skill_group_mismatch": Cause.ROUTING_RULE,
    "account_frozen": Cause.ACCOUNT_FROZEN,
    "account_banned": Cause.ACCOUNT_FROZEN,
    "not_connected": Cause.DISCONNECTED,
}
STATUSES = {
    "filtered": Cause.FILTERED,
    "push_disabled": Cause.PUSH_DISABLED,
    "dropped": Cause.PUSH_LOST,
    "paused": Cause.PUSH_STALLED,
    "client_too_old": Cause.CLIENT_VERSION,
    "conversation_closed": Cause.CONVERSATION_CLOSED,
    "agent_not_connected": Cause.DISCONNECTED,
}


def websocket_url(target_url: str) -> str:
    """http://host:port[/prefix] -> ws://host:port[/prefix]/ws; ws:// URLs are taken as is."""
    parts = urlsplit(target_url)
    if parts.scheme in ("ws", "wss"):
        return target_url
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws", "", ""))


def long_poll_url(target_url: str) -> str:
    """The long-polling fallback beside the WebSocket endpoint: .../ws -> .../lp (http)."""
    parts = urlsplit(websocket_url(target_url))
    scheme = "https" if parts.scheme == "wss" else "http"
    path = parts.path[:-len("/ws")] if parts.path.endswith("/ws") else parts.path
    return urlunsplit((scheme, parts.netloc, path.rstrip("/") + "/lp", "", ""))


class _Link(ReconnectingLink):
    """One reference-protocol client connection: hello/welcome, acks, resume by message id."""

    def __init__(self, adapter: ReferenceAdapter, hello: wire.Frame, on_receive: OnReceive,
                 on_event: OnEvent, conversation_of: RecentMap[str, int] | None = None) -> None:
        """``conversation_of``: an agent's memory of which conversation each message it
        received was in (message id -> conversation), for its replies."""
        super().__init__(adapter.ws_url, adapter.config, on_event,
                         fallback_url=long_poll_url(adapter.target_url))
        self.hello = hello
        self.on_receive = on_receive
        self.conversation_of = conversation_of
        self.keep_frames(adapter.frame_log_size)
        self.welcome: wire.Frame = {}
        self.last_id: int | None = None
        self.unacked: dict[str, wire.Frame] = {}
        # A resume may replay frames that were in flight; the harness must not count its own
        # reconnect as the platform duplicating messages.
        self.seen = SeenIds()

    async def handshake(self, ws: MessageSocket, resume: bool) -> None:
        hello = dict(self.hello)
        if resume and self.last_id is not None:
            hello["resume_after"] = self.last_id
        await ws.send(wire.encode(hello))
        try:
            frame = wire.decode(await self.recv_login(ws))
        except wire.ProtocolError as exc:
            raise TargetError(Cause.PROTOCOL, f"reply to hello: {exc}") from None
        if frame["type"] == "error":
            code = str(frame.get("code"))
            cause = LOGIN_ERRORS.get(code, Cause.PROTOCOL if code == wire.ERR_BAD_FRAME
                                     else Cause.AUTH_REJECTED)
            raise TargetError(cause, f"login refused: {code} ({frame.get('message', '')})")
        if frame["type"] != "welcome":
            raise TargetError(Cause.PROTOCOL, f"expected welcome, got {frame['type']!r}")
        self.welcome = frame
        if self.last_id is None and isinstance(frame.get("last_id"), int):
            # Nothing seen yet: a later resume must still replay what arrives from now on.
            self.last_id = frame["last_id"]
        # Resend what the service may never have received; it deduplicates by client id.
        for pending in list(self.unacked.values()):
            await ws.send(wire.encode(pending))

    def on_raw(self, raw: str | bytes) -> None:
        try:
            frame = wire.decode(raw)
        except wire.ProtocolError as exc:
            raise TargetError(Cause.PROTOCOL, f"bad frame from target: {exc}") from None
        self._on_frame(frame)

    def _dispatch(self, raw: str | bytes) -> None:
        # Every frame of every message passes here: a well-formed one is decoded once, inline,
        # and handled; anything odd (and frames kept as evidence) goes the generic way, to
        # on_raw and its one-line reason.
        if type(raw) is str and self.frames is None and self.dead is None:
            try:
                frame = _loads(raw)
            except orjson.JSONDecodeError:
                frame = None
            if type(frame) is dict and type(frame.get("type")) is str:
                self.guarded(self._on_frame, frame)
                return
        super()._dispatch(raw)

    def _on_frame(self, frame: wire.Frame) -> None:
        kind = frame["type"]
        if kind == "ack":
            self._on_ack_frame(frame)
            return
        if kind == "message":
            self._on_message_frame(frame)
            return
        if kind == "error":
            code = str(frame.get("code"))
            if code in LOGIN_ERRORS:
                raise TargetError(LOGIN_ERRORS[code], f"session ended by target: {code}")
            refusal = TargetError(Cause.NOT_ACCEPTED, f"{code}: {frame.get('message', '')}")
            key = str(frame.get("client_msg_id"))
            if self.refuse_ack(key, refusal):
                self.unacked.pop(key, None)
                return
            opening = self.other_futures.pop(("opened", str(frame.get("ref", ""))), None)
            if opening is not None:
                if not opening.done():
                    opening.set_exception(refusal)
                return
            self.on_event("error", f"{code}: {frame.get('message', '')}")
        waiter = self.other_futures.pop((kind, str(frame.get("ref", ""))), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(frame)

    def _on_ack_frame(self, frame: wire.Frame) -> None:
        key = str(frame.get("client_msg_id"))
        self.unacked.pop(key, None)
        if not self.settle_tagged(key, str(frame.get("id"))):
            self.resolve_ack(key, Ack(str(frame.get("id")), frame.get("ts")))

    def _on_message_frame(self, frame: wire.Frame) -> None:
        message_id = frame.get("id")
        if type(message_id) is int:
            if not self.seen.first_time(message_id):
                return
            if self.last_id is None or message_id > self.last_id:
                self.last_id = message_id
        text = frame.get("text")
        if type(text) is not str:
            return
        server_id = str(message_id)
        if self.conversation_of is not None:
            self.conversation_of.remember(server_id, frame.get("conversation", 0))
        self.on_receive(text, server_id)

    async def request(self, frame: wire.Frame, reply_type: str, ref: str) -> wire.Frame:
        answer: wire.Frame = await self.ask(wire.encode(frame), (reply_type, ref))
        return answer

    def send_frame_tagged(self, frame: wire.Frame, client_msg_id: str, tag: Any,
                          sink: AckSink) -> None:
        """As send_acked, its ack going to ``sink`` (see CustomerSession.send_tagged)."""
        if self.dead is None and not self.closing:
            self.unacked[client_msg_id] = frame
        self.send_tagged(wire.encode(frame), client_msg_id, tag, sink)

    def send_acked(self, frame: wire.Frame, client_msg_id: str) -> asyncio.Future[Ack]:
        """Send ``frame`` (or hold it for the resume while disconnected): its ack's future."""
        future = self.new_ack(client_msg_id)
        if self.dead is None:
            self.unacked[client_msg_id] = frame
            self.write_or_hold_now(wire.encode(frame))
        return future


class _ReferenceCustomer(CustomerSession):
    def __init__(self, link: _Link) -> None:
        self.link = link

    @property
    def failure(self) -> TargetError | None:
        return self.link.dead

    async def open_conversation(self, ref: str, channel: str) -> Conversation:
        frame = await self.link.request({"type": "open", "ref": ref, "channel": channel},
                                        "opened", ref)
        agent = frame.get("agent")
        return Conversation(str(frame.get("conversation")), str(frame.get("state")),
                            agent if isinstance(agent, str) else None)

    async def send(self, conversation: str, client_msg_id: str,
                   text: str) -> asyncio.Future[Ack]:
        return self.send_soon(conversation, client_msg_id, text)

    def send_soon(self, conversation: str, client_msg_id: str,
                  text: str) -> asyncio.Future[Ack]:
        frame = {"type": "send", "conversation": int(conversation),
                 "client_msg_id": client_msg_id, "text": text}
        return self.link.send_acked(frame, client_msg_id)

    def send_tagged(self, conversation: str, client_msg_id: str, text: str, tag: Any,
                    sink: AckSink) -> bool:
        self.link.send_frame_tagged({"type": "send", "conversation": int(conversation),
                                     "client_msg_id": client_msg_id, "text": text},
                                    client_msg_id, tag, sink)
        return True

    def drop_connection(self) -> bool:
        self.link.drop()
        return True

    def recent_frames(self) -> list[Frame]:
        return list(self.link.frames or ())

    async def close_conversation(self, conversation: str) -> None:
        await self.link.write_or_hold(wire.encode({"type": "close",
                                                   "conversation": int(conversation)}))

    async def close(self) -> None:
        await self.link.close()


class _ReferenceAgent(AgentSession):
    def __init__(self, link: _Link, conversation_of: dict[str, int],
                 profile: AgentSelf) -> None:
        self.link = link
        self.profile = profile
        self.conversation_of = conversation_of

    @property
    def failure(self) -> TargetError | None:
        return self.link.dead

    async def reply(self, conversation: str, client_msg_id: str,
                    text: str) -> asyncio.Future[Ack]:
        return self._reply(conversation, client_msg_id, text)

    def _reply(self, conversation: str | int, client_msg_id: str,
               text: str) -> asyncio.Future[Ack]:
        frame = {"type": "reply", "conversation": int(conversation),
                 "client_msg_id": client_msg_id, "text": text}
        return self.link.send_acked(frame, client_msg_id)

    async def reply_to(self, server_id: str, client_msg_id: str,
                       text: str) -> asyncio.Future[Ack] | None:
        conversation = self.conversation_of.get(server_id)
        if conversation is None:
            return None
        return self._reply(conversation, client_msg_id, text)

    def reply_to_soon(self, server_id: str, client_msg_id: str,
                      text: str) -> asyncio.Future[Ack] | None:
        conversation = self.conversation_of.get(server_id)
        if conversation is None:
            return None
        return self._reply(conversation, client_msg_id, text)

    def reply_tagged(self, server_id: str, client_msg_id: str, text: str, tag: Any,
                     sink: AckSink) -> bool | None:
        conversation = self.conversation_of.get(server_id)
        if conversation is None:
            return None
        self.link.send_frame_tagged({"type": "reply", "conversation": int(conversation),
                                     "client_msg_id": client_msg_id, "text": text},
                                    client_msg_id, tag, sink)
        return True

    def recent_frames(self) -> list[Frame]:
        return list(self.link.frames or ())

    async def close(self) -> None:
        await self.link.close()


@register
class ReferenceAdapter(Adapter):
    name = "reference"

    def __init__(self, target_url: str, config: TargetConfig) -> None:
        super().__init__(target_url, config)
        self.ws_url = websocket_url(target_url)
        parts = urlsplit(target_url)
        path = parts.path.rstrip("/")
        if parts.scheme in ("ws", "wss") and path.endswith("/ws"):
            path = path[: -len("/ws")]
        self.http_base = urlunsplit(("https" if parts.scheme in ("https", "wss") else "http",
                                     parts.netloc, path, "", ""))
        self._http: aiohttp.ClientSession | None = None

    async def connect_customer(self, customer_id: str, on_receive: OnReceive,
                               on_event: OnEvent) -> CustomerSession:
        hello = {"type": "hello", "role": "customer", "shop": self.config.shop,
                 "customer": customer_id, "client_version": self.config.client_version}
        link = _Link(self, hello, on_receive, on_event)
        await link.start()
        return _ReferenceCustomer(link)

    async def login_agent(self, credential: AgentCredential, on_receive: OnReceive,
                          on_event: OnEvent) -> AgentSession:
        hello = {"type": "hello", "role": "agent", "shop": self.config.shop,
                 "agent": credential.id, "token": credential.token,
                 "client_version": self.config.client_version}
        conversation_of: RecentMap[str, int] = RecentMap(REPLY_MEMORY)
        link = _Link(self, hello, on_receive, on_event, conversation_of)
        await link.start()
        profile: dict[str, Any] = link.welcome.get("profile") or {}
        if not isinstance(profile, dict):
            await link.close()
            raise TargetError(Cause.PROTOCOL, "welcome 'profile' is not an object")
        return _ReferenceAgent(link, conversation_of, AgentSelf(
            agent=credential.id,
            role=str(profile.get("role", "customer_service")),
            receive_messages=bool(profile.get("receive_messages", True)),
            channels=frozenset(profile.get("channels") or ()),
            presence=str(profile.get("presence", "online")),
            within_hours=bool(profile.get("within_hours", True)),
            client_supported=bool(link.welcome.get("client_supported", True)),
        ))

    async def explain(self, server_id: str, probe_agents: frozenset[str]) -> Explanation | None:
        token = self.config.admin_token
        if not token:
            return None
        if self._http is None:
            tls = self.config.tls_context() if self.http_base.startswith("https:") else None
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5),
                                               connector=aiohttp.TCPConnector(ssl=tls or True))
        try:
            server_hostname = (self.config.tls_server_name
                               if self.http_base.startswith("https:") else None)
            async with self._http.get(f"{self.http_base}/admin/messages/{server_id}",
                                      headers={"Authorization": f"Bearer {token}"},
                                      server_hostname=server_hostname) as response:
                if response.status != 200:
                    return None
                trace = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        if not isinstance(trace, dict):
            return None
        return explain_trace(trace, probe_agents)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()


def explain_trace(trace: dict[str, Any], probe_agents: frozenset[str]) -> Explanation:
    """Map the reference service's message trace to a cause (pure)."""
    status = str(trace.get("status"))
    hops: dict[str, float | str | None] = {
        "status": status, "accepted_ts": trace.get("accepted_ts"),
        "pushed_ts": trace.get("pushed_ts"), "agent": trace.get("agent")}
    routed_to = trace.get("conversation_agent") or trace.get("agent")
    if (status in ("assigned", "pushed", "agent_not_connected") and routed_to
            and routed_to not in probe_agents):
        return Explanation(Cause.ROUTING_RULE, f"routed to {routed_to}, not a probe agent", hops)
    if status in STATUSES:
        return Explanation(STATUSES[status], str(trace.get("reason") or status), hops)
    if status == "queued":
        reasons = trace.get("queue_reasons") or {}
        for agent in sorted(probe_agents):
            reason = reasons.get(agent) if isinstance(reasons, dict) else None
            if reason in QUEUE_REASONS:
                return Explanation(QUEUE_REASONS[reason], f"queued; {agent}: {reason}", hops)
        return Explanation(None, "queued", hops)
    return Explanation(None, status, hops)


__all__ = ["ReferenceAdapter", "explain_trace", "websocket_url"]
