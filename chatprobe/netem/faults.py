"""Connection-level faults for the proxy: small registered units in Toxiproxy's vocabulary.

Each fault is a dataclass with a registered ``name`` and overrides only the hooks it needs
(all are pure: they take times and sizes and return times or bytes; the proxy does the I/O):

- ``release_at``: when a chunk that arrived at ``arrival`` may leave (latency, bandwidth,
  stalls); chunks leave in order, so a later release only holds up what follows;
- ``slices``: how a chunk is cut into writes (slicer);
- ``rewrite_request``: what happens to the HTTP request head of a new connection (the
  WebSocket Upgrade: passed, stripped, refused);
- ``kill_after``: when (seconds into the connection, or after how long idle) and how the
  connection dies (idle timeout, forged reset, data limit);
- ``admit``: whether a new connection may open at all (reconnects blocked after a reset).

A fault applies to one direction ("up": client -> server, "down": server -> client) or to the
connection. Adding one: subclass :class:`Fault`, decorate with :func:`register`, describe it
in docs/faults.md. The proxy calls hooks in list order.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import ClassVar

UP, DOWN = "up", "down"
KILL_ACTIONS = ("silent", "fin", "rst")

FAULTS: dict[str, type[Fault]] = {}


def register(cls: type[Fault]) -> type[Fault]:
    FAULTS[cls.name] = cls
    return cls


@dataclass
class StreamClock:
    """Per direction and connection state a fault keeps between chunks."""

    started: float  # when the connection opened (loop time, seconds)
    free_at: float = 0.0  # bandwidth: when the link finishes sending what it already has
    last_release: float = 0.0


@dataclass
class Kill:
    """How a connection dies: ``after_s`` into it or ``idle_s`` without bytes either way."""

    action: str  # silent (blackhole, sockets stay open), fin, rst
    reason: str
    after_s: float | None = None
    idle_s: float | None = None
    limit_bytes: int | None = None
    direction: str | None = None


@dataclass
class Fault:
    name: ClassVar[str] = ""
    direction: str = UP

    def release_at(self, clock: StreamClock, arrival: float, size: int,
                   earliest: float) -> float:
        return earliest

    def slices(self, data: bytes) -> tuple[list[bytes], float]:
        """The writes for one chunk and the pause between them (seconds)."""
        return [data], 0.0

    def rewrite_request(self, head: bytes, rng: random.Random) -> tuple[bytes, bytes | None]:
        """(request head to forward, or a response to send back and close)."""
        return head, None

    def kill_after(self) -> Kill | None:
        return None

    def admit(self, now: float) -> bool:
        return True

    def on_killed(self, kill: Kill, now: float) -> None:
        """Told when the proxy killed a connection (reconnect blocking listens)."""


@register
@dataclass
class Latency(Fault):
    """Each chunk leaves ``latency_ms`` (+/- uniform ``jitter_ms``) after it arrived; order is
    kept (TCP never reorders), so jitter only ever adds to a chunk behind a slower one."""

    name: ClassVar[str] = "latency"
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    rng: random.Random = field(default_factory=random.Random)

    def release_at(self, clock: StreamClock, arrival: float, size: int,
                   earliest: float) -> float:
        delay = self.latency_ms
        if self.jitter_ms:
            delay += self.rng.uniform(-self.jitter_ms, self.jitter_ms)
        release = max(earliest, arrival + max(0.0, delay) / 1000, clock.last_release)
        clock.last_release = release
        return release


@register
@dataclass
class Bandwidth(Fault):
    """A link of ``kbit`` kbit/s: a chunk leaves when the link has sent it."""

    name: ClassVar[str] = "bandwidth"
    kbit: float = 0.0

    def release_at(self, clock: StreamClock, arrival: float, size: int,
                   earliest: float) -> float:
        start = max(earliest, clock.free_at)
        clock.free_at = start + size * 8 / (self.kbit * 1000)
        return clock.free_at


@register
@dataclass
class Stall(Fault):
    """Nothing passes for ``stall_s`` every ``every_s`` (VPN rekey, Wi-Fi roaming, 3G
    handover); the connection stays up and what waits leaves when the stall ends."""

    name: ClassVar[str] = "stall"
    every_s: float = 0.0
    stall_s: float = 0.0

    def release_at(self, clock: StreamClock, arrival: float, size: int,
                   earliest: float) -> float:
        into = earliest - clock.started
        window_start = (into // self.every_s) * self.every_s + self.every_s - self.stall_s
        # The stall closes each period: [every - stall_s, every) of it.
        if window_start <= into < window_start + self.stall_s:
            return clock.started + window_start + self.stall_s
        return earliest


@register
@dataclass
class Slicer(Fault):
    """Cuts each chunk into ``size`` -byte writes ``delay_ms`` apart (small segments)."""

    name: ClassVar[str] = "slicer"
    size: int = 64
    delay_ms: float = 0.0

    def slices(self, data: bytes) -> tuple[list[bytes], float]:
        return [data[i:i + self.size] for i in range(0, len(data), self.size)], \
            self.delay_ms / 1000


@register
@dataclass
class IdleTimeout(Fault):
    """A stateful firewall or NAT forgets a flow idle for ``timeout_s``: silently (packets
    go nowhere, neither end is told), with a FIN, or with a RST."""

    name: ClassVar[str] = "idle_timeout"
    direction: str = "both"
    timeout_s: float = 60.0
    action: str = "silent"

    def kill_after(self) -> Kill | None:
        return Kill(self.action, f"idle {self.timeout_s:g} s", idle_s=self.timeout_s)


@register
@dataclass
class ResetPeer(Fault):
    """A forged RST to both ends ``after_s`` into the connection (a censoring middlebox);
    with ``block_s``, new connections are refused (reset) for that long afterwards."""

    name: ClassVar[str] = "reset_peer"
    direction: str = "both"
    after_s: float = 0.0
    block_s: float = 0.0
    blocked_until: float = 0.0

    def kill_after(self) -> Kill | None:
        return Kill("rst", f"forged reset after {self.after_s:g} s", after_s=self.after_s)

    def admit(self, now: float) -> bool:
        return now >= self.blocked_until

    def on_killed(self, kill: Kill, now: float) -> None:
        if kill.after_s is not None and self.block_s:
            self.blocked_until = max(self.blocked_until, now + self.block_s)


@register
@dataclass
class LimitData(Fault):
    """The connection is closed once ``bytes`` have passed in this direction."""

    name: ClassVar[str] = "limit_data"
    bytes: int = 0

    def kill_after(self) -> Kill | None:
        return Kill("fin", f"data limit {self.bytes} bytes", limit_bytes=self.bytes,
                    direction=self.direction)


_UPGRADE_HEADERS = re.compile(rb"^(upgrade|connection|sec-websocket-[a-z]+):[^\r\n]*\r\n",
                              re.IGNORECASE | re.MULTILINE)
REFUSED = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 31\r\n"
           b"Connection: close\r\n\r\nWebSocket upgrade not allowed.\n")


@register
@dataclass
class Upgrade(Fault):
    """What a corporate proxy does with a WebSocket handshake: ``strip`` removes the Upgrade
    headers (the server sees a plain GET and answers it, typically 426), ``refuse`` answers
    403 itself. ``toxicity``: share of handshakes affected (a flaky proxy). Plain HTTP only:
    over TLS the proxy cannot see the request, and the run says so."""

    name: ClassVar[str] = "upgrade"
    mode: str = "strip"
    toxicity: float = 1.0

    def rewrite_request(self, head: bytes, rng: random.Random) -> tuple[bytes, bytes | None]:
        if b"websocket" not in head.lower() or rng.random() >= self.toxicity:
            return head, None
        if self.mode == "refuse":
            return head, REFUSED
        return _UPGRADE_HEADERS.sub(b"", head), None
