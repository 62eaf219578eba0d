"""The benchmark's servers speak what the benchmark needs: the relay the reference protocol as
the reference adapter uses it (a swarm measured against a relay that misroutes would report
loss as the generator's number), the echo server plain WebSocket echo."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import websocket

from chatprobe.config import AgentCredential, TargetConfig
from chatprobe.protocols.reference import ReferenceAdapter
from tests.conftest import scaled, stop_process
from tests.servers import free_port, wait_for_port

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def start(script: str, tmp_path: Path) -> Iterator[int]:
    port = free_port()
    log = tmp_path / f"{script}.log"
    with log.open("wb") as output:
        proc = subprocess.Popen([sys.executable, str(BENCHMARKS / script), str(port)],
                                stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, script, log)
        yield port
    finally:
        stop_process(proc)


@pytest.fixture
def relay_port(tmp_path: Path) -> Iterator[int]:
    yield from start("relay_server.py", tmp_path)


@pytest.fixture
def echo_port(tmp_path: Path) -> Iterator[int]:
    yield from start("echo_server.py", tmp_path)


def test_the_relay_carries_a_message_its_reply_and_their_acks(relay_port: int) -> None:
    config = TargetConfig(agents=(AgentCredential("agent-1", "token"),))

    async def run() -> tuple[str, str | None, str, str, str]:
        adapter = ReferenceAdapter(f"http://127.0.0.1:{relay_port}", config)
        at_agent: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()
        at_customer: asyncio.Queue[str] = asyncio.Queue()
        agent = await adapter.login_agent(config.agents[0],
                                          lambda text, sid: at_agent.put_nowait((text, sid)),
                                          lambda kind, detail: None)
        customer = await adapter.connect_customer(
            "customer-1", lambda text, sid: at_customer.put_nowait(text),
            lambda kind, detail: None)
        try:
            async with asyncio.timeout(scaled(10)):
                conversation = await customer.open_conversation("round-1", "web")
                ack = await (await customer.send(conversation.id, "m-1", "is it in stock?"))
                text, server_id = await at_agent.get()
                assert server_id is not None
                reply = await agent.reply_to(server_id, "r-1", "yes, it ships tonight")
                assert reply is not None
                reply_ack = await reply
                answer = await at_customer.get()
                await customer.close_conversation(conversation.id)
        finally:
            await customer.close()
            await agent.close()
            await adapter.close()
        return text, conversation.agent, answer, ack.server_id, reply_ack.server_id

    text, assigned_to, answer, ack_id, reply_ack_id = asyncio.run(run())
    assert text == "is it in stock?"
    assert assigned_to == "agent-1"
    assert answer == "yes, it ships tonight"
    # The relay numbers messages as the service does, one id per message.
    assert ack_id.isdigit() and reply_ack_id.isdigit() and reply_ack_id != ack_id


def test_the_echo_server_echoes(echo_port: int) -> None:
    ws = websocket.create_connection(f"ws://127.0.0.1:{echo_port}/", timeout=scaled(10))
    try:
        for text in ("hello", "is the down jacket in stock in size XL?" * 50):
            ws.send(text)
            assert ws.recv() == text
    finally:
        ws.close()
