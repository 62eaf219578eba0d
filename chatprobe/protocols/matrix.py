"""Adapter for Matrix (client-server API v3): HTTP sends and long-poll `/sync`, no WebSocket.

It proves the adapter interface is not WebSocket-only: many platforms push to agents by
long-poll or webhook. Mapping: each probe conversation is a private room the customer creates
with one agent invited (round-robin); the agent's sync loop joins invites. A message is
`PUT /rooms/{room}/send/m.room.message/{txn}` whose `event_id` is the ack (the client id is the
transaction id, so a resend after a network error is idempotent); it is received when it shows
up in the agent's `/sync` timeline. Target config ``extra``:

    customers: {prefix: customer, count: 20, password: secret}   # pre-registered accounts
    sync_timeout_ms: 10000                                        # long-poll length
    sync_timeline_limit: 1000                                     # events per room per sync

A `/sync` returns at most the filter's timeline limit of new events per room (Synapse's
default is 10) and marks the room `limited` when it skipped older ones: a busy room or a slow
server would turn into false loss. The adapter asks for `sync_timeline_limit` events per room
and reports a room that is still `limited` as a connection event, so a gap is the harness's
and named, not the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import ssl
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from chatprobe.config import AgentCredential, TargetConfig
from chatprobe.diagnosis import AgentSelf, Cause
from chatprobe.errors import HarnessError, TargetError
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
from chatprobe.protocols.link import PERMANENT, REPLY_MEMORY, RecentMap, SeenIds, tls_error

API = "/_matrix/client/v3"


class _Client:
    """One logged-in Matrix user: HTTP calls, a sync loop, and an ordered send queue."""

    def __init__(self, adapter: MatrixAdapter, user: str, password: str,
                 on_receive: OnReceive, on_event: OnEvent, auto_join: bool) -> None:
        self.adapter = adapter
        self.config = adapter.config
        self.user = user
        self.password = password
        self.on_receive = on_receive
        self.on_event = on_event
        self.auto_join = auto_join
        # https: the target config's CA bundle and client certificate, verification on.
        self.http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout_s),
            connector=aiohttp.TCPConnector(ssl=adapter.tls))
        self.token = ""
        self.user_id = ""
        self.since: str | None = None
        self.seen = SeenIds()
        # Event id -> room, to answer a message.
        self.room_of: RecentMap[str, str] = RecentMap(REPLY_MEMORY)
        self.dead: TargetError | None = None
        self.members: dict[str, set[str]] = {}  # room -> joined user ids seen in sync
        self.member_changed = asyncio.Event()
        self.outbox: asyncio.Queue[tuple[str, str, str, asyncio.Future[Ack]] | None] = (
            asyncio.Queue())
        self.tasks: list[asyncio.Task[None]] = []

    async def call(self, method: str, path: str, body: Any = None,
                   timeout_s: float | None = None) -> Any:
        """One API call; TargetError with a cause for every way it can fail."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        url = self.adapter.base + path
        try:
            async with asyncio.timeout(timeout_s or self.config.connect_timeout_s), \
                    self.http.request(method, url, json=body, headers=headers,
                                      server_hostname=self.adapter.tls_server_name) as response:
                text = await response.text()
                status = response.status
        except aiohttp.ClientConnectorCertificateError as exc:
            certificate = exc.certificate_error
            if isinstance(certificate, ssl.SSLCertVerificationError):
                raise tls_error(url, certificate, self.adapter.tls_server_name) from None
            raise TargetError(Cause.TLS_FAILED, f"{url}: {certificate}") from None
        except aiohttp.ClientSSLError as exc:
            raise TargetError(Cause.TLS_FAILED, f"{url}: {exc}") from None
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise TargetError(Cause.TRANSPORT, f"{url}: {exc}") from None
        except TimeoutError:
            raise TargetError(Cause.TRANSPORT, f"{url}: no answer") from None
        try:
            data = json.loads(text) if text else {}
        except ValueError:
            raise TargetError(Cause.PROTOCOL, f"{method} {path}: HTTP {status}, not JSON") \
                from None
        if status == 200:
            return data
        code = data.get("errcode", "") if isinstance(data, dict) else ""
        if status == 401 or code == "M_UNKNOWN_TOKEN":
            raise TargetError(Cause.SESSION_EXPIRED, f"{code or 'HTTP 401'}")
        if status == 403 and path.endswith("/login"):
            raise TargetError(Cause.AUTH_REJECTED, f"login refused for {self.user}: {code}")
        if status == 403 and code == "M_USER_DEACTIVATED":
            raise TargetError(Cause.ACCOUNT_FROZEN, code)
        if status >= 500:
            raise TargetError(Cause.DISCONNECTED, f"{method} {path}: HTTP {status} {code}")
        raise TargetError(Cause.NOT_ACCEPTED, f"{method} {path}: HTTP {status} {code}")

    async def login(self) -> None:
        reply = await self.call("POST", f"{API}/login", {
            "type": "m.login.password", "identifier": {"type": "m.id.user", "user": self.user},
            "password": self.password, "initial_device_display_name": "chatprobe"})
        if not isinstance(reply, dict) or "access_token" not in reply:
            raise TargetError(Cause.PROTOCOL, "login reply without access_token")
        self.token = reply["access_token"]
        self.user_id = str(reply.get("user_id", ""))
        if self.adapter.server_name is None and ":" in self.user_id:
            self.adapter.server_name = self.user_id.split(":", 1)[1]
        # The first sync only sets the starting point: history before the probe is not ours.
        first = await self.call("GET", f"{API}/sync?timeout=0")
        self.since = first.get("next_batch")
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._sync_forever()),
                      loop.create_task(self._send_forever())]

    async def _with_retries(self, what: str, action: Any) -> Any:
        """Retry transient failures inside the reconnect window; die on permanent ones."""
        give_up_at = time.monotonic() + self.config.reconnect_window_s
        delay = 0.05
        announced = False
        while True:
            try:
                result = await action()
            except TargetError as exc:
                if exc.cause in PERMANENT or exc.cause is Cause.NOT_ACCEPTED:
                    raise
                if time.monotonic() >= give_up_at:
                    self.die(exc)
                    raise
                if not announced:
                    self.on_event("disconnected", f"{what}: {exc.detail}")
                    announced = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if announced:
                self.on_event("resumed", what)
            return result

    async def _sync_forever(self) -> None:
        extra = self.adapter.config.extra
        timeout_ms = int(extra.get("sync_timeout_ms", 10000))
        timeline = json.dumps({"room": {"timeline": {
            "limit": int(extra.get("sync_timeline_limit", 1000))}}}, separators=(",", ":"))
        while self.dead is None:
            path = f"{API}/sync?timeout={timeout_ms}&filter={quote(timeline)}" + (
                f"&since={quote(self.since)}" if self.since else "")

            async def once(path: str = path) -> Any:
                return await self.call("GET", path, timeout_s=timeout_ms / 1000 + 30)

            try:
                batch = await self._with_retries("sync", once)
            except TargetError as exc:
                self.die(exc)
                return
            self.since = batch.get("next_batch", self.since)
            await self._handle_sync(batch.get("rooms", {}))

    async def _handle_sync(self, rooms: dict[str, Any]) -> None:
        for room_id, room in rooms.get("join", {}).items():
            if room.get("timeline", {}).get("limited"):
                self.on_event("sync_limited", f"{room_id}: the server left out older events "
                                              "of this sync (raise sync_timeline_limit)")
            for event in room.get("timeline", {}).get("events", []):
                kind = event.get("type")
                if kind == "m.room.member":
                    joined = self.members.setdefault(room_id, set())
                    if event.get("content", {}).get("membership") == "join":
                        joined.add(event.get("state_key", ""))
                    self.member_changed.set()
                elif kind == "m.room.message" and event.get("sender") != self.user_id:
                    body = event.get("content", {}).get("body")
                    event_id = event.get("event_id", "")
                    if isinstance(body, str) and self.seen.first_time(event_id):
                        self.room_of.remember(event_id, room_id)
                        self.on_receive(body, event_id)
        if self.auto_join:
            for room_id in rooms.get("invite", {}):
                with contextlib.suppress(TargetError):
                    await self.call("POST", f"{API}/rooms/{quote(room_id)}/join", {})

    async def _send_forever(self) -> None:
        # One at a time per user: parallel PUTs could reorder a conversation, and the
        # ledger would blame the server for the harness's own concurrency.
        while True:
            item = await self.outbox.get()
            if item is None:
                return
            room_id, txn_id, text, future = item
            path = (f"{API}/rooms/{quote(room_id)}/send/m.room.message/{quote(txn_id)}")

            async def put(path: str = path, text: str = text) -> Any:
                return await self.call("PUT", path, {"msgtype": "m.text", "body": text})

            try:
                reply = await self._with_retries("send", put)
            except TargetError as exc:
                if not future.done():
                    future.set_exception(exc)
                continue
            if not future.done():
                future.set_result(Ack(str(reply.get("event_id", txn_id)), None))

    def send(self, room_id: str, txn_id: str, text: str) -> asyncio.Future[Ack]:
        future: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        if self.dead is not None:
            future.set_exception(self.dead)
        else:
            self.outbox.put_nowait((room_id, txn_id, text, future))
        return future

    async def wait_for_member(self, room_id: str, user_id: str) -> None:
        while user_id not in self.members.get(room_id, set()):
            if self.dead is not None:
                raise self.dead
            self.member_changed.clear()
            await self.member_changed.wait()

    def die(self, error: TargetError) -> None:
        if self.dead is None:
            self.dead = error
            self.on_event("dead", str(error))
            self.member_changed.set()

    async def close(self) -> None:
        self.outbox.put_nowait(None)
        senders = self.tasks[1:]
        for sender in senders:
            # Let queued messages go out before leaving (bounded): cancelling would lose them.
            with contextlib.suppress(TimeoutError, TargetError, asyncio.CancelledError):
                async with asyncio.timeout(self.config.connect_timeout_s):
                    await sender
        for task in self.tasks:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, TargetError):
                    await task
        await self.http.close()


