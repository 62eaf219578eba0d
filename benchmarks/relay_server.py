"""A lean relay speaking the reference chat protocol, for bench_swarm.py (not a service).

The benchmark measures the generator, so its target must not be the bottleneck, just as the
plain locustfile's echo server is not: this relay does what docs/protocol.md says a message
takes (hello/welcome, open -> status + opened + assigned, send -> message to the agent + ack,
reply -> ack + message to the customer, close -> closed, ping -> pong) with no storage, no
routing rules and no admin API. Conversations go round-robin to the connected agents.
It runs on picows (WebSocket framing in compiled code) and uvloop, as the echo server of
the baseline does, so neither side of the ratio is held back by its server.

    python benchmarks/relay_server.py PORT
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import deque
from typing import Any

import orjson
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

dumps, loads = orjson.dumps, orjson.loads
TEXT = WSMsgType.TEXT
IDS = itertools.count(1)
REPLAY = 200  # pushed frames kept per session for a client that resumes after a drop


class Session:
    """What the relay keeps of a named customer or agent across its reconnects."""

    __slots__ = ("accepted", "pushed", "ws")

    def __init__(self) -> None:
        self.ws: WSTransport | None = None
        self.pushed: deque[tuple[int, bytes]] = deque(maxlen=REPLAY)
        # client_msg_id -> message id: a send resent after a reconnect is acked again, once.
        self.accepted: dict[str, int] = {}

    def accept(self, client_msg_id: str) -> tuple[int, bool]:
        known = self.accepted.get(client_msg_id)
        if known is not None:
            return known, False
        message_id = next(IDS)
        self.accepted[client_msg_id] = message_id
        if len(self.accepted) > REPLAY:
            del self.accepted[next(iter(self.accepted))]
        return message_id, True

    def push(self, message_id: int, frame: dict[str, Any]) -> None:
        data = dumps(frame)
        self.pushed.append((message_id, data))
        # Not connected (a mobile drop): the client resumes and gets it replayed.
        if self.ws is not None:
            self.ws.send(TEXT, data)


class Relay:
    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.agents: list[str] = []
        self.next_agent = 0
        self.conversations: dict[int, tuple[str, str]] = {}  # id -> (customer, agent)

    def session(self, key: str) -> Session:
        found = self.sessions.get(key)
        if found is None:
            found = self.sessions[key] = Session()
        return found


class Connection(WSListener):
    """One client's WebSocket: frames are handled as they arrive, answers written at once."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.me: Session | None = None
        self.name = ""

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.me is not None and self.me.ws is transport:
            self.me.ws = None

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not TEXT:
            if frame.msg_type is WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()
            return  # pings are answered by picows itself
        message: dict[str, Any] = loads(frame.get_payload_as_bytes())
        kind = message.get("type")
        if kind == "send" and self.me is not None:
            self.relay_send(transport, self.me, message)
        elif kind == "reply" and self.me is not None:
            self.relay_reply(transport, self.me, message)
        elif kind == "open":
            self.open(transport, message)
        elif kind == "close":
            self.relay.conversations.pop(message["conversation"], None)
            transport.send(TEXT, dumps({"type": "closed",
                                        "conversation": message["conversation"]}))
        elif kind == "ping":
            transport.send(TEXT, dumps({"type": "pong", "server_time": time.time(),
                                        "echo": message.get("echo")}))
        elif kind == "hello":
            self.hello(transport, message)

    def hello(self, transport: WSTransport, message: dict[str, Any]) -> None:
        role = message["role"]
        self.name = message.get("agent") or message.get("customer", "")
        me = self.me = self.relay.session(f"{role}:{self.name}")
        me.ws = transport
        welcome: dict[str, Any] = {"type": "welcome", "role": role, "server_time": time.time(),
                                   "protocol": 1, "client_supported": True, "last_id": 0}
        if role == "agent":
            welcome["profile"] = {"role": "customer_service", "presence": "online"}
            if self.name not in self.relay.agents:
                self.relay.agents.append(self.name)
        transport.send(TEXT, dumps(welcome))
        after = message.get("resume_after")
        if isinstance(after, int):
            for message_id, data in list(me.pushed):
                if message_id > after:
                    transport.send(TEXT, data)

    def open(self, transport: WSTransport, message: dict[str, Any]) -> None:
        relay = self.relay
        conversation = next(IDS)
        if not relay.agents:
            transport.send(TEXT, dumps({"type": "opened", "ref": message["ref"],
                                        "conversation": conversation, "state": "queued"}))
            return
        agent = relay.agents[relay.next_agent % len(relay.agents)]
        relay.next_agent += 1
        relay.conversations[conversation] = (self.name, agent)
        channel = message.get("channel", "web")
        transport.send(TEXT, dumps({"type": "status", "conversation": conversation,
                                    "state": "assigned", "agent": agent}))
        transport.send(TEXT, dumps({"type": "opened", "ref": message["ref"],
                                    "conversation": conversation, "state": "assigned",
                                    "agent": agent, "channel": channel}))
        agent_ws = relay.session(f"agent:{agent}").ws
        if agent_ws is not None:
            agent_ws.send(TEXT, dumps({"type": "assigned", "conversation": conversation,
                                       "customer": self.name, "channel": channel}))

    def relay_send(self, transport: WSTransport, me: Session, message: dict[str, Any]) -> None:
        conversation = message["conversation"]
        client_msg_id = message["client_msg_id"]
        message_id, new = me.accept(client_msg_id)
        now = time.time()
        route = self.relay.conversations.get(conversation)
        if route is not None and new:
            self.relay.session(f"agent:{route[1]}").push(message_id, {
                "type": "message", "id": message_id, "conversation": conversation,
                "customer": self.name, "text": message["text"], "ts": now})
        transport.send(TEXT, dumps({"type": "ack", "client_msg_id": client_msg_id,
                                    "id": message_id, "conversation": conversation, "ts": now}))

    def relay_reply(self, transport: WSTransport, me: Session, message: dict[str, Any]) -> None:
        conversation = message["conversation"]
        client_msg_id = message["client_msg_id"]
        route = self.relay.conversations.get(conversation)
        if route is None or route[1] != self.name:
            # As the service answers a reply to a closed or someone else's conversation: a
            # harness that replies there must see it here too, not a silent ack.
            transport.send(TEXT, dumps({"type": "error", "code": "not_your_conversation",
                                        "message": "not your conversation",
                                        "client_msg_id": client_msg_id}))
            return
        message_id, new = me.accept(client_msg_id)
        now = time.time()
        transport.send(TEXT, dumps({"type": "ack", "client_msg_id": client_msg_id,
                                    "id": message_id, "conversation": conversation, "ts": now}))
        if new:
            self.relay.session(f"customer:{route[0]}").push(message_id, {
                "type": "message", "id": message_id, "conversation": conversation,
                "from": "agent", "agent": self.name, "text": message["text"], "ts": now})


async def serve(port: int) -> None:
    relay = Relay()

    def accept(request: WSUpgradeRequest) -> Connection:
        return Connection(relay)

    server = await ws_create_server(accept, "127.0.0.1", port)
    await server.serve_forever()


def main() -> None:
    uvloop.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
