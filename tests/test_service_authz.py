"""The reference service as a fair target: one test per authorization rule (issue 8 item 5).
The back office refuses anyone without the admin token; a customer cannot reach another
customer's conversation; an agent sees only its own shop. Real sockets, real service."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from tests.conftest import ServiceProcess, scaled
from tests.test_service import (
    Frame,
    agent,
    customer,
    hello,
    open_conversation,
    recv_until,
    run,
)

ADMIN_ROUTES = [
    ("GET", "/admin/stats", None),
    ("POST", "/admin/stats/reset", {}),
    ("GET", "/admin/faults", None),
    ("POST", "/admin/faults", {"drop": 1.0}),
    ("GET", "/admin/shops/demo", None),
    ("PATCH", "/admin/shops/demo", {"push_enabled": False}),
    ("PUT", "/admin/shops/evil", {"name": "Evil"}),
    ("PATCH", "/admin/shops/demo/agents/probe-1", {"receive_messages": False}),
    ("PUT", "/admin/shops/demo/agents/intruder", {"token": "mine"}),
    ("GET", "/admin/messages/1", None),
    ("POST", "/admin/conversations/1/close", {}),
    ("POST", "/admin/conversations/1/transfer", {"agent": "probe-2"}),
]


def call(service: ServiceProcess, method: str, path: str, body: Any,
         headers: dict[str, str]) -> int:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(service.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=scaled(10)) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "test-admin-token"},
                                     {"X-Admin-Token": ""}],
                         ids=["none", "wrong", "not bearer", "empty"])
def test_the_back_office_refuses_every_request_without_the_admin_token(
        reference_service: ServiceProcess, headers: dict[str, str]) -> None:
    before = (reference_service.ok("GET", "/admin/faults"),
              reference_service.ok("GET", "/admin/shops/demo"))
    for method, path, body in ADMIN_ROUTES:
        assert call(reference_service, method, path, body, headers) == 401, (method, path)
    # Nothing the refused requests asked for happened.
    after = (reference_service.ok("GET", "/admin/faults"),
             reference_service.ok("GET", "/admin/shops/demo"))
    assert after == before
    status, _ = reference_service.admin("GET", "/admin/shops/evil")
    assert status == 404


async def nothing_else_arrives(ws: ClientConnection) -> list[Frame]:
    """Every frame the service queued for ``ws`` so far: a ping's pong comes after them."""
    await ws.send(json.dumps({"type": "ping", "echo": "fence"}))
    frames: list[Frame] = []
    while True:
        frame: Frame = json.loads(await ws.recv())
        if frame["type"] == "pong" and frame.get("echo") == "fence":
            return frames
        frames.append(frame)


def test_a_customer_cannot_reach_another_customers_conversation(
        reference_service: ServiceProcess) -> None:
    async def scenario(service: ServiceProcess) -> None:
        agent_ws, _ = await agent(service)
        alice, _ = await customer(service, "alice")
        opened = await open_conversation(alice)
        conversation = opened["conversation"]
        await alice.send(json.dumps({"type": "send", "conversation": conversation,
                                     "client_msg_id": "a1", "text": "my address is private"}))
        pushed = await recv_until(agent_ws, "message")
        await agent_ws.send(json.dumps({"type": "reply", "conversation": conversation,
                                        "client_msg_id": "r1", "text": "for alice only"}))
        assert (await recv_until(alice, "message"))["text"] == "for alice only"

        mallory, welcome = await customer(service, "mallory", resume_after=0)
        assert welcome["type"] == "welcome"
        # Resuming from the very beginning replays only her own (none), and the reply to
        # alice, pushed before the fence, never reached her either.
        assert [f for f in await nothing_else_arrives(mallory)
                if f["type"] == "message"] == []
        for frame in ({"type": "send", "conversation": conversation, "client_msg_id": "m1",
                       "text": "let me in"},
                      {"type": "close", "conversation": conversation}):
            await mallory.send(json.dumps(frame))
            error = await recv_until(mallory, "error")
            assert error["code"] == "unknown_conversation", error
        # Alice's conversation is untouched: still open, still hers.
        await alice.send(json.dumps({"type": "send", "conversation": conversation,
                                     "client_msg_id": "a2", "text": "still here"}))
        assert (await recv_until(alice, "ack"))["client_msg_id"] == "a2"
        assert pushed["customer"] == "alice"
        trace = service.ok("GET", f"/admin/messages/{pushed['id']}")
        assert trace["status"] != "conversation_closed"
        for ws in (agent_ws, alice, mallory):
            await ws.close()

    run(reference_service, scenario)


def test_an_agent_sees_only_its_own_shop(reference_service: ServiceProcess) -> None:
    reference_service.ok("PUT", "/admin/shops/other", {"name": "Other Shop"})
    reference_service.ok("PUT", "/admin/shops/other/agents/o-1",
                         {"token": "other-o-1-token", "channels": ["web"]})

    async def scenario(service: ServiceProcess) -> None:
        outsider, welcome = await hello(service, shop="other", role="agent", agent="o-1",
                                        token="other-o-1-token", client_version="5.0.0")
        assert welcome["type"] == "welcome"
        # Its token does not open the demo shop.
        _, refused = await hello(service, shop="demo", role="agent", agent="o-1",
                                 token="other-o-1-token", client_version="5.0.0")
        assert refused["code"] == "auth_failed"
        insider, _ = await agent(service)
        buyer, _ = await customer(service)
        opened = await open_conversation(buyer)
        assert opened["agent"] == "probe-1"
        await buyer.send(json.dumps({"type": "send", "conversation": opened["conversation"],
                                     "client_msg_id": "b1", "text": "demo shop only"}))
        await recv_until(insider, "message")
        # Pushed before the fence if at all: the other shop's agent got nothing of it.
        assert await nothing_else_arrives(outsider) == []
        await outsider.send(json.dumps({"type": "reply",
                                        "conversation": opened["conversation"],
                                        "client_msg_id": "o1", "text": "hello from elsewhere"}))
        error = await recv_until(outsider, "error")
        assert error["code"] == "unknown_conversation", error
        assert [f for f in await nothing_else_arrives(buyer) if f["type"] == "message"] == []
        for ws in (outsider, insider, buyer):
            await ws.close()

    run(reference_service, scenario)
