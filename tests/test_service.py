"""The reference service over its real wire protocol (raw WebSocket clients, no adapter)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import ServiceProcess, scaled

Frame = dict[str, Any]


async def recv_until(ws: ClientConnection, kind: str) -> Frame:
    async with asyncio.timeout(scaled(5)):
        while True:
            frame: Frame = json.loads(await ws.recv())
            if frame["type"] == kind:
                return frame


async def hello(service: ServiceProcess, **fields: Any) -> tuple[ClientConnection, Frame]:
    ws = await connect(service.base_url.replace("http", "ws") + "/ws")
    await ws.send(json.dumps({"type": "hello", "shop": "demo", **fields}))
    async with asyncio.timeout(scaled(5)):
        welcome: Frame = json.loads(await ws.recv())
    return ws, welcome


async def agent(service: ServiceProcess, name: str = "probe-1", **fields: Any
                ) -> tuple[ClientConnection, Frame]:
    tokens = {"probe-1": "demo-probe-1-token", "probe-2": "demo-probe-2-token"}
    return await hello(service, role="agent", agent=name, token=tokens[name],
                       client_version="5.0.0", **fields)


async def customer(service: ServiceProcess, name: str = "buyer-1", **fields: Any
                   ) -> tuple[ClientConnection, Frame]:
    return await hello(service, role="customer", customer=name, **fields)


async def open_conversation(ws: ClientConnection, ref: str = "r1",
                            channel: str = "web") -> Frame:
    await ws.send(json.dumps({"type": "open", "ref": ref, "channel": channel}))
    return await recv_until(ws, "opened")


def run(service: ServiceProcess, scenario: Callable[[ServiceProcess], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(service), timeout=scaled(60)))


def test_agent_login_welcome_carries_its_own_settings(reference_service: ServiceProcess) -> None:
    async def scenario(service: ServiceProcess) -> None:
        ws, welcome = await agent(service)
        assert welcome["type"] == "welcome"
        assert welcome["profile"]["role"] == "customer_service"
        assert welcome["profile"]["within_hours"] is True
        assert welcome["client_supported"] is True
        await ws.close()

    run(reference_service, scenario)


def test_message_is_acked_with_server_id_pushed_to_agent_and_resend_is_deduplicated(
        reference_service: ServiceProcess) -> None:
    async def scenario(service: ServiceProcess) -> None:
        agent_ws, _ = await agent(service)
        cust, _ = await customer(service)
        opened = await open_conversation(cust)
        assert opened["state"] == "assigned" and opened["agent"] in ("probe-1", "probe-2")
        send = {"type": "send", "conversation": opened["conversation"], "client_msg_id": "m1",
                "text": "is the jacket in stock?"}
        await cust.send(json.dumps(send))
        ack = await recv_until(cust, "ack")
        await cust.send(json.dumps(send))  # the client missed the ack and resends
        again = await recv_until(cust, "ack")
        assert again["id"] == ack["id"]
        pushed = await recv_until(agent_ws, "message")
        assert pushed["id"] == ack["id"] and pushed["text"] == send["text"]
        stats = service.stats()
        assert stats["accepted"] == 1 and stats["pushed"] == 1
        await agent_ws.close()
        await cust.close()

    run(reference_service, scenario)


def test_agent_reply_reaches_the_customer(reference_service: ServiceProcess) -> None:
    async def scenario(service: ServiceProcess) -> None:
        agent_ws, _ = await agent(service)
        cust, _ = await customer(service)
        opened = await open_conversation(cust)
        await agent_ws.send(json.dumps({"type": "reply", "conversation": opened["conversation"],
                                        "client_msg_id": "r1", "text": "yes, size M left"}))
        ack = await recv_until(agent_ws, "ack")
        got = await recv_until(cust, "message")
        assert got["id"] == ack["id"] and got["from"] == "agent"
        assert got["text"] == "yes, size M left"
        await agent_ws.close()
        await cust.close()

    run(reference_service, scenario)


def test_queued_conversation_is_delivered_when_an_agent_comes_online(
        reference_service: ServiceProcess) -> None:
    async def scenario(service: ServiceProcess) -> None:
        for name in ("probe-1", "probe-2"):
            service.ok("PATCH", f"/admin/shops/demo/agents/{name}", {"presence": "away"})
        agent_ws, _ = await agent(service)
        cust, _ = await customer(service)
        opened = await open_conversation(cust)
        assert opened["state"] == "queued"
        await cust.send(json.dumps({"type": "send", "conversation": opened["conversation"],
                                    "client_msg_id": "m1", "text": "hello?"}))
        ack = await recv_until(cust, "ack")
        trace = service.ok("GET", f"/admin/messages/{ack['id']}")
        assert trace["status"] == "queued"
        assert trace["queue_reasons"]["probe-1"] == "presence_away"
        await agent_ws.send(json.dumps({"type": "presence", "presence": "online"}))
        assigned = await recv_until(agent_ws, "assigned")
        assert assigned["conversation"] == opened["conversation"]
        pushed = await recv_until(agent_ws, "message")
        assert pushed["id"] == ack["id"]
        assert service.stats()["queued"] == 1
        await agent_ws.close()
        await cust.close()

    run(reference_service, scenario)


def test_agent_resumes_from_last_seen_id_after_reconnect(
        reference_service: ServiceProcess) -> None:
    async def scenario(service: ServiceProcess) -> None:
        service.ok("PATCH", "/admin/shops/demo/agents/probe-2", {"presence": "offline"})
        agent_ws, _ = await agent(service)
        cust, _ = await customer(service)
        opened = await open_conversation(cust)
        conv = opened["conversation"]
        await cust.send(json.dumps({"type": "send", "conversation": conv,
                                    "client_msg_id": "m1", "text": "first"}))
        first = await recv_until(agent_ws, "message")
        await agent_ws.close()
        for i in (2, 3):
            await cust.send(json.dumps({"type": "send", "conversation": conv,
                                        "client_msg_id": f"m{i}", "text": f"msg {i}"}))
            await recv_until(cust, "ack")
        agent_ws, _ = await agent(service, resume_after=first["id"])
        replayed = [await recv_until(agent_ws, "message") for _ in range(2)]
        assert [m["text"] for m in replayed] == ["msg 2", "msg 3"]
        await agent_ws.close()
        await cust.close()

    run(reference_service, scenario)


def test_acked_messages_survive_a_crash(reference_service: ServiceProcess) -> None:
    async def send_some(service: ServiceProcess) -> None:
        service.ok("PATCH", "/admin/shops/demo/agents/probe-2", {"presence": "offline"})
        agent_ws, _ = await agent(service)
        await agent_ws.close()  # logged out: messages wait for it
        cust, _ = await customer(service)
        opened = await open_conversation(cust)
        for i in range(5):
            await cust.send(json.dumps({"type": "send", "conversation": opened["conversation"],
                                        "client_msg_id": f"m{i}", "text": f"m{i}"}))
            await recv_until(cust, "ack")
        await cust.close()

    run(reference_service, send_some)
    reference_service.kill()
    reference_service.start()

    async def read_back(service: ServiceProcess) -> None:
        agent_ws, _ = await agent(service, resume_after=0)
        got = [await recv_until(agent_ws, "message") for _ in range(5)]
        assert [m["text"] for m in got] == [f"m{i}" for i in range(5)]
        await agent_ws.close()

    run(reference_service, read_back)


def test_bad_frames_get_an_error_not_a_crash(reference_service: ServiceProcess) -> None:
    async def scenario(service: ServiceProcess) -> None:
        cust, _ = await customer(service)
        await cust.send("}{")
        error = await recv_until(cust, "error")
        assert error["code"] == "bad_frame"
        await cust.send(json.dumps({"type": "send", "conversation": "x"}))
        assert (await recv_until(cust, "error"))["code"] == "bad_frame"
        await cust.send(json.dumps({"type": "send", "conversation": 999999,
                                    "client_msg_id": "a", "text": "b"}))
        assert (await recv_until(cust, "error"))["code"] == "unknown_conversation"
        opened = await open_conversation(cust)  # the session still works
        assert opened["type"] == "opened"
        await cust.close()
        assert service.stats()["bad_frames"] == 2

    run(reference_service, scenario)


def test_login_errors_are_named(reference_service: ServiceProcess) -> None:
    async def scenario(service: ServiceProcess) -> None:
        _, reply = await hello(service, role="agent", agent="probe-1", token="nope")
        assert reply == {"type": "error", "code": "auth_failed",
                         "message": "unknown agent or wrong token"}
        _, reply = await hello(service, role="customer", customer="c", shop="nowhere")
        assert reply["code"] == "unknown_shop"
        service.ok("PATCH", "/admin/shops/demo/agents/probe-1", {"status": "banned"})
        _, reply = await agent(service)
        assert reply["code"] == "account_frozen"

    run(reference_service, scenario)


def test_admin_api_requires_the_token_and_validates_input(
        reference_service: ServiceProcess) -> None:
    status, body = reference_service.admin("GET", "/admin/stats", token="wrong")
    assert status == 401
    status, body = reference_service.admin("POST", "/admin/faults", {"drop": 2})
    assert status == 400 and "probability" in body["error"]
    status, body = reference_service.admin("POST", "/admin/faults", {"explode": True})
    assert status == 400 and "unknown fault" in body["error"]
    status, body = reference_service.admin("PATCH", "/admin/shops/demo/agents/probe-1",
                                           {"capacity": 3, "presence": "asleep"})
    assert status == 400 and "presence" in body["error"]
    shop = reference_service.ok("GET", "/admin/shops/demo")
    assert shop["agents"]["probe-1"]["capacity"] == 500  # a rejected change changes nothing
    status, body = reference_service.admin("GET", "/admin/messages/123456")
    assert status == 404
    stats = reference_service.stats()
    for key in ("accepted", "pushed", "dropped", "duplicated", "reordered", "filtered",
                "queued"):
        assert stats[key] == 0


def test_freezing_an_agent_ends_its_session_and_routing_stops_counting_it(
        reference_service: ServiceProcess) -> None:
    async def scenario(service: ServiceProcess) -> None:
        agent_ws, _ = await agent(service)
        service.ok("PATCH", "/admin/shops/demo/agents/probe-1", {"status": "frozen"})
        error = await recv_until(agent_ws, "error")
        assert error["code"] == "account_frozen"
        async with asyncio.timeout(scaled(5)):
            await agent_ws.wait_closed()  # the server hangs up, not just goes quiet
        assert service.stats()["agent_sessions"] == 0

    run(reference_service, scenario)


def test_bad_resume_after_is_refused_without_a_half_open_session(
        reference_service: ServiceProcess) -> None:
    async def scenario(service: ServiceProcess) -> None:
        ws, reply = await agent(service, resume_after="yesterday")
        assert reply["type"] == "error" and reply["code"] == "bad_frame"
        await ws.send(json.dumps({"type": "ping"}))
        error = await recv_until(ws, "error")  # still not logged in: no pong
        assert error["code"] == "not_logged_in"
        assert service.stats()["agent_sessions"] == 0

    run(reference_service, scenario)


def test_transferring_a_queued_conversation_delivers_what_waited(
        reference_service: ServiceProcess) -> None:
    async def scenario(service: ServiceProcess) -> None:
        for name in ("probe-1", "probe-2"):
            service.ok("PATCH", f"/admin/shops/demo/agents/{name}", {"receive_messages": False})
        agent_ws, _ = await agent(service)
        cust, _ = await customer(service)
        opened = await open_conversation(cust)
        assert opened["state"] == "queued"
        await cust.send(json.dumps({"type": "send", "conversation": opened["conversation"],
                                    "client_msg_id": "m1", "text": "anyone?"}))
        ack = await recv_until(cust, "ack")
        service.ok("POST", f"/admin/conversations/{opened['conversation']}/transfer",
                   {"agent": "probe-1"})
        pushed = await recv_until(agent_ws, "message")
        assert pushed["id"] == ack["id"]
        await agent_ws.close()
        await cust.close()

    run(reference_service, scenario)


def test_errors_name_the_request_that_failed(reference_service: ServiceProcess) -> None:
    async def scenario(service: ServiceProcess) -> None:
        cust, _ = await customer(service)
        await cust.send(json.dumps({"type": "send", "conversation": 424242,
                                    "client_msg_id": "m-77", "text": "x"}))
        error = await recv_until(cust, "error")
        assert error["code"] == "unknown_conversation" and error["client_msg_id"] == "m-77"
        await cust.close()

    run(reference_service, scenario)


def test_a_client_that_vanished_mid_request_is_one_log_line_not_a_traceback() -> None:
    import logging
    import sys

    from chatprobe.service import runner

    try:
        raise ConnectionResetError("Cannot write to closing transport")
    except ConnectionResetError:
        record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1,
                                   "Error handling request from %s", ("127.0.0.1",),
                                   sys.exc_info())
    assert runner._ClientGone().filter(record)
    assert record.exc_info is None
    assert record.getMessage() == "client went away mid-request (ConnectionResetError)"
