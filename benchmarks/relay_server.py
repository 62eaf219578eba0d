"""A lean relay speaking the reference chat protocol, for bench_swarm.py (not a service).

The benchmark measures the generator, so its target must not be the bottleneck, just as the
plain locustfile's echo server is not: this relay does what docs/protocol.md says a message
takes (hello/welcome, open -> status + opened + assigned, send -> message to the agent + ack,
reply -> ack + message to the customer, close -> closed, ping -> pong) with no storage, no
routing rules and no admin API. Conversations go round-robin to the connected agents.

    python benchmarks/relay_server.py PORT
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from collections import deque
from typing import Any

import orjson
from aiohttp import WSMsgType, web

dumps, loads = orjson.dumps, orjson.loads


async def send(ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
    await ws.send_str(dumps(frame).decode())


IDS = itertools.count(1)
REPLAY = 200  # pushed frames kept per session for a client that resumes after a drop


class Session:
    """What the relay keeps of a named customer or agent across its reconnects."""

    def __init__(self) -> None:
        self.ws: web.WebSocketResponse | None = None
        self.pushed: deque[tuple[int, str]] = deque(maxlen=REPLAY)
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

    async def push(self, message_id: int, frame: dict[str, Any]) -> None:
        text = dumps(frame).decode()
        self.pushed.append((message_id, text))
        if self.ws is not None and not self.ws.closed:
            # A socket closing under us: the client resumes and gets it replayed.
            with contextlib.suppress(ConnectionError):
                await self.ws.send_str(text)


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

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        me: Session | None = None
        name = ""
        try:
            async for message in ws:
                if message.type != WSMsgType.TEXT:
                    continue
                frame: dict[str, Any] = loads(message.data)
                kind = frame.get("type")
                if kind == "send" and me is not None:
                    await self.relay_send(ws, me, frame, name)
                elif kind == "reply" and me is not None:
                    await self.relay_reply(ws, me, frame, name)
                elif kind == "open":
                    await self.open(ws, frame, name)
                elif kind == "close":
                    self.conversations.pop(frame["conversation"], None)
                    await send(ws, {"type": "closed", "conversation": frame["conversation"]})
                elif kind == "ping":
                    await send(ws, {"type": "pong", "server_time": time.time(),
                                    "echo": frame.get("echo")})
                elif kind == "hello":
                    role = frame["role"]
                    name = frame.get("agent") or frame.get("customer", "")
                    me = self.session(f"{role}:{name}")
                    me.ws = ws
                    welcome: dict[str, Any] = {"type": "welcome", "role": role,
                                               "server_time": time.time(), "protocol": 1,
                                               "client_supported": True, "last_id": 0}
                    if role == "agent":
                        welcome["profile"] = {"role": "customer_service", "presence": "online"}
                        if name not in self.agents:
                            self.agents.append(name)
                    await send(ws, welcome)
                    after = frame.get("resume_after")
                    if isinstance(after, int):
                        for message_id, text in list(me.pushed):
                            if message_id > after:
                                await ws.send_str(text)
        finally:
            if me is not None and me.ws is ws:
                me.ws = None
        return ws

    async def open(self, ws: web.WebSocketResponse, frame: dict[str, Any], customer: str) -> None:
        conversation = next(IDS)
        if not self.agents:
            await send(ws, {"type": "opened", "ref": frame["ref"],
                            "conversation": conversation, "state": "queued"})
            return
        agent = self.agents[self.next_agent % len(self.agents)]
        self.next_agent += 1
        self.conversations[conversation] = (customer, agent)
        channel = frame.get("channel", "web")
        await send(ws, {"type": "status", "conversation": conversation,
                        "state": "assigned", "agent": agent})
        await send(ws, {"type": "opened", "ref": frame["ref"], "conversation": conversation,
                        "state": "assigned", "agent": agent, "channel": channel})
        agent_ws = self.session(f"agent:{agent}").ws
        if agent_ws is not None:
            with contextlib.suppress(ConnectionError):
                await send(agent_ws, {"type": "assigned", "conversation": conversation,
                                      "customer": customer, "channel": channel})

    async def relay_send(self, ws: web.WebSocketResponse, me: Session, frame: dict[str, Any],
                         customer: str) -> None:
        conversation = frame["conversation"]
        message_id, new = me.accept(frame["client_msg_id"])
        now = time.time()
        route = self.conversations.get(conversation)
        if route is not None and new:
            await self.session(f"agent:{route[1]}").push(message_id, {
                "type": "message", "id": message_id, "conversation": conversation,
                "customer": customer, "text": frame["text"], "ts": now})
        await send(ws, {"type": "ack", "client_msg_id": frame["client_msg_id"],
                        "id": message_id, "conversation": conversation, "ts": now})

    async def relay_reply(self, ws: web.WebSocketResponse, me: Session, frame: dict[str, Any],
                          agent: str) -> None:
        conversation = frame["conversation"]
        message_id, new = me.accept(frame["client_msg_id"])
        now = time.time()
        await send(ws, {"type": "ack", "client_msg_id": frame["client_msg_id"],
                        "id": message_id, "conversation": conversation, "ts": now})
        route = self.conversations.get(conversation)
        if route is not None and new:
            await self.session(f"customer:{route[0]}").push(message_id, {
                "type": "message", "id": message_id, "conversation": conversation,
                "from": "agent", "agent": agent, "text": frame["text"], "ts": now})


def main() -> None:
    relay = Relay()
    app = web.Application()
    app.router.add_get("/ws", relay.handle)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
