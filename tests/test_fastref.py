"""The compiled engine's parts (chatprobe/swarm/_fastref.c, chatprobe/swarm/fastref.py): its
stamps and its JSON strings agree with Python's, and what a target sends it, however odd, is
read as the Python engine reads it (a real socket on loopback, the frames written by hand).
Its whole job against the reference service is in tests/test_engine.py and test_swarm.py."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.utils import accept_key

import chatprobe.swarm._fastref as compiled
from chatprobe.config import AgentCredential, TargetConfig, load_target
from chatprobe.errors import HarnessError
from chatprobe.stamp import StampCodec
from chatprobe.swarm.collector import RECEIPT_FIELDS, records
from chatprobe.swarm.engine import WorkerEngine
from chatprobe.swarm.fastref import (
    CompiledWorkerEngine,
    choose_engine,
    compiled_engine_refusal,
    upgrade_refused,
)
from chatprobe.swarm.scripts import load_script
from tests.conftest import scaled

SECRET = b"0123456789abcdef"
ids = st.text(st.characters(codec="utf-8", exclude_characters=":]"), min_size=1, max_size=20)
bodies = st.text(st.characters(codec="utf-8"), max_size=60)


def engine_for(codec: StampCodec, url: str = "http://127.0.0.1:9",
               config: TargetConfig | None = None) -> CompiledWorkerEngine:
    return CompiledWorkerEngine(url, config or load_target(None), codec, "w0",
                                script=load_script("shopper"), agents=())


@settings(max_examples=200)
@given(body=bodies, sender=ids, conversation=ids, seq=st.integers(0, 10**6),
       intended=st.integers(0, 2**62))
def test_the_compiled_stamps_are_pythons(body: str, sender: str, conversation: str, seq: int,
                                         intended: int) -> None:
    codec = StampCodec(run="run1", secret=SECRET)
    engine = engine_for(codec)._engine
    text = codec.stamp_text(body, sender, conversation, seq, intended)
    assert engine.stamp_text(body, sender, conversation, seq, intended) == text
    assert engine.check_text(text) == (conversation, seq, True, False)
    # One character changed anywhere before the stamp's end: no longer genuine.
    for index in {0, len(text) // 2, len(text) - 2}:
        changed = text[:index] + ("x" if text[index] != "x" else "y") + text[index + 1:]
        python = codec.parse(changed)
        ours = engine.check_text(changed)
        assert (ours is None) == (python is None)
        if python is not None and ours is not None:
            assert ours[2:] == (python.valid, python.foreign)
    foreign = StampCodec(run="run2", secret=SECRET).stamp_text(body, sender, conversation, seq,
                                                               intended)
    assert engine.check_text(foreign) == (conversation, seq, False, True)


@settings(max_examples=300)
@given(text=st.text(st.characters(codec="utf-8")), ascii_only=st.booleans())
def test_json_strings_read_as_python_reads_them(text: str, ascii_only: bool) -> None:
    literal = json.dumps(text, ensure_ascii=ascii_only)[1:-1]
    assert compiled.unescape(literal) == text
    assert compiled.unescape(orjson.dumps(text).decode()[1:-1]) == text


def test_a_bad_escape_is_no_text() -> None:
    for literal in ("\\", "\\x", "\\u12", "\\u12zz"):
        assert compiled.unescape(literal) is None, literal


def test_the_compiled_engine_says_why_it_cannot_drive_a_target() -> None:
    config = load_target(None)
    assert compiled_engine_refusal("http://127.0.0.1:1", config) is None
    assert "TLS" in str(compiled_engine_refusal("https://127.0.0.1:1", config))
    assert "TLS" in str(compiled_engine_refusal("http://127.0.0.1:1", config,
                                                "wss://127.0.0.1:2/ws"))
    xmpp = TargetConfig(protocol="xmpp")
    assert "reference protocol only" in str(compiled_engine_refusal("ws://h:1/ws", xmpp))
    assert choose_engine("auto", "ws://h:1/ws", xmpp) is WorkerEngine
    assert choose_engine("python", "http://127.0.0.1:1", config) is WorkerEngine
    with pytest.raises(HarnessError, match=r"--engine compiled: .*TLS"):
        choose_engine("compiled", "https://127.0.0.1:1", config)


# -- a hand-written target ---------------------------------------------------------------


def server_frame(payload: bytes, opcode: int = 1, fin: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    length = len(payload)
    if length < 126:
        return bytes((first, length)) + payload
    if length < 65536:
        return struct.pack("!BBH", first, 126, length) + payload
    return struct.pack("!BBQ", first, 127, length) + payload


def read_client_frame(connection: socket.socket, pending: bytearray) -> tuple[int, bytes]:
    """One masked client frame: (opcode, payload)."""
    def need(count: int) -> None:
        while len(pending) < count:
            chunk = connection.recv(65536)
            if not chunk:
                raise EOFError
            pending.extend(chunk)

    need(2)
    opcode, length, header = pending[0] & 0x0F, pending[1] & 0x7F, 2
    if length == 126:
        need(4)
        length, header = struct.unpack("!H", pending[2:4])[0], 4
    elif length == 127:
        need(10)
        length, header = struct.unpack("!Q", pending[2:10])[0], 10
    need(header + 4 + length)
    mask = pending[header:header + 4]
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(pending[header + 4:header + 4 + length]))
    del pending[:header + 4 + length]
    return opcode, payload


class HandWrittenTarget:
    """A loopback WebSocket server that welcomes one agent, then sends it ``frames`` (raw
    WebSocket frames) and keeps what the engine sends back."""

    def __init__(self, frames: list[bytes], host: str = "127.0.0.1") -> None:
        self.frames = frames
        self.received: list[tuple[int, bytes]] = []
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, 0), family=family)
        self.listener.settimeout(scaled(10))
        where = f"[{host}]" if ":" in host else host
        self.url = f"http://{where}:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        with connection:
            connection.settimeout(scaled(10))
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = connection.recv(4096)
                if not chunk:
                    return  # the engine went before its upgrade: nothing to serve
                head += chunk
            key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key:"))
            connection.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                               b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                               + accept_key(key.decode()).encode() + b"\r\n\r\n")
            pending = bytearray()
            self.received.append(read_client_frame(connection, pending))  # the hello
            connection.sendall(server_frame(orjson.dumps({
                "type": "welcome", "role": "agent", "protocol": 1, "client_supported": True,
                "last_id": 0})))
            connection.sendall(b"".join(self.frames))
            try:
                while True:
                    self.received.append(read_client_frame(connection, pending))
            except (EOFError, OSError):
                return

    def close(self) -> None:
        self.listener.close()
        self.thread.join(scaled(10))


@pytest.fixture
def codec() -> StampCodec:
    return StampCodec(run="run1", secret=SECRET)


@pytest.fixture
def agent_engine() -> Iterator[list[CompiledWorkerEngine]]:
    started: list[CompiledWorkerEngine] = []
    yield started
    for engine in started:
        engine.stop()


def start_agent(started: list[CompiledWorkerEngine], codec: StampCodec,
                target: HandWrittenTarget) -> CompiledWorkerEngine:
    config = load_target(None)
    engine = CompiledWorkerEngine(target.url, config, codec, "w0", script=load_script("shopper"),
                                  agents=[AgentCredential("probe-1", "token-1")])
    started.append(engine)
    engine.start(time.sleep)
    return engine


def wait_for(engine: CompiledWorkerEngine, seen: dict[str, list[Any]], what: str,
             done: Any) -> None:
    deadline = time.monotonic() + scaled(10)
    while True:
        batch = engine.take_batch(None)
        seen.setdefault("receipts", []).extend(records(batch["receipts"], RECEIPT_FIELDS))
        seen.setdefault("events", []).extend(engine.out.events)
        engine.out.events.clear()
        if done(seen):
            return
        assert time.monotonic() < deadline, f"no {what} in time: {seen}"
        time.sleep(0.02)  # polling interval of a bounded wait, not a synchronisation


def message(codec: StampCodec, message_id: int, body: str, seq: int) -> bytes:
    text = codec.stamp_text(body, "w0c1-1", "w0c1-1", seq, 1000)
    return orjson.dumps({"type": "message", "id": message_id, "conversation": 7,
                         "customer": "c1", "text": text, "ts": 1.0})


def test_odd_but_valid_frames_are_read_as_python_reads_them(
        codec: StampCodec, agent_engine: list[CompiledWorkerEngine]) -> None:
    huge = "货" * 70_000  # 210 KB of UTF-8, longer than the longest text the service takes
    fragmented = message(codec, 3, "in three pieces", seq=4)
    frames = [
        server_frame(message(codec, 1, huge, seq=5)),  # the complaint: the agent answers
        server_frame(b"", opcode=9),  # a ping: answered with a pong
        server_frame(message(codec, 1, huge, seq=5)),  # the same push again (a replay)
        server_frame(message(codec, 2, huge, seq=5)),  # the platform duplicated it
        server_frame(fragmented[:10], fin=False),
        server_frame(fragmented[10:20], opcode=0, fin=False),
        server_frame(b'{"type": "status", "conversation": 7, "nested": {"a": [1, "}"]}}'),
        server_frame(fragmented[20:], opcode=0),
        server_frame(json.dumps({"type": "message", "id": 4, "conversation": 7,
                                 "text": codec.stamp_text("escaped \"\\ é 😀", "w0c1-1",
                                                          "w0c1-1", 1, 5)},
                                ensure_ascii=True).encode()),
    ]
    target = HandWrittenTarget(frames)
    engine = start_agent(agent_engine, codec, target)
    try:
        seen: dict[str, list[Any]] = {}
        wait_for(engine, seen, "four receipts", lambda s: len(s["receipts"]) >= 4)
        deadline = time.monotonic() + scaled(10)
        while not any(op == 10 for op, _ in target.received) or not any(
                op == 1 for op, _ in target.received[1:]):
            assert time.monotonic() < deadline, target.received
            time.sleep(0.02)  # polling interval of a bounded wait
    finally:
        engine.stop()
        target.close()
    # The replayed push is not a receipt; the platform's duplicate is (the ledger counts it).
    assert [(conversation, seq) for conversation, seq, *_ in seen["receipts"]] == [
        ("w0c1-1", 5), ("w0c1-1", 5), ("w0c1-1", 4), ("w0c1-1", 1)]
    assert {receiver for _, _, receiver, _ in seen["receipts"]} == {"probe-1"}
    hello = orjson.loads(target.received[0][1])
    assert hello == {"type": "hello", "role": "agent", "shop": "demo", "agent": "probe-1",
                     "token": "token-1", "client_version": "5.0.0"}
    assert (10, b"") in target.received  # the pong
    replies = [orjson.loads(payload) for op, payload in target.received[1:] if op == 1]
    assert len(replies) == 1, replies  # a person answers a question once
    reply = replies[0]
    assert (reply["type"], reply["conversation"], reply["client_msg_id"]) == (
        "reply", 7, "run1-r-w0c1-1-5")
    stamp = codec.parse(reply["text"])
    assert stamp is not None and stamp.valid
    assert (stamp.sender, stamp.conversation, stamp.seq) == ("probe-1", "w0c1-1>r", 5)


def test_a_frame_that_is_not_json_ends_the_link_with_a_named_cause(
        codec: StampCodec, agent_engine: list[CompiledWorkerEngine]) -> None:
    target = HandWrittenTarget([server_frame(message(codec, 1, "fine", seq=1)),
                                server_frame(b'{"type": "message", "text": "unterminated')])
    engine = start_agent(agent_engine, codec, target)
    try:
        seen: dict[str, list[Any]] = {}
        wait_for(engine, seen, "the link's death",
                 lambda s: any("dead" in event for event in s["events"]))
    finally:
        target.close()
    assert len(seen["receipts"]) == 1
    assert [event for event in seen["events"] if "dead" in event] == [
        "probe-1 dead: protocol.invalid_frames: bad frame from target: not a JSON object "
        "with a string type"]


def test_an_ipv6_target_is_reached_over_ipv6(
        codec: StampCodec, agent_engine: list[CompiledWorkerEngine]) -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("this host has no IPv6 loopback")
    target = HandWrittenTarget([server_frame(message(codec, 1, "over IPv6", seq=1))],
                               host="::1")
    engine = start_agent(agent_engine, codec, target)
    try:
        seen: dict[str, list[Any]] = {}
        wait_for(engine, seen, "a receipt", lambda s: len(s["receipts"]) == 1)
    finally:
        engine.stop()
        target.close()


def test_a_target_that_refuses_the_upgrade_is_left_to_the_python_engine() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def refuse() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(4096)
            connection.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    try:
        config = load_target(None)
        assert upgrade_refused(f"http://127.0.0.1:{port}", scaled(5))
        thread.join(scaled(5))
        thread = threading.Thread(target=refuse, daemon=True)
        thread.start()
        assert choose_engine("auto", f"http://127.0.0.1:{port}", config) is WorkerEngine
    finally:
        listener.close()
        thread.join(scaled(5))
    # Nothing listens (port 9, discard, is closed here): not a refusal; the engine reports
    # the failure itself.
    assert not upgrade_refused("http://127.0.0.1:9", scaled(5))
