"""A WebSocket client connection that survives reconnects: shared by WebSocket adapters.

Subclasses say how to log in (:meth:`ReconnectingLink.handshake`) and what to do with each
frame (:meth:`ReconnectingLink.on_raw`); this class owns connecting, error mapping to
diagnosis causes, the reader task, reconnect with back-off inside the target's
``reconnect_window_s``, and failing every waiting future when the link dies for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import aiohttp
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from chatprobe.config import TargetConfig
from chatprobe.diagnosis import Cause
from chatprobe.errors import HarnessError, TargetError
from chatprobe.protocols.base import Ack, AckSink, Frame, OnEvent
from chatprobe.protocols.longpoll import open_long_poll
from chatprobe.protocols.websocket import Message, MessageSocket, WebSocket, connect

# Causes a retry cannot cure: the link gives up at once instead of hammering the target.
PERMANENT = frozenset({Cause.AUTH_REJECTED, Cause.SESSION_EXPIRED, Cause.ACCOUNT_FROZEN,
                       Cause.PROTOCOL})


async def open_websocket(url: str, config: TargetConfig,
                         subprotocols: list[str] | None = None) -> WebSocket:
    """Connect, turning every failure into a HarnessError (our fault) or TargetError."""
    try:
        tls = config.tls_context() if url.startswith("wss:") else None
    except (OSError, ssl.SSLError) as exc:
        raise HarnessError(f"cannot use the TLS files of the target config: {exc}") from None
    try:
        return await connect(url, config.connect_timeout_s, subprotocols,
                             ping_interval_s=config.heartbeat_interval_s,
                             ping_timeout_s=config.heartbeat_timeout_s, tls=tls,
                             server_hostname=config.tls_server_name)
    except InvalidURI as exc:
        raise HarnessError(f"malformed target URL: {exc}") from None
    except InvalidStatus as exc:
        raise TargetError(Cause.UPGRADE_REFUSED, f"WebSocket upgrade refused: HTTP "
                                                 f"{exc.response.status_code}") from None
    except InvalidHandshake as exc:
        raise TargetError(Cause.PROTOCOL, f"WebSocket handshake failed: {exc}") from None
    except ssl.SSLCertVerificationError as exc:
        raise tls_error(url, exc, config.tls_server_name) from None
    except ssl.SSLError as exc:
        raise TargetError(Cause.TLS_FAILED, f"{url}: {exc.reason or exc}") from None
    except TimeoutError:
        # A refused or unreachable host fails at once; silence means something hangs.
        raise TargetError(Cause.TRANSPORT, f"{url}: no answer within "
                                           f"{config.connect_timeout_s:g} s (the target or "
                                           "the network hangs)") from None
    except OSError as exc:
        raise TargetError(Cause.TRANSPORT, f"{url}: {exc.strerror or exc}") from None


# OpenSSL's verify codes for the certificate failures an operator fixes differently.
TLS_VERIFY_CAUSES = {
    9: Cause.TLS_EXPIRED, 10: Cause.TLS_EXPIRED,  # not yet valid, expired
    62: Cause.TLS_HOST_NAME,  # X509_V_ERR_HOSTNAME_MISMATCH
    64: Cause.TLS_HOST_NAME,  # X509_V_ERR_IP_ADDRESS_MISMATCH
    18: Cause.TLS_UNKNOWN_CA, 19: Cause.TLS_UNKNOWN_CA,  # self-signed (in the chain)
    20: Cause.TLS_UNKNOWN_CA, 21: Cause.TLS_UNKNOWN_CA,  # unknown issuer
}


def tls_error(url: str, exc: ssl.SSLCertVerificationError,
              server_name: str | None = None) -> TargetError:
    """A certificate failure as its own diagnosis: expired, wrong name, unknown CA.
    ``server_name``: the name verified when it is not the URL's host (a proxy between)."""
    cause = TLS_VERIFY_CAUSES.get(exc.verify_code, Cause.TLS_FAILED)
    where = url if server_name is None else f"{url} (verified as {server_name})"
    return TargetError(cause, f"{where}: {exc.verify_message or exc.reason}")


class SeenIds:
    """A bounded set of ids already passed to the harness, oldest forgotten first."""

    def __init__(self, limit: int = 200_000) -> None:
        self.limit = limit
        self._ids: set[Hashable] = set()
        self._order: deque[Hashable] = deque()

    def first_time(self, key: Hashable) -> bool:
        """True the first time ``key`` is seen (and remembers it)."""
        if key in self._ids:
            return False
        self._ids.add(key)
        self._order.append(key)
        if len(self._order) > self.limit:
            self._ids.discard(self._order.popleft())
        return True


