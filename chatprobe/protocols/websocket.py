"""A lean WebSocket client: websockets' sans-I/O protocol driven by a plain asyncio.Protocol.

The swarm holds thousands of connections in one thread and handles every frame of every
message, so the per-frame path matters. websockets' own asyncio connection costs a task
wake-up, an async iterator step, a lock and an async context manager per frame; here a frame
is parsed in ``data_received`` and handed to a callback at once, and a send is one write (or,
while a burst of incoming frames is handled, one write for the burst's answers at its end).
The protocol state machine (handshake, closing, every unusual frame) stays websockets',
which is well kept and tested. Once the connection is open, the frames a chat connection
carries all day (whole text and binary messages, pings, pongs) are parsed and written here
directly: websockets' generator-driven parser, its frame serializer and its per-frame
urandom call for the mask were about a fifth of the swarm worker's loop. Anything else (a
close, a fragment, reserved bits, a masked or oversized frame) goes to websockets from that
byte on, until the connection is open and between frames again, so its errors and close
codes stay exactly websockets'.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import struct
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, ConnectionClosedError
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

try:
    from websockets.speedups import apply_mask
except ImportError:  # a websockets built without its C extension
    from websockets.utils import apply_mask

_masks: list[bytes] = []


# A child forked after the pool filled must not reuse the parent's masks.
os.register_at_fork(after_in_child=_masks.clear)


def _next_mask() -> bytes:
    """A fresh 4-byte mask (RFC 6455 5.3: from a strong source), urandom read 4 KB at a
    time instead of once per frame."""
    if not _masks:
        pool = os.urandom(4096)
        _masks.extend(pool[i:i + 4] for i in range(0, 4096, 4))
    return _masks.pop()


def client_frame(first_byte: int, payload: bytes) -> bytes:
    """One masked client frame (``first_byte``: FIN and opcode) with ``payload``."""
    length = len(payload)
    mask = _next_mask()
    if length < 126:
        header = bytes((first_byte, 0x80 | length))
    elif length < 65536:
        header = struct.pack("!BBH", first_byte, 0xFE, length)
    else:
        header = struct.pack("!BBQ", first_byte, 0xFF, length)
    return header + mask + apply_mask(payload, mask)


FIN_TEXT, FIN_PONG = 0x81, 0x8A

Message = str | bytes


class MessageSocket(Protocol):
    """What a ReconnectingLink needs of a connection: this module's WebSocket, or the
    long-polling socket of protocols/longpoll.py."""

    closed: asyncio.Future[None]

    def send_now(self, message: str) -> None: ...

    async def send(self, message: str) -> None: ...

    async def recv(self) -> Message: ...

    def deliver_to(self, on_message: Callable[[Message], None]) -> None: ...

    def abort(self) -> None: ...

    async def close(self) -> None: ...


class Inbox:
    """Incoming messages of a connection: before :meth:`deliver_to` they queue for
    :meth:`recv` (a login exchange); afterwards each goes to the callback as it arrives."""

    closed: asyncio.Future[None]

    def __init__(self) -> None:
        self._queued: deque[Message] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._on_message: Callable[[Message], None] | None = None

    def _closed_error(self) -> ConnectionClosed:
        return ConnectionClosedError(None, None)

    def _deliver(self, message: Message) -> None:
        if self._on_message is not None:
            self._on_message(message)
        else:
            self._queued.append(message)
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def recv(self) -> Message:
        """The next message, for a login exchange before :meth:`deliver_to`."""
        while not self._queued:
            if self.closed.done():
                raise self._closed_error()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queued.popleft()

    def deliver_to(self, on_message: Callable[[Message], None]) -> None:
        """From now on hand each message to ``on_message`` (queued ones first)."""
        while self._queued:
            on_message(self._queued.popleft())
        self._on_message = on_message


def _between_frames(protocol: ClientProtocol) -> bool:
    """Whether websockets' parser waits for the first byte of a frame. An empty buffer is not
    enough: its frame parser takes a header off the buffer before it waits for the payload.
    At a frame boundary the innermost generator of its parser is the reader's ``at_eof``;
    anything else (or another websockets' layout) keeps the fast path off, which is only
    slower."""
    if protocol.reader.buffer:
        return False
    generator = protocol.parser
    while (inner := getattr(generator, "gi_yieldfrom", None)) is not None:
        generator = inner
    code = getattr(generator, "gi_code", None)
    return code is not None and code.co_name == "at_eof"


class WebSocket(Inbox, asyncio.Protocol):
    """One client connection over websockets' sans-I/O protocol."""

    def __init__(self, protocol: ClientProtocol, ping_interval_s: float, ping_timeout_s: float,
                 close_timeout_s: float) -> None:
        self.protocol = protocol
        self.transport: asyncio.Transport | None = None
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.close_timeout_s = close_timeout_s
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed = loop.create_future()
        super().__init__()
        self._fragments: list[bytes] = []
        self._received_any = False
        self._fragment_text = False
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_payload: bytes | None = None
        self._pong_deadline: asyncio.TimerHandle | None = None
        # The fast path (see the module's docstring): on while open and between frames.
        self._fast = False
        self._partial = b""  # the start of a frame not yet complete
        # Frames written while this connection's incoming frames are handled (an agent's
        # replies to a burst of messages) leave in one write after the burst: on loopback a
        # write costs as much as all of a frame's Python, waking the peer included.
        self._held: list[bytes] | None = None

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not inherit from asyncio.Transport; they behave like one.
        self.transport = cast(asyncio.Transport, transport)
        self.protocol.send_request(self.protocol.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self._fast:
            self._parse_fast(data)
            return
        self._received_any = True
        protocol = self.protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Frame):
                self._frame(event)
            elif isinstance(event, Response) and not self.opened.done():
                if protocol.handshake_exc is None:
                    self.opened.set_result(None)
                    self._schedule_ping()
                else:
                    self.opened.set_exception(protocol.handshake_exc)
        if protocol.handshake_exc is not None and not self.opened.done():
            self.opened.set_exception(protocol.handshake_exc)  # not even an HTTP response
        self._flush()
        # Between frames of an open connection with nothing of websockets' own pending.
        self._fast = (protocol.state is State.OPEN and protocol.handshake_exc is None
                      and self.opened.done() and not protocol.extensions
                      and protocol.current_size is None and _between_frames(protocol)
                      and self.transport is not None)

    def _parse_fast(self, data: bytes) -> None:
        self._held = []
        try:
            self._parse_frames(data)
        finally:
            self._write_held()

    def _write_held(self) -> None:
        held, self._held = self._held, None
        if held and self.transport is not None:
            self.transport.write(held[0] if len(held) == 1 else b"".join(held))

    def _parse_frames(self, data: bytes) -> None:
        buffer = self._partial + data if self._partial else data
        self._partial = b""
        end, at = len(buffer), 0
        limit = self.protocol.max_message_size
        # Straight to the reader's callback once it is set (deliver_to runs in a task of its
        # own, never inside this loop): a call less for every frame of every message.
        deliver = self._on_message or self._deliver
        while end - at >= 2:
            first, second = buffer[at], buffer[at + 1]
            length = second & 0x7F
            header = 2
            if length == 126:
                if end - at < 4:
                    break
                length, header = (buffer[at + 2] << 8) | buffer[at + 3], 4
            elif length == 127:
                if end - at < 10:
                    break
                length, header = int.from_bytes(buffer[at + 2:at + 10]), 10
            # FIN set, no reserved bits, a server frame (unmasked), within the size limit:
            # anything else is websockets' to handle, from its first byte.
            if first & 0xF0 != 0x80 or second & 0x80 or (limit is not None and length > limit):
                self._leave_fast(buffer[at:])
                return
            if end - at < header + length:
                break
            start = at + header
            payload = buffer[start:start + length]
            at = start + length
            opcode = first & 0x0F
            if opcode == 1:
                try:
                    text = payload.decode()
                except UnicodeDecodeError:
                    # RFC 6455 8.1: fail the connection; the reader then sees it closed.
                    self.protocol.fail(1007, "invalid UTF-8 in a text frame")
                    self._flush()
                    self._leave_fast(buffer[at:])
                    return
                deliver(text)
            elif opcode == 2:
                deliver(payload)
            elif opcode == 9 and length <= 125:
                if self.transport is not None and self.protocol.state is State.OPEN:
                    self._write(client_frame(FIN_PONG, payload))
            elif opcode == 10 and length <= 125:
                self._pong(payload)
            else:  # a close, an unknown opcode, an oversized control frame
                self._leave_fast(buffer[at - header - length:])
                return
        if at < end:
            self._partial = buffer[at:]

    def _leave_fast(self, rest: bytes) -> None:
        self._fast = False
        self._partial = b""
        if rest:
            self.data_received(rest)

    def eof_received(self) -> bool:
        self.protocol.receive_eof()
        self._flush()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.protocol.receive_eof()  # the state machine ends up CLOSED: close_exc works
        for timer in (self._ping_timer, self._pong_deadline):
            if timer is not None:
                timer.cancel()
        if not self.opened.done():
            # Closed before any answer: a network failure (reset, refused behind a proxy),
            # not a server speaking the wrong protocol, whatever the state machine says.
            refusal = self.protocol.handshake_exc if self._received_any else None
            self.opened.set_exception(refusal or exc or ConnectionResetError(
                "connection closed during the WebSocket handshake"))
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake()

    # -- frames ------------------------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                data = bytes(frame.data)
                self._message(self._text(data) if opcode is Opcode.TEXT else data)
            else:
                self._fragment_text = opcode is Opcode.TEXT
                self._fragments = [bytes(frame.data)]
        elif opcode is Opcode.CONT:
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                data = b"".join(self._fragments)
                self._fragments = []
                self._message(self._text(data) if self._fragment_text else data)
        elif opcode is Opcode.PONG:
            self._pong(bytes(frame.data))
        # PING is answered by the protocol itself; CLOSE moves its state machine.

    def _pong(self, payload: bytes) -> None:
        if self._ping_payload is not None and payload == self._ping_payload:
            self._ping_payload = None
            if self._pong_deadline is not None:
                self._pong_deadline.cancel()
                self._pong_deadline = None
            self._schedule_ping()

    def _text(self, data: bytes) -> str | None:
        try:
            return data.decode()
        except UnicodeDecodeError:
            # RFC 6455 8.1: fail the connection; the reader then sees it closed.
            self.protocol.fail(1007, "invalid UTF-8 in a text frame")
            return None

    def _message(self, message: Message | None) -> None:
        if message is not None:
            self._deliver(message)

    # -- keepalive ---------------------------------------------------------------------

    def _schedule_ping(self) -> None:
        if self.ping_interval_s > 0 and self.transport is not None:
            self._ping_timer = self._loop.call_later(self.ping_interval_s, self._ping)

    def _ping(self) -> None:
        if self.protocol.state is not State.OPEN or self.transport is None:
            return
        self._ping_payload = self._loop.time().hex().encode()
        self.protocol.send_ping(self._ping_payload)
        self._flush()
        # No pong in time: the network ate the connection silently; cut it like a drop.
        self._pong_deadline = self._loop.call_later(self.ping_timeout_s, self.abort)

    # -- the API -----------------------------------------------------------------------

    def _write(self, frame: bytes) -> None:
        held = self._held
        if held is not None:
            held.append(frame)
        else:
            assert self.transport is not None
            self.transport.write(frame)

    def _flush(self) -> None:
        self._write_held()  # what this side wrote first goes first
        transport = self.transport
        if transport is None:
            return
        for data in self.protocol.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()
        if self.protocol.close_expected() and not self.closed.done():
            self._loop.call_later(self.close_timeout_s, self.abort)

    def send_now(self, message: str) -> None:
        """Write one text message (while a burst of incoming frames is handled, at its end);
        raises ConnectionClosed when the connection is gone."""
        protocol = self.protocol
        transport = self.transport
        if protocol.state is not State.OPEN or transport is None:
            raise self._closed_error()
        if protocol.extensions:  # never negotiated today; websockets would compress
            protocol.send_text(message.encode())
            self._flush()
        else:
            self._write(client_frame(FIN_TEXT, message.encode()))

    async def send(self, message: str) -> None:
        self.send_now(message)

    def _closed_error(self) -> ConnectionClosed:
        try:
            return self.protocol.close_exc
        except AssertionError:  # the state machine has not seen a close yet
            return ConnectionClosedError(None, None)

    def abort(self) -> None:
        """Cut the TCP connection without a closing handshake."""
        if self.transport is not None:
            self.transport.abort()

    async def close(self) -> None:
        """Closing handshake, bounded by the close timeout; then the socket goes."""
        if self.transport is not None and self.protocol.state is State.OPEN:
            self.protocol.send_close(1000)
            self._flush()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.close_timeout_s):
                await asyncio.shield(self.closed)
        self.abort()


