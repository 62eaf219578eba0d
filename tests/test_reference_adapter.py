"""The reference adapter against scripted servers on loopback: replays, refusals, URLs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from websockets.asyncio.server import ServerConnection, serve

from chatprobe.config import AgentCredential, TargetConfig
from chatprobe.diagnosis import Cause
from chatprobe.errors import HarnessError, TargetError
from chatprobe.protocols.base import adapter_for
from chatprobe.protocols.reference import ReferenceAdapter, explain_trace, websocket_url
from tests.conftest import scaled

Script = Callable[[ServerConnection], Awaitable[None]]


async def with_server(script: Script, body: Callable[[str], Awaitable[None]]) -> None:
    async def handler(ws: ServerConnection) -> None:
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello"
        await ws.send(json.dumps({"type": "welcome", "role": hello["role"],
                                  "profile": {"role": "customer_service"}}))
        await script(ws)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        await asyncio.wait_for(body(f"http://127.0.0.1:{port}"), timeout=scaled(10))


CONFIG = TargetConfig(agents=(AgentCredential("a", "t"),), reconnect_window_s=0.5)


def test_replayed_message_ids_reach_the_harness_once() -> None:
    received: list[str] = []
    done = asyncio.Event()

    async def script(ws: ServerConnection) -> None:
        for message_id in (5, 5, 6):
            await ws.send(json.dumps({"type": "message", "id": message_id,
                                      "text": f"m{message_id}"}))
        await ws.send(json.dumps({"type": "message", "id": 7, "text": "end"}))
        await ws.wait_closed()

    async def body(url: str) -> None:
        adapter = ReferenceAdapter(url, CONFIG)

        def on_receive(text: str, server_id: str | None) -> None:
            received.append(text)
            if text == "end":
                done.set()

        agent = await adapter.login_agent(CONFIG.agents[0], on_receive, lambda k, d: None)
        await done.wait()
        await agent.close()

    asyncio.run(with_server(script, body))
    assert received == ["m5", "m6", "end"]


def test_refused_send_fails_its_ack_with_not_accepted() -> None:
    async def script(ws: ServerConnection) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            await ws.send(json.dumps({"type": "error", "code": "unknown_conversation",
                                      "message": "no such", "client_msg_id":
                                      frame["client_msg_id"]}))

    async def body(url: str) -> None:
        adapter = ReferenceAdapter(url, CONFIG)
        customer = await adapter.connect_customer("c", lambda t, i: None, lambda k, d: None)
        future = await customer.send("1", "m-1", "hello")
        with pytest.raises(TargetError) as caught:
            await future
        assert caught.value.cause is Cause.NOT_ACCEPTED
        await customer.close()

    asyncio.run(with_server(script, body))


def test_tagged_sends_tell_their_sink_of_each_ack_refusal_and_the_sessions_end() -> None:
    """The swarm's per-message path: no future per send; each outcome reaches the sink once
    with the send's tag, an ack with the target's message id."""
    async def script(ws: ServerConnection) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            if frame["client_msg_id"] == "m-1":
                await ws.send(json.dumps({"type": "ack", "client_msg_id": "m-1", "id": 41}))
            elif frame["client_msg_id"] == "m-2":
                await ws.send(json.dumps({"type": "error", "code": "unknown_conversation",
                                          "message": "no such", "client_msg_id": "m-2"}))
                await ws.send(json.dumps({"type": "ack", "client_msg_id": "m-1", "id": 41}))

    async def body(url: str) -> None:
        adapter = ReferenceAdapter(url, CONFIG)
        customer = await adapter.connect_customer("c", lambda t, i: None, lambda k, d: None)
        outcomes: list[tuple[object, str | None, Cause | None]] = []
        answered = asyncio.Event()

        def sink(tag: object, server_id: str | None, error: TargetError | None) -> None:
            outcomes.append((tag, server_id, error.cause if error else None))
            if len(outcomes) == 2:
                answered.set()

        for number in (1, 2, 3):
            assert customer.send_tagged("7", f"m-{number}", f"text {number}", ("t", number),
                                        sink)
        await answered.wait()  # m-3 is never answered; m-1's second ack is not news
        await customer.close()
        assert customer.send_tagged("7", "m-4", "after the close", ("t", 4), sink)
        assert outcomes == [(("t", 1), "41", None), (("t", 2), None, Cause.NOT_ACCEPTED),
                            (("t", 3), None, Cause.DISCONNECTED),
                            (("t", 4), None, Cause.DISCONNECTED)]

    asyncio.run(with_server(script, body))


def test_session_ended_mid_run_marks_the_session_failed_and_hangs_up() -> None:
    async def script(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "error", "code": "session_expired"}))
        await ws.wait_closed()

    async def body(url: str) -> None:
        adapter = ReferenceAdapter(url, CONFIG)
        dead = asyncio.Event()
        agent = await adapter.login_agent(
            CONFIG.agents[0], lambda t, i: None,
            lambda kind, detail: dead.set() if kind == "dead" else None)
        await dead.wait()
        assert agent.failure is not None and agent.failure.cause is Cause.SESSION_EXPIRED
        await agent.close()

    asyncio.run(with_server(script, body))


@pytest.mark.parametrize(("target", "ws_url", "http_base"), [
    ("http://h:1", "ws://h:1/ws", "http://h:1"),
    ("https://h/chat/", "wss://h/chat/ws", "https://h/chat"),
    ("ws://h:1/ws", "ws://h:1/ws", "http://h:1"),
])
def test_urls(target: str, ws_url: str, http_base: str) -> None:
    assert websocket_url(target) == ws_url
    assert ReferenceAdapter(target, CONFIG).http_base == http_base


def test_adapter_lookup_by_name_and_by_module_path() -> None:
    assert adapter_for("reference") is ReferenceAdapter
    assert adapter_for("chatprobe.protocols.reference:ReferenceAdapter") is ReferenceAdapter
    for bad in ("nope", "no.such.module:Thing", "chatprobe.protocols.reference:websocket_url",
                ":X", "chatprobe.protocols.base:Adapter"):
        with pytest.raises(HarnessError):
            adapter_for(bad)


@pytest.mark.parametrize(("trace", "cause"), [
    ({"status": "filtered", "reason": "block: x"}, Cause.FILTERED),
    ({"status": "dropped"}, Cause.PUSH_LOST),
    ({"status": "queued", "queue_reasons": {"p": "capacity_full"}}, Cause.CAPACITY),
    ({"status": "pushed", "agent": "someone-else"}, Cause.ROUTING_RULE),
    ({"status": "pushed", "agent": "p"}, None),
])
def test_trace_mapping(trace: dict[str, object], cause: Cause | None) -> None:
    assert explain_trace(trace, frozenset({"p"})).cause is cause


def test_refused_open_fails_at_once_with_not_accepted() -> None:
    async def script(ws: ServerConnection) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            await ws.send(json.dumps({"type": "error", "code": "bad_frame",
                                      "message": "no", "ref": frame["ref"]}))

    async def body(url: str) -> None:
        config = TargetConfig(agents=CONFIG.agents, connect_timeout_s=60)
        customer = await ReferenceAdapter(url, config).connect_customer(
            "c", lambda t, i: None, lambda k, d: None)
        with pytest.raises(TargetError) as caught:
            await customer.open_conversation("r1", "web")  # not a 60 s timeout
        assert caught.value.cause is Cause.NOT_ACCEPTED
        await customer.close()

    asyncio.run(with_server(script, body))


def test_a_request_made_while_the_connection_is_down_is_answered_after_the_resume() -> None:
    opens: list[str] = []

    async def script(ws: ServerConnection) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            if frame["type"] == "open":
                opens.append(frame["ref"])
                await ws.send(json.dumps({"type": "opened", "ref": frame["ref"],
                                          "conversation": 7, "state": "assigned"}))

    async def body(url: str) -> None:
        adapter = ReferenceAdapter(url, TargetConfig(reconnect_window_s=5))
        customer = await adapter.connect_customer("c", lambda t, s: None, lambda k, d: None)
        # The network drops, and the request goes out before the link has noticed: it must
        # wait for the resume and ask again, not fail the customer (nor spin on the loop).
        assert customer.drop_connection()
        conversation = await customer.open_conversation("r1", "web")
        assert conversation.id == "7" and opens == ["r1"]
        await customer.close()

    asyncio.run(with_server(script, body))
