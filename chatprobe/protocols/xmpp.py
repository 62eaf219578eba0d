"""Adapter for XMPP over WebSocket (RFC 7395): customers and agents are XMPP accounts.

Written against the RFCs, not a server: framing `<open/>`/`<close/>` (RFC 7395), SASL PLAIN
(RFC 4616), resource binding (RFC 6120), presence, one-to-one `<message type="chat">` with
the stamp in `<body>`. When the server offers Stream Management (XEP-0198), a message's ack
is the server's `<a h=.../>` counting it as handled; without it, an ack only means "written".

XMPP has no conversations or routing: a probe "conversation" is a customer writing to one
agent account, chosen round-robin from the target config. Target config ``extra``:

    domain: localhost                 # XMPP domain (default: the URL's host)
    websocket_path: /xmpp-websocket   # appended to the target URL unless it is ws://...
    customers: {prefix: customer, count: 20, password: secret}   # pre-registered accounts
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from xml.sax.saxutils import escape, quoteattr

from websockets.exceptions import ConnectionClosed

from chatprobe.config import AgentCredential, TargetConfig
from chatprobe.diagnosis import AgentSelf, Cause
from chatprobe.errors import TargetError
from chatprobe.protocols.accounts import AccountPool
from chatprobe.protocols.base import (
    Ack,
    Adapter,
    AgentSession,
    Conversation,
    CustomerSession,
    OnEvent,
    OnReceive,
    register,
)
from chatprobe.protocols.link import REPLY_MEMORY, RecentMap, ReconnectingLink, SeenIds
from chatprobe.protocols.websocket import MessageSocket

NS_FRAMING = "urn:ietf:params:xml:ns:xmpp-framing"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_SM = "urn:xmpp:sm:3"
NS_CLIENT = "jabber:client"
NS_STREAMS = "http://etherx.jabber.org/streams"
NS_PING = "urn:xmpp:ping"
STANZAS = ("message", "presence", "iq")


def _tag(ns: str, name: str) -> str:
    return f"{{{ns}}}{name}"


def parse_frame(raw: str | bytes) -> ET.Element:
    """One RFC 7395 frame is one complete XML element."""
    if isinstance(raw, bytes):
        raise TargetError(Cause.PROTOCOL, "binary frame on an XMPP WebSocket")
    try:
        return ET.fromstring(raw)
    except ET.ParseError as exc:
        raise TargetError(Cause.PROTOCOL, f"frame is not XML: {exc}") from None


def _local(element: ET.Element) -> str:
    return element.tag.rsplit("}", 1)[-1]


def _namespace(element: ET.Element) -> str:
    return element.tag[1:].split("}", 1)[0] if element.tag.startswith("{") else ""


def _error_condition(element: ET.Element) -> str:
    for child in element.iter():
        if child is not element and _namespace(child) in (
                "urn:ietf:params:xml:ns:xmpp-stanzas", "urn:ietf:params:xml:ns:xmpp-streams",
                NS_SASL) and _local(child) != "text":
            return _local(child)
    return "unknown"


class _XmppLink(ReconnectingLink):
    def __init__(self, adapter: XmppAdapter, user: str, password: str, on_receive: OnReceive,
                 on_event: OnEvent, resource: str = "chatprobe") -> None:
        super().__init__(adapter.ws_url, adapter.config, on_event, subprotocols=["xmpp"])
        self.domain = adapter.domain
        self.user = user
        self.password = password
        self.on_receive = on_receive
        self.jid = f"{user}@{self.domain}"
        self.resource = resource
        self.stream_management = False
        self.handled_in = 0  # stanzas received since <enable/>, for our <a h=.../>
        self.sent_out = 0  # stanzas sent since <enable/>, which the server's h counts
        self.index_to_id: dict[int, str] = {}
        self.unacked: dict[str, str] = {}  # client id -> stanza, in send order
        self.seen = SeenIds()
        # Message id -> full JID, to answer it.
        self.sender_of: RecentMap[str, str] = RecentMap(REPLY_MEMORY)
        self._tasks: set[asyncio.Task[None]] = set()

    def _open_element(self) -> str:
        return f"<open xmlns='{NS_FRAMING}' to={quoteattr(self.domain)} version='1.0'/>"

    async def _expect(self, ws: MessageSocket, ns: str, *names: str) -> ET.Element:
        element = parse_frame(await self.recv_login(ws))
        if _namespace(element) == NS_STREAMS and _local(element) == "error":
            raise TargetError(Cause.PROTOCOL, f"stream error: {_error_condition(element)}")
        if _namespace(element) != ns or _local(element) not in names:
            raise TargetError(Cause.PROTOCOL, f"expected {'/'.join(names)}, got "
                                              f"{element.tag}")
        return element

    async def handshake(self, ws: MessageSocket, resume: bool) -> None:
        await ws.send(self._open_element())
        await self._expect(ws, NS_FRAMING, "open")
        features = await self._expect(ws, NS_STREAMS, "features")
        mechanisms = {m.text for m in features.iter(_tag(NS_SASL, "mechanism"))}
        if "PLAIN" not in mechanisms:
            raise TargetError(Cause.PROTOCOL, "server does not offer SASL PLAIN "
                                              f"(offers {', '.join(sorted(map(str, mechanisms)))})")
        token = base64.b64encode(f"\0{self.user}\0{self.password}".encode()).decode()
        await ws.send(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{token}</auth>")
        outcome = await self._expect(ws, NS_SASL, "success", "failure")
        if _local(outcome) == "failure":
            raise TargetError(Cause.AUTH_REJECTED,
                              f"SASL refused {self.jid}: {_error_condition(outcome)}")
        await ws.send(self._open_element())
        await self._expect(ws, NS_FRAMING, "open")
        features = await self._expect(ws, NS_STREAMS, "features")
        await ws.send(f"<iq xmlns='{NS_CLIENT}' type='set' id='bind'><bind xmlns='{NS_BIND}'>"
                      f"<resource>{escape(self.resource)}</resource></bind></iq>")
        bound = await self._expect(ws, NS_CLIENT, "iq")
        if bound.get("type") != "result":
            raise TargetError(Cause.AUTH_REJECTED, f"bind refused: {_error_condition(bound)}")
        jid = bound.find(f"{_tag(NS_BIND, 'bind')}/{_tag(NS_BIND, 'jid')}")
        full_jid = jid.text if jid is not None and jid.text else f"{self.jid}/{self.resource}"
        self.stream_management = features.find(_tag(NS_SM, "sm")) is not None
        self.handled_in = self.sent_out = 0
        self.index_to_id.clear()
        self.ws = ws  # the writes below go through the counting path
        if self.stream_management:
            await ws.send(f"<enable xmlns='{NS_SM}'/>")
            enabled = await self._expect(ws, NS_SM, "enabled", "failed")
            self.stream_management = _local(enabled) == "enabled"
        await self._send_stanza(ws, f"<presence xmlns='{NS_CLIENT}'/>")
        # Messages sent to an account before its presence is echoed bounce (seen on Prosody).
        while True:
            element = parse_frame(await self.recv_login(ws))
            if _local(element) == "presence" and element.get("from") == full_jid:
                self.handled_in += 1
                break
            self._handle(element)
        if resume:
            for client_id, stanza in list(self.unacked.items()):
                await self._send_stanza(ws, stanza, client_id)

    async def _send_stanza(self, ws: MessageSocket, stanza: str,
                           client_id: str | None = None) -> None:
        if self.stream_management:
            self.sent_out += 1
            if client_id is not None:
                self.index_to_id[self.sent_out] = client_id
            await ws.send(stanza)
            if client_id is not None:
                await ws.send(f"<r xmlns='{NS_SM}'/>")
        else:
            await ws.send(stanza)
            if client_id is not None:
                # No acks in this stream: "written" is all we can know.
                self.unacked.pop(client_id, None)
                self.resolve_ack(client_id, Ack(client_id, None))

    def on_raw(self, raw: str | bytes) -> None:
        self._handle(parse_frame(raw))

    def _later(self, text: str) -> None:
        ws = self.ws
        if ws is None:
            return

        async def send() -> None:
            await self._send_stanza(ws, text) if text.startswith("<iq") else await ws.send(text)

        task = asyncio.get_running_loop().create_task(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _handle(self, element: ET.Element) -> None:
        name, ns = _local(element), _namespace(element)
        if ns == NS_SM:
            if name == "r":
                self._later(f"<a xmlns='{NS_SM}' h='{self.handled_in}'/>")
            elif name == "a":
                self._acked_up_to(int(element.get("h", "0")))
            return
        if ns == NS_STREAMS and name == "error":
            condition = _error_condition(element)
            if condition in ("conflict", "not-authorized", "policy-violation"):
                # Retrying would fight another session or be refused again.
                raise TargetError(Cause.DISCONNECTED, f"stream error: {condition}")
            # e.g. system-shutdown: the server closes the socket next and we reconnect.
            self.on_event("error", f"stream error: {condition}")
            return
        if ns != NS_CLIENT or name not in STANZAS:
            return  # <close/> and other framing: the socket close that follows says it all
        self.handled_in += 1
        if name == "iq" and element.get("type") == "get":
            kind = "result" if element.find(_tag(NS_PING, "ping")) is not None else "error"
            self._later(f"<iq xmlns='{NS_CLIENT}' type='{kind}' "
                        f"id={quoteattr(element.get('id', ''))} "
                        f"to={quoteattr(element.get('from', self.domain))}/>")
        elif name == "message":
            self._message(element)

    def _message(self, element: ET.Element) -> None:
        client_id = element.get("id", "")
        if element.get("type") == "error":
            error = TargetError(Cause.NOT_ACCEPTED,
                                f"message bounced: {_error_condition(element)}")
            self.unacked.pop(client_id, None)
            if not self.refuse_ack(client_id, error):
                self.on_event("error", str(error))
            return
        body = element.find(_tag(NS_CLIENT, "body"))
        if body is None or body.text is None:
            return  # chat states, receipts: not a message to count
        sender = element.get("from", "").split("/", 1)[0]
        if client_id and not self.seen.first_time((sender, client_id)):
            return  # resent by a reconnecting client after the original got through
        if client_id:
            # The full JID: accounts are shared, so the bare JID could reach another session.
            self.sender_of.remember(client_id, element.get("from", sender))
        self.on_receive(body.text, client_id or None)

    def _acked_up_to(self, handled: int) -> None:
        for index in [i for i in self.index_to_id if i <= handled]:
            client_id = self.index_to_id.pop(index)
            self.unacked.pop(client_id, None)
            self.resolve_ack(client_id, Ack(client_id, None))

    async def send_message(self, to: str, client_id: str, text: str) -> asyncio.Future[Ack]:
        future = self.new_ack(client_id)
        if self.dead is not None:
            return future
        stanza = (f"<message xmlns='{NS_CLIENT}' to={quoteattr(to)} type='chat' "
                  f"id={quoteattr(client_id)}><body>{escape(text)}</body></message>")
        self.unacked[client_id] = stanza
        ws = self.ws
        assert ws is not None
        with contextlib.suppress(ConnectionClosed, OSError):
            # Disconnected: the stanza waits in `unacked`; handshake(resume=True) resends it.
            await self._send_stanza(ws, stanza, client_id)
        return future

    async def goodbye(self, ws: MessageSocket) -> None:
        # Without it ejabberd holds the socket ~10 s before closing.
        await ws.send(f"<close xmlns='{NS_FRAMING}'/>")


class _XmppCustomer(CustomerSession):
    def __init__(self, link: _XmppLink, agents: Iterator[tuple[str, str]]) -> None:
        self.link = link
        self.agents = agents

    @property
    def failure(self) -> TargetError | None:
        return self.link.dead

    def drop_connection(self) -> bool:
        self.link.drop()
        return True

    async def open_conversation(self, ref: str, channel: str) -> Conversation:
        agent_jid, agent_id = next(self.agents)
        return Conversation(agent_jid, "open", agent_id)

    async def send(self, conversation: str, client_msg_id: str,
                   text: str) -> asyncio.Future[Ack]:
        return await self.link.send_message(conversation, client_msg_id, text)

    async def close(self) -> None:
        await self.link.close()


class _XmppAgent(AgentSession):
    def __init__(self, link: _XmppLink, agent_id: str) -> None:
        self.link = link
        self.profile = AgentSelf(agent=agent_id)  # XMPP shows no routing settings

    @property
    def failure(self) -> TargetError | None:
        return self.link.dead

    async def reply(self, conversation: str, client_msg_id: str,
                    text: str) -> asyncio.Future[Ack]:
        return await self.link.send_message(conversation, client_msg_id, text)

    async def reply_to(self, server_id: str, client_msg_id: str,
                       text: str) -> asyncio.Future[Ack] | None:
        sender = self.link.sender_of.get(server_id)
        if sender is None:
            return None
        return await self.link.send_message(sender, client_msg_id, text)

    async def close(self) -> None:
        await self.link.close()


@register
class XmppAdapter(Adapter):
    name = "xmpp"

    def __init__(self, target_url: str, config: TargetConfig) -> None:
        super().__init__(target_url, config)
        extra: dict[str, Any] = config.extra
        parts = urlsplit(target_url)
        self.domain = str(extra.get("domain") or parts.hostname or "localhost")
        if parts.scheme in ("ws", "wss"):
            self.ws_url = target_url
        else:
            path = parts.path.rstrip("/") + str(extra.get("websocket_path", "/xmpp-websocket"))
            self.ws_url = urlunsplit(("wss" if parts.scheme == "https" else "ws", parts.netloc,
                                      path, "", ""))
        self.customers = AccountPool.from_extra(extra, "xmpp")
        self._agent_cycle = itertools.cycle(
            [(a.id if "@" in a.id else f"{a.id}@{self.domain}", a.id) for a in config.agents])

    async def connect_customer(self, customer_id: str, on_receive: OnReceive,
                               on_event: OnEvent) -> CustomerSession:
        # Accounts are shared: each connection binds its own resource, so sessions never
        # collide.
        number, account = self.customers.take()
        resource = "".join(ch for ch in customer_id if ch.isalnum() or ch in "-_")[:60]
        link = _XmppLink(self, account, self.customers.password, on_receive, on_event,
                         resource=resource or f"c{number}")
        await link.start()
        return _XmppCustomer(link, self._agent_cycle)

    async def login_agent(self, credential: AgentCredential, on_receive: OnReceive,
                          on_event: OnEvent) -> AgentSession:
        user = credential.id.split("@", 1)[0]
        link = _XmppLink(self, user, credential.token, on_receive, on_event)
        await link.start()
        return _XmppAgent(link, credential.id)