async def connect(url: str, open_timeout_s: float, subprotocols: list[str] | None = None,
                  max_size: int = 1 << 20, ping_interval_s: float = 10.0,
                  ping_timeout_s: float = 10.0, close_timeout_s: float = 2.0,
                  tls: ssl.SSLContext | None = None,
                  server_hostname: str | None = None) -> WebSocket:
    """Open a connection and complete the opening handshake. Raises websockets' InvalidURI,
    InvalidStatus or InvalidHandshake, OSError, or TimeoutError.
    ``server_hostname``: for a wss:// URL, the name to verify the certificate against and
    send as SNI instead of the URL's host (a fault proxy's address stands in the URL)."""
    uri = parse_uri(url)
    protocol = ClientProtocol(uri, subprotocols=[Subprotocol(p) for p in subprotocols]
                              if subprotocols else None, max_size=max_size)
    loop = asyncio.get_running_loop()
    context = (tls or ssl.create_default_context()) if uri.secure else None
    async with asyncio.timeout(open_timeout_s):
        _, ws = await loop.create_connection(
            lambda: WebSocket(protocol, ping_interval_s, ping_timeout_s, close_timeout_s),
            uri.host, uri.port, ssl=context,
            server_hostname=server_hostname if context is not None else None)
        try:
            await ws.opened
        except BaseException:
            ws.abort()
            raise
    return ws