class _MatrixCustomer(CustomerSession):
    def __init__(self, client: _Client, adapter: MatrixAdapter) -> None:
        self.client = client
        self.adapter = adapter

    @property
    def failure(self) -> TargetError | None:
        return self.client.dead

    async def open_conversation(self, ref: str, channel: str) -> Conversation:
        agent_id, agent_user_id = self.adapter.next_agent()
        reply = await self.client.call("POST", f"{API}/createRoom", {
            "preset": "private_chat", "is_direct": True, "invite": [agent_user_id],
            "name": f"chatprobe {ref}", "topic": f"chatprobe synthetic conversation {ref}"})
        room_id = str(reply.get("room_id", ""))
        # Sending before the agent joined would rely on history visibility; wait instead.
        try:
            async with asyncio.timeout(self.client.config.connect_timeout_s * 2):
                await self.client.wait_for_member(room_id, agent_user_id)
        except TimeoutError:
            raise TargetError(Cause.ROUTING_RULE, f"{agent_user_id} never joined the "
                                                  f"conversation room {room_id}") from None
        return Conversation(room_id, "assigned", agent_id)

    async def send(self, conversation: str, client_msg_id: str,
                   text: str) -> asyncio.Future[Ack]:
        return self.client.send(conversation, client_msg_id, text)

    async def close(self) -> None:
        await self.client.close()