# Message ids an agent remembers the conversation (room, sender) of, to answer them.
REPLY_MEMORY = 100_000
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class RecentMap(OrderedDict[K, V]):
    """A mapping that keeps its newest ``limit`` entries (an agent's memory of which
    conversation each message it received was in, for its replies). Not a plain dict
    evicting with ``del d[next(iter(d))]``: CPython leaves the deleted entries at the front
    until the next resize and walks them on every call, about 78 µs per message once 100,000
    entries are kept."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def remember(self, key: K, value: V) -> None:
        self[key] = value
        if len(self) > self.limit:
            self.popitem(last=False)


# What a request waiting for its answer gets when its connection is lost: ask again.
_ASK_AGAIN = object()
_UNTAGGED = object()  # a client id without a tag: its ack has a future, or is unknown


def _no_answer() -> TargetError:
    return TargetError(Cause.TRANSPORT, "no answer to a request in time")


def _time_out(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(_no_answer())


class ReconnectingLink(ABC):
    def __init__(self, url: str, config: TargetConfig, on_event: OnEvent,
                 subprotocols: list[str] | None = None,
                 fallback_url: str | None = None) -> None:
        """``fallback_url``: the protocol's long-polling endpoint, used when the WebSocket
        upgrade is refused and the config allows it (``long_poll_fallback``)."""
        self.url = url
        self.fallback_url = fallback_url
        self.transport = "websocket"
        self.config = config
        self.on_event = on_event
        self.subprotocols = subprotocols
        self.ws: MessageSocket | None = None
        self.dead: TargetError | None = None
        self.closing = False
        self.ack_futures: dict[str, asyncio.Future[Ack]] = {}
        self.other_futures: dict[Hashable, asyncio.Future[Any]] = {}
        # Sends whose outcome goes to ack_sink rather than a future: client id -> tag.
        self.ack_tags: dict[str, Any] = {}
        self.ack_sink: AckSink | None = None
        self.reader: asyncio.Task[None] | None = None
        # Set while a logged-in connection is up (and once the link is dead, to wake waiters).
        self.connected = asyncio.Event()
        self._closer: asyncio.Task[None] | None = None
        # The last frames both ways, as evidence around a lost message (off by default: the
        # swarm's hot path does not pay for it). Login frames are never kept (credentials).
        self.frames: deque[Frame] | None = None

    # -- what a protocol provides ------------------------------------------------------

    @abstractmethod
    async def handshake(self, ws: MessageSocket, resume: bool) -> None:
        """Log in on a fresh connection; raise TargetError if refused. On ``resume``, also
        resend whatever was not acknowledged before the connection dropped."""

    @abstractmethod
    def on_raw(self, raw: str | bytes) -> None:
        """Handle one frame from the target; raise TargetError(PROTOCOL) for garbage."""

    async def goodbye(self, ws: MessageSocket) -> None:  # noqa: B027 - optional hook
        """Say goodbye in the protocol before the socket closes (optional)."""

    # -- the machinery -----------------------------------------------------------------

    async def _open(self, resume: bool) -> None:
        ws: MessageSocket
        try:
            ws = await open_websocket(self.url, self.config, self.subprotocols)
        except TargetError as exc:
            if not (exc.cause is Cause.UPGRADE_REFUSED and self.fallback_url
                    and self.config.long_poll_fallback):
                raise
            ws = await self._open_long_poll(exc)
        try:
            await self.handshake(ws, resume)
        except (ConnectionClosed, OSError):
            await ws.close()
            raise TargetError(Cause.TRANSPORT, "connection closed during login") from None
        except TimeoutError:
            await ws.close()
            raise TargetError(Cause.TRANSPORT, "no answer during login") from None
        except BaseException:
            await ws.close()
            raise
        self.ws = ws
        self.connected.set()
        # Cleared by a callback on the close itself, which runs before any waiter on the
        # same future resumes: a request that saw the close never finds `connected` stale.
        ws.closed.add_done_callback(lambda _: self._lost(ws))

    def _lost(self, ws: MessageSocket) -> None:
        if self.ws is ws and self.dead is None:
            self.connected.clear()
            # Requests waiting for an answer on this connection ask again on the next.
            for future in self.other_futures.values():
                if not future.done():
                    future.set_result(_ASK_AGAIN)

    async def _open_long_poll(self, refusal: TargetError) -> MessageSocket:
        assert self.fallback_url is not None
        try:
            tls = self.config.tls_context() if self.fallback_url.startswith("https:") else None
            socket = await open_long_poll(self.fallback_url, self.config.connect_timeout_s,
                                          tls, self.config.tls_server_name if tls else None)
        except aiohttp.ClientResponseError as exc:
            raise TargetError(Cause.UPGRADE_REFUSED, f"{refusal.detail}; long-polling "
                                                     f"fallback refused too: HTTP "
                                                     f"{exc.status}") from None
        except (aiohttp.ClientError, OSError, TimeoutError, KeyError, TypeError,
                ValueError) as exc:
            raise TargetError(Cause.TRANSPORT, f"{refusal.detail}; long-polling fallback "
                                               f"failed: {type(exc).__name__}: {exc}") \
                from None
        if self.transport != "long-poll":
            self.transport = "long-poll"
            self.on_event("fallback", f"{refusal.detail}; long-polling instead")
        return socket

    async def start(self) -> None:
        await self._open(resume=False)
        self.reader = asyncio.get_running_loop().create_task(self._read_forever())

    async def recv_login(self, ws: MessageSocket) -> str | bytes:
        """One frame during login, bounded by the connect timeout."""
        async with asyncio.timeout(self.config.connect_timeout_s):
            return await ws.recv()

    def keep_frames(self, count: int) -> None:
        self.frames = deque(maxlen=count) if count > 0 else None

    def _dispatch(self, raw: Message) -> None:
        if self.dead is not None:
            return
        if self.frames is not None:
            self.frames.append((time.monotonic_ns() // 1000, "in", raw if isinstance(
                raw, str) else raw.decode("utf-8", "replace")))
        self.guarded(self.on_raw, raw)

    def guarded(self, handle: Callable[[Any], None], frame: Any) -> None:
        """Run a frame's handler: a protocol error ends the link; anything else is a harness
        bug, reported, and the link keeps receiving."""
        try:
            handle(frame)
        except TargetError as exc:
            self.die(exc)
        except Exception as exc:
            self.on_event("error", f"harness error handling a frame: "
                                   f"{type(exc).__name__}: {exc}")

    async def _read_forever(self) -> None:
        while not self.closing:
            ws = self.ws
            assert ws is not None
            # Frames go to on_raw as they are parsed; this task only waits for the end.
            ws.deliver_to(self._dispatch)
            await asyncio.shield(ws.closed)
            if self.closing or self.dead is not None:
                return
            self.on_event("disconnected", "connection closed by the target or network")
            if not await self._reconnect():
                return

    async def _reconnect(self) -> bool:
        give_up_at = time.monotonic() + self.config.reconnect_window_s
        delay = 0.05
        last_error: TargetError | None = None
        while time.monotonic() < give_up_at and not self.closing:
            try:
                await self._open(resume=True)
            except TargetError as exc:
                last_error = exc
                if exc.cause in PERMANENT:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            self.on_event("resumed", "reconnected")
            return True
        self.die(last_error or TargetError(Cause.DISCONNECTED, "gave up reconnecting"))
        return False

    def die(self, error: TargetError) -> None:
        """The link is gone for good: fail everything waiting on it and hang up."""
        if self.dead is None:
            self.dead = error
            self.connected.set()  # whoever waits for the connection must see it is dead
            self.on_event("dead", str(error))
            if self.ws is not None:
                self._closer = asyncio.get_running_loop().create_task(self.ws.close())
        self._fail_waiting(error)

    def _fail_waiting(self, error: TargetError) -> None:
        """Every request and ack still waiting learns ``error`` now, not at its timeout."""
        waiting = list(self.ack_futures.values()) + list(self.other_futures.values())
        self.ack_futures.clear()
        self.other_futures.clear()
        for future in waiting:
            if not future.done():
                future.set_exception(error)
        tags = list(self.ack_tags.values())
        self.ack_tags.clear()
        if self.ack_sink is not None:
            for tag in tags:
                self.ack_sink(tag, None, error)

    async def ask(self, text: str, key: Hashable) -> Any:
        """Send a request and wait for the frame that answers it (``on_raw`` resolves
        ``other_futures[key]``). A connection lost before the answer is not a failure while
        the link reconnects: the request is asked again on the next connection, so it must
        be idempotent. Bounded by the connect timeout plus the reconnect window."""
        loop = asyncio.get_running_loop()
        config = self.config
        give_up_at = loop.time() + (config.connect_timeout_s + config.reconnect_window_s)
        try:
            while True:
                if not self.connected.is_set():
                    try:
                        async with asyncio.timeout_at(give_up_at):
                            await self.connected.wait()
                    except TimeoutError:
                        raise _no_answer() from None
                if self.dead is not None:
                    raise self.dead
                if self.closing:
                    raise TargetError(Cause.DISCONNECTED, "the session was closed")
                ws = self.ws
                assert ws is not None
                if ws.closed.done():
                    # Closed, and _lost (a callback of the close) has yet to run: let it,
                    # then wait for the next connection.
                    await asyncio.sleep(0)
                    continue
                future: asyncio.Future[Any] = loop.create_future()
                self.other_futures[key] = future
                with contextlib.suppress(ConnectionClosed):
                    ws.send_now(text)
                # The answer within the connect timeout; _lost wakes it to ask again. A
                # timer, not asyncio.timeout: every round of a swarm opens a conversation.
                timer = loop.call_at(min(give_up_at, loop.time() + config.connect_timeout_s),
                                     _time_out, future)
                try:
                    answer = await future
                finally:
                    timer.cancel()
                if answer is not _ASK_AGAIN:
                    return answer
        finally:
            self.other_futures.pop(key, None)

    def resolve_ack(self, key: str, ack: Ack) -> None:
        future = self.ack_futures.pop(key, None)
        if future is not None:
            if not future.done():
                future.set_result(ack)
        else:
            self.settle_tagged(key, ack.server_id)

    def settle_tagged(self, key: str, server_id: str | None,
                      error: TargetError | None = None) -> bool:
        """A tagged send's ack (its ``server_id``) or refusal (``error``) goes to the sink;
        False: ``key`` was not tagged."""
        tag = self.ack_tags.pop(key, _UNTAGGED)
        if tag is _UNTAGGED:
            return False
        assert self.ack_sink is not None
        self.ack_sink(tag, server_id, error)
        return True

    def refuse_ack(self, key: str, error: TargetError) -> bool:
        future = self.ack_futures.pop(key, None)
        if future is None:
            return self.settle_tagged(key, None, error)
        if not future.done():
            future.set_exception(error)
        return True

    def send_tagged(self, text: str, client_msg_id: str, tag: Any, sink: AckSink) -> None:
        """Send (or hold for the resume while disconnected) a frame whose outcome goes to
        ``sink`` with ``tag``, once (see CustomerSession.send_tagged); on a dead or closing
        link the sink hears so at once."""
        if self.dead is not None or self.closing:
            sink(tag, None, self.dead or TargetError(Cause.DISCONNECTED,
                                                     "the session was closed"))
            return
        self.ack_sink = sink
        self.ack_tags[client_msg_id] = tag
        ws = self.ws
        assert ws is not None
        # Not contextlib.suppress: every message passes here.
        try:  # noqa: SIM105
            ws.send_now(text)
        except ConnectionClosed:
            pass  # disconnected: handshake(resume=True) resends what is unacked
        if self.frames is not None:
            self.frames.append((time.monotonic_ns() // 1000, "out", text))

    def new_ack(self, key: str) -> asyncio.Future[Ack]:
        future: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        if self.dead is not None:
            future.set_exception(self.dead)
        else:
            self.ack_futures[key] = future
        return future

    def write_now(self, text: str) -> None:
        if self.dead is not None:
            raise self.dead
        ws = self.ws
        assert ws is not None
        ws.send_now(text)
        if self.frames is not None:
            self.frames.append((time.monotonic_ns() // 1000, "out", text))

    async def write(self, text: str) -> None:
        self.write_now(text)

    def write_or_hold_now(self, text: str) -> None:
        """Write now; while disconnected, keep quiet: handshake(resume=True) resends."""
        # Not contextlib.suppress: every send and reply passes here.
        try:  # noqa: SIM105
            self.write_now(text)
        except ConnectionClosed:
            pass

    async def write_or_hold(self, text: str) -> None:
        self.write_or_hold_now(text)

    def drop(self) -> None:
        """Cut the connection the way a mobile network does: no close handshake. The reader
        then reconnects and resumes like after any real drop (used to test that path)."""
        if self.ws is not None:
            self.ws.abort()

    async def close(self) -> None:
        self.closing = True
        self._fail_waiting(TargetError(Cause.DISCONNECTED, "the session was closed"))
        if self.dead is None:
            self.connected.set()  # wakes ask(), which then sees `closing`
        if self.ws is not None:
            with contextlib.suppress(ConnectionClosed, OSError):
                await self.goodbye(self.ws)
            await self.ws.close()
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
