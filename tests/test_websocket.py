"""The lean WebSocket client against real servers on loopback: websockets' own server for the
protocol paths, and raw TCP servers for the misbehaving ones."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.server import ServerConnection, serve
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, Side, State
from websockets.uri import parse_uri
from websockets.utils import accept_key

from chatprobe.protocols.websocket import Message, WebSocket, connect
from tests.conftest import scaled

Handler = Callable[[ServerConnection], Awaitable[None]]


@asynccontextmanager
async def ws_server(handler: Handler) -> AsyncIterator[str]:
    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/"


@asynccontextmanager
async def raw_server(on_connect: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                          Awaitable[None]]) -> AsyncIterator[str]:
    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}/"
    finally:
        server.close()


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


def test_messages_go_both_ways_and_close_cleanly() -> None:
    async def main() -> None:
        async with ws_server(echo) as url:
            ws = await connect(url, scaled(5))
            await ws.send("before delivery")
            assert await ws.recv() == "before delivery"  # queued for recv() until deliver_to
            got: list[Message] = []
            done = asyncio.Event()

            def on_message(message: Message) -> None:
                got.append(message)
                if len(got) == 3:
                    done.set()

            ws.deliver_to(on_message)
            for text in ("a", "ü" * 70_000, "c"):  # the long one needs a 64-bit length field
                ws.send_now(text)
            async with asyncio.timeout(scaled(5)):
                await done.wait()
            assert got == ["a", "ü" * 70_000, "c"]
            await ws.close()
            assert ws.closed.done()
            with pytest.raises(ConnectionClosed):
                ws.send_now("after close")

    asyncio.run(main())


def test_fragmented_messages_are_assembled() -> None:
    async def fragments(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send(["frag", "men", "ted"])  # an iterable is sent as fragments
        await ws.send([b"\x00\x01", b"\x02"])

    async def main() -> None:
        async with ws_server(fragments) as url:
            ws = await connect(url, scaled(5))
            await ws.send("go")
            async with asyncio.timeout(scaled(5)):
                assert await ws.recv() == "fragmented"
                assert await ws.recv() == b"\x00\x01\x02"
            await ws.close()

    asyncio.run(main())


def test_refused_upgrade_raises_invalid_status() -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with raw_server(refuse) as url:
            with pytest.raises(InvalidStatus) as caught:
                await connect(url, scaled(5))
            assert caught.value.response.status_code == 403

    asyncio.run(main())


def test_garbage_instead_of_http_raises_invalid_handshake() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
        await writer.drain()
        await reader.read()  # until the client hangs up
        writer.close()

    async def main() -> None:
        async with raw_server(garbage) as url:
            with pytest.raises(InvalidHandshake):
                await connect(url, scaled(5))

    asyncio.run(main())


def test_silent_server_times_out_the_opening_handshake() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async def main() -> None:
        async with raw_server(silent) as url:
            with pytest.raises(TimeoutError):
                await connect(url, 0.3)

    asyncio.run(main())


def test_invalid_utf8_in_a_text_frame_fails_the_connection() -> None:
    async def bad_text(ws: ServerConnection) -> None:
        await ws.recv()
        # A text frame whose payload is not UTF-8, written below websockets' checks.
        ws.protocol.send_text(b"\xff\xfe")
        ws.send_data()
        await ws.wait_closed()

    async def main() -> None:
        async with ws_server(bad_text) as url:
            ws = await connect(url, scaled(5))
            await ws.send("go")
            async with asyncio.timeout(scaled(5)):
                await asyncio.shield(ws.closed)
            with pytest.raises(ConnectionClosed) as caught:
                await ws.recv()
            assert caught.value.sent is not None and caught.value.sent.code == 1007

    asyncio.run(main())


def test_a_connection_without_pongs_is_cut() -> None:
    async def never_pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key"))
        import base64
        import hashlib

        accept = base64.b64encode(hashlib.sha1(
            key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        await writer.drain()
        await reader.read()  # swallow pings without answering, until the client cuts

    async def main() -> None:
        async with raw_server(never_pong) as url:
            ws = await connect(url, scaled(5), ping_interval_s=0.05, ping_timeout_s=0.1)
            async with asyncio.timeout(scaled(5)):
                await asyncio.shield(ws.closed)

    asyncio.run(main())


def test_a_connection_reset_before_any_answer_is_a_network_failure() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    async def main() -> None:
        async with raw_server(reset) as url:
            with pytest.raises(OSError):  # not InvalidHandshake: nothing answered
                await connect(url, scaled(5))

    asyncio.run(main())


# ------------------------------------------------ the fast path against websockets' own parser


def opened_client() -> tuple[WebSocket, list[bytes]]:
    """A client past a real opening handshake, writing into a list (call inside a running
    event loop)."""
    protocol = ClientProtocol(parse_uri("ws://127.0.0.1:9/ws"), max_size=1 << 20)
    request = protocol.connect()
    protocol.send_request(request)
    written: list[bytes] = []

    class Transport:
        def write(self, data: bytes) -> None:
            written.append(bytes(data))

        def can_write_eof(self) -> bool:
            return False

        def abort(self) -> None:
            pass

    ws = WebSocket(protocol, 0, 10, 1)
    ws.transport = Transport()  # type: ignore[assignment]
    ws.data_received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                     + accept_key(request.headers["Sec-WebSocket-Key"]).encode() + b"\r\n\r\n")
    written.clear()
    return ws, written


def _server_frame(opcode: Opcode, payload: bytes, fin: bool = True) -> bytes:
    server = Protocol(Side.SERVER)  # open, between frames
    server.send_frame(Frame(opcode, payload, fin))
    return b"".join(server.data_to_send())


def _client_frames_seen_by_a_server(written: list[bytes]) -> list[Frame]:
    server = Protocol(Side.SERVER, max_size=None)  # open: parses frames, insists on masks
    server.receive_data(b"".join(written))
    return [event for event in server.events_received() if isinstance(event, Frame)]


ordinary_frames = st.one_of(
    st.text(max_size=70_000).map(lambda t: (Opcode.TEXT, t.encode())),
    st.binary(max_size=300).map(lambda b: (Opcode.BINARY, b)),
    st.binary(max_size=125).map(lambda b: (Opcode.PING, b)),
    st.binary(max_size=125).map(lambda b: (Opcode.PONG, b)))


@settings(max_examples=200, deadline=None)
@given(st.lists(ordinary_frames, max_size=8), st.lists(st.integers(1, 5000), max_size=10))
def test_the_fast_path_reads_any_stream_of_ordinary_frames_as_websockets_does(
        frames: list[tuple[Opcode, bytes]], cuts: list[int]) -> None:
    asyncio.run(_read_fast(frames, cuts))


async def _read_fast(frames: list[tuple[Opcode, bytes]], cuts: list[int]) -> None:
    ws, written = opened_client()
    received: list[Message] = []
    ws.deliver_to(received.append)
    stream = b"".join(_server_frame(opcode, payload) for opcode, payload in frames)
    at = 0
    for cut in cuts:  # the network delivers the bytes in any pieces
        ws.data_received(stream[at:at + cut])
        at += cut
    ws.data_received(stream[at:])
    assert ws._fast  # the path under test stayed in use
    expected = [payload.decode() if opcode is Opcode.TEXT else payload
                for opcode, payload in frames if opcode in (Opcode.TEXT, Opcode.BINARY)]
    assert received == expected
    # Each ping answered with a masked pong carrying its payload, as websockets would.
    pongs = _client_frames_seen_by_a_server(written)
    assert [(f.opcode, f.data) for f in pongs] == [
        (Opcode.PONG, payload) for opcode, payload in frames if opcode is Opcode.PING]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=70_000), min_size=1, max_size=4))
def test_frames_written_by_the_fast_path_parse_on_a_websockets_server(texts: list[str]) -> None:
    asyncio.run(_write_fast(texts))


async def _write_fast(texts: list[str]) -> None:
    ws, written = opened_client()
    for text in texts:
        ws.send_now(text)
    frames = _client_frames_seen_by_a_server(written)  # the server insists on masked frames
    assert [(f.opcode, f.fin, bytes(f.data).decode()) for f in frames] == [
        (Opcode.TEXT, True, text) for text in texts]
    masks = {data[2:6] if len(data) - 6 < 126 else None for data in written}
    assert len(masks - {None}) == len([d for d in written if len(d) - 6 < 126])  # fresh each


def test_answers_to_a_burst_of_frames_leave_in_one_write_in_order() -> None:
    """An agent answering a burst of messages: one write for the whole burst (a loopback
    write costs as much as a frame's Python), the pong to a ping inside it in its place, and
    a send outside a burst written at once."""
    async def main() -> None:
        ws, written = opened_client()
        ws.deliver_to(lambda message: ws.send_now(f"re: {message!r}"))
        ws.data_received(_server_frame(Opcode.TEXT, b"one") + _server_frame(Opcode.PING, b"p")
                         + _server_frame(Opcode.TEXT, b"two")
                         + _server_frame(Opcode.TEXT, b"thr"))
        assert len(written) == 1
        frames = _client_frames_seen_by_a_server(written)
        assert [(f.opcode, bytes(f.data)) for f in frames] == [
            (Opcode.TEXT, b"re: 'one'"), (Opcode.PONG, b"p"), (Opcode.TEXT, b"re: 'two'"),
            (Opcode.TEXT, b"re: 'thr'")]
        written.clear()
        ws.send_now("alone")
        assert len(written) == 1 and _client_frames_seen_by_a_server(written)[0].data == (
            b"alone")

    asyncio.run(main())


def test_a_close_or_a_fragment_mid_stream_goes_to_websockets_and_back() -> None:
    asyncio.run(_close_and_fragment())


async def _close_and_fragment() -> None:
    ws, written = opened_client()
    received: list[Message] = []
    ws.deliver_to(received.append)
    ws.data_received(_server_frame(Opcode.TEXT, b"one")
                     + _server_frame(Opcode.TEXT, b"tw", fin=False)
                     + _server_frame(Opcode.CONT, b"o"))
    ws.data_received(_server_frame(Opcode.TEXT, b"three"))
    assert received == ["one", "two", "three"] and ws._fast
    ws.data_received(_server_frame(Opcode.CLOSE, b"\x03\xe8") + _server_frame(Opcode.TEXT, b"x"))
    assert ws.protocol.state is State.CLOSING and not ws._fast
    assert received == ["one", "two", "three"]  # nothing after the close
    answer = _client_frames_seen_by_a_server(written)
    assert [f.opcode for f in answer] == [Opcode.CLOSE]  # the close echoed by websockets


def _message_frames(payload: bytes, binary: bool, pieces: int) -> bytes:
    """One message as ``pieces`` fragments (1: a single frame)."""
    opcode = Opcode.BINARY if binary else Opcode.TEXT
    if pieces <= 1 or len(payload) < pieces:
        return _server_frame(opcode, payload)
    step = len(payload) // pieces
    parts = [payload[i * step:(i + 1) * step] for i in range(pieces - 1)]
    parts.append(payload[(pieces - 1) * step:])
    return b"".join(_server_frame(opcode if i == 0 else Opcode.CONT, part,
                                  fin=i == len(parts) - 1) for i, part in enumerate(parts))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.text(max_size=40_000).map(str.encode),
                                    # Binary payloads that start like a frame header.
                                    st.binary(max_size=300).map(lambda b: b"\x81\x7e" + b)),
                          st.booleans(), st.integers(1, 4)), min_size=1, max_size=6),
       st.lists(st.integers(1, 600), max_size=30))
def test_fragments_and_any_cuts_switch_between_the_parsers_without_losing_a_byte(
        messages: list[tuple[bytes, bool, int]], cuts: list[int]) -> None:
    asyncio.run(_read_fragments(messages, cuts))


async def _read_fragments(messages: list[tuple[bytes, bool, int]], cuts: list[int]) -> None:
    ws, _ = opened_client()
    received: list[Message] = []
    ws.deliver_to(received.append)
    # A fragmented message is websockets' to read; the fast path must take over again only
    # at a frame boundary, wherever the network cuts the stream (after a bare header too).
    stream = b"".join(_message_frames(payload, binary or not _utf8(payload), pieces)
                      for payload, binary, pieces in messages)
    at = 0
    for cut in cuts:
        ws.data_received(stream[at:at + cut])
        at += cut
    ws.data_received(stream[at:])
    assert ws.protocol.state is State.OPEN
    assert received == [payload if binary or not _utf8(payload) else payload.decode()
                        for payload, binary, _ in messages]


def _utf8(payload: bytes) -> bool:
    try:
        payload.decode()
    except UnicodeDecodeError:
        return False
    return True
