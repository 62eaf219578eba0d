"""A lean WebSocket client: websockets' sans-I/O protocol driven by a plain asyncio.Protocol.

The swarm holds thousands of connections in one thread and handles every frame of every
message, so the per-frame path matters. websockets' own asyncio connection costs a task
wake-up, an async iterator step, a lock and an async context manager per frame; here a frame
is parsed in ``data_received`` and handed to a callback at once, and a send is one write.
The protocol state machine (handshake, framing, masking, ping/pong, closing) stays
websockets', which is well kept and tested; this module only moves bytes and keeps time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
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

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not inherit from asyncio.Transport; they behave like one.
        self.transport = cast(asyncio.Transport, transport)
        self.protocol.send_request(self.protocol.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
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
        elif opcode is Opcode.PONG and self._ping_payload is not None and (
                bytes(frame.data) == self._ping_payload):
            self._ping_payload = None
            if self._pong_deadline is not None:
                self._pong_deadline.cancel()
                self._pong_deadline = None
            self._schedule_ping()
        # PING is answered by the protocol itself; CLOSE moves its state machine.

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

    def _flush(self) -> None:
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
        """Write one text message now; raises ConnectionClosed when the connection is gone."""
        protocol = self.protocol
        if protocol.state is not State.OPEN or self.transport is None:
            raise self._closed_error()
        protocol.send_text(message.encode())
        self._flush()

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
                  tls: ssl.SSLContext | None = None) -> WebSocket:
    """Open a connection and complete the opening handshake. Raises websockets' InvalidURI,
    InvalidStatus or InvalidHandshake, OSError, or TimeoutError."""
    uri = parse_uri(url)
    protocol = ClientProtocol(uri, subprotocols=[Subprotocol(p) for p in subprotocols]
                              if subprotocols else None, max_size=max_size)
    loop = asyncio.get_running_loop()
    context = (tls or ssl.create_default_context()) if uri.secure else None
    async with asyncio.timeout(open_timeout_s):
        _, ws = await loop.create_connection(
            lambda: WebSocket(protocol, ping_interval_s, ping_timeout_s, close_timeout_s),
            uri.host, uri.port, ssl=context)
        try:
            await ws.opened
        except BaseException:
            ws.abort()
            raise
    return ws
