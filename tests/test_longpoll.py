"""The long-polling transport against the real reference service: the HTTP endpoints, the
client socket, and a probe whose customers can only long-poll."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from chatprobe.protocols.longpoll import open_long_poll
from chatprobe.protocols.reference import long_poll_url
from tests.conftest import ServiceProcess, scaled


def run(coroutine: Any) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coroutine, timeout=scaled(30))
    return asyncio.run(bounded())


def hello(customer: str) -> str:
    return json.dumps({"type": "hello", "role": "customer", "shop": "demo",
                       "customer": customer, "client_version": "5.0.0"})


def test_long_poll_url_sits_beside_the_websocket_endpoint() -> None:
    assert long_poll_url("http://h:1") == "http://h:1/lp"
    assert long_poll_url("https://h/prefix/") == "https://h/prefix/lp"
    assert long_poll_url("ws://h:2/ws") == "http://h:2/lp"


def test_a_customer_logs_in_and_sends_over_long_polling(
        reference_service: ServiceProcess) -> None:
    async def main() -> None:
        socket = await open_long_poll(f"{reference_service.base_url}/lp", scaled(5))
        socket.send_now(hello("lp-1"))
        welcome = json.loads(await socket.recv())
        assert welcome["type"] == "welcome"
        socket.send_now(json.dumps({"type": "open", "ref": "r1", "channel": "web"}))
        opened = json.loads(await socket.recv())
        assert opened["type"] == "opened"
        got: list[dict[str, Any]] = []
        acked = asyncio.Event()

        def on_message(text: str | bytes) -> None:
            got.append(json.loads(text))
            if got[-1]["type"] == "ack":
                acked.set()

        socket.deliver_to(on_message)
        socket.send_now(json.dumps({"type": "send", "conversation": opened["conversation"],
                                    "client_msg_id": "m1", "text": "hello over HTTP"}))
        await acked.wait()
        assert got[-1]["client_msg_id"] == "m1"
        await socket.close()
        assert socket.closed.done()

    run(main())
    assert reference_service.stats()["accepted"] == 1


def test_the_endpoints_refuse_what_they_cannot_use(reference_service: ServiceProcess) -> None:
    async def main() -> None:
        base = f"{reference_service.base_url}/lp"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/no-such-channel") as response:
                assert response.status == 410
            async with http.post(base) as response:
                channel = f"{base}/{(await response.json())['channel']}"
            for body in (b"not json", b'{"a": 1}', b"[1, 2]"):
                async with http.post(channel, data=body) as response:
                    assert response.status == 400, body
            async with http.get(channel, params={"wait": "soon"}) as response:
                assert response.status == 400
            # A frame the protocol refuses comes back as an error frame, as over WebSocket.
            async with http.post(channel, data=b'["}{"]') as response:
                assert response.status == 200
            async with http.get(channel, params={"wait": "5"}) as response:
                frames = [json.loads(text) for text in await response.json()]
            assert frames[0]["code"] == "bad_frame"
            async with http.delete(channel) as response:
                assert response.status == 200
            async with http.get(channel, params={"wait": "1"}) as response:
                assert response.status == 410

    run(main())
    assert reference_service.stats()["bad_frames"] == 1


def test_a_channel_that_ends_closes_the_socket(reference_service: ServiceProcess) -> None:
    async def main() -> None:
        socket = await open_long_poll(f"{reference_service.base_url}/lp", scaled(5))
        # A hello for an unknown shop is fatal: the service ends the session, the socket
        # sees its channel gone and closes, as a WebSocket would.
        socket.send_now(json.dumps({"type": "hello", "role": "customer", "shop": "nope",
                                    "customer": "x"}))
        error = json.loads(await socket.recv())
        assert error["code"] == "unknown_shop"
        await asyncio.shield(socket.closed)
        await socket.close()

    run(main())


def test_what_is_written_before_close_is_delivered_in_requests_the_service_takes(
        reference_service: ServiceProcess) -> None:
    async def main() -> None:
        socket = await open_long_poll(f"{reference_service.base_url}/lp", scaled(5))
        socket.send_now(hello("lp-2"))
        assert json.loads(await socket.recv())["type"] == "welcome"
        socket.send_now(json.dumps({"type": "open", "ref": "r1", "channel": "web"}))
        opened = json.loads(await socket.recv())
        # More than one request's worth (500 frames), written at once, then closed at once.
        for i in range(600):
            socket.send_now(json.dumps({"type": "send", "conversation": opened["conversation"],
                                        "client_msg_id": f"m{i}", "text": f"message {i}"}))
        await socket.close()

    run(main())
    # The service handles the last request's frames on its own task: wait for them.
    deadline = time.monotonic() + scaled(10)
    while reference_service.stats()["accepted"] < 600 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reference_service.stats()["accepted"] == 600