class _MatrixAgent(AgentSession):
    def __init__(self, client: _Client, agent_id: str) -> None:
        self.client = client
        self.profile = AgentSelf(agent=agent_id)  # Matrix shows no routing settings

    @property
    def failure(self) -> TargetError | None:
        return self.client.dead

    async def reply(self, conversation: str, client_msg_id: str,
                    text: str) -> asyncio.Future[Ack]:
        return self.client.send(conversation, client_msg_id, text)

    async def reply_to(self, server_id: str, client_msg_id: str,
                       text: str) -> asyncio.Future[Ack] | None:
        room_id = self.client.room_of.get(server_id)
        return None if room_id is None else self.client.send(room_id, client_msg_id, text)

    async def close(self) -> None:
        await self.client.close()


@register
class MatrixAdapter(Adapter):
    name = "matrix"

    def __init__(self, target_url: str, config: TargetConfig) -> None:
        super().__init__(target_url, config)
        parts = urlsplit(target_url)
        if parts.scheme not in ("http", "https"):
            raise HarnessError("a matrix target URL must be http:// or https://")
        self.base = target_url.rstrip("/")
        try:
            self.tls: ssl.SSLContext | bool = (config.tls_context() if parts.scheme == "https"
                                               else True)
        except (OSError, ssl.SSLError) as exc:
            raise HarnessError(f"cannot use the TLS files of the target config: {exc}") \
                from None
        # The name the certificate must carry when the URL names a proxy or an address.
        self.tls_server_name = config.tls_server_name if parts.scheme == "https" else None
        # The homeserver's name (the part after ':' in user ids) is not the URL's host in
        # general; without extra.server_name it is learnt from the first login.
        server_name = config.extra.get("server_name")
        self.server_name: str | None = str(server_name) if server_name else None
        self.customers = AccountPool.from_extra(config.extra, "matrix")
        self._agent_cycle: Iterator[tuple[str, str]] | None = None

    def next_agent(self) -> tuple[str, str]:
        """(credential id, Matrix user id) of the agent the next conversation invites."""
        if self._agent_cycle is None:
            self._agent_cycle = itertools.cycle(
                [(a.id, a.id if a.id.startswith("@") else f"@{a.id}:{self.server_name}")
                 for a in self.config.agents])
        return next(self._agent_cycle)

    async def connect_customer(self, customer_id: str, on_receive: OnReceive,
                               on_event: OnEvent) -> CustomerSession:
        # Accounts are shared; every login is its own device and access token.
        _, account = self.customers.take()
        client = _Client(self, account, self.customers.password,
                         on_receive, on_event, auto_join=False)
        await _login_or_close(client)
        return _MatrixCustomer(client, self)

    async def login_agent(self, credential: AgentCredential, on_receive: OnReceive,
                          on_event: OnEvent) -> AgentSession:
        user = credential.id[1:].split(":", 1)[0] if credential.id.startswith("@") else (
            credential.id)
        client = _Client(self, user, credential.token, on_receive, on_event, auto_join=True)
        await _login_or_close(client)
        return _MatrixAgent(client, credential.id)


async def _login_or_close(client: _Client) -> None:
    try:
        await client.login()
    except BaseException:
        await client.close()
        raise
