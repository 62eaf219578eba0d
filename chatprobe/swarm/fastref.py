"""The compiled swarm engine's Python side: WorkerEngine's interface to the Locust users
(start, ready, play_round, leave, take_batch, stop) over ``chatprobe.swarm._fastref``.

The C engine (``_fastref.c``) speaks the reference protocol over ws:// only, in a thread of
its own that never takes the interpreter lock; :func:`compiled_engine_refusal` says why a
target cannot use it (another protocol, TLS, no compiled module), and the swarm then runs
the Python engine, which speaks every adapter. Both write the same records.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from chatprobe.config import AgentCredential, TargetConfig
from chatprobe.diagnosis import Cause
from chatprobe.errors import HarnessError, TargetError
from chatprobe.protocols.reference import websocket_url
from chatprobe.stamp import StampCodec
from chatprobe.swarm.collector import empty_batch
from chatprobe.swarm.engine import Planned, WorkerEngine, clock_domain, now_us
from chatprobe.swarm.scripts import AGENT_REPLIES, Script
from chatprobe.verdict import LATE_SEND_US

_IMPORT_ERROR: str | None = None
try:
    import chatprobe.swarm._fastref as _fastref
except ImportError as exc:  # built at install when a C compiler was there (optional)
    _IMPORT_ERROR = str(exc)

MAX_SEQ = 64  # _fastref.c keeps a round's expected replies in a 64-bit mask (seq 1-63)

# The order _fastref.c reads them in (engine->causes).
_CAUSES = (Cause.NOT_ACCEPTED, Cause.TRANSPORT, Cause.DISCONNECTED, Cause.UPGRADE_REFUSED,
           Cause.PROTOCOL, Cause.AUTH_REJECTED, Cause.SESSION_EXPIRED, Cause.ACCOUNT_FROZEN)


def compiled_engine_refusal(target_url: str, config: TargetConfig,
                            agent_url: str | None = None,
                            script: Script | None = None) -> str | None:
    """Why the compiled engine cannot drive this target (None: it can)."""
    if _IMPORT_ERROR is not None:
        return f"the compiled engine is not built ({_IMPORT_ERROR})"
    if not sys.platform.startswith("linux"):
        return "the compiled engine runs on Linux only"
    if config.protocol != "reference":
        return f"the compiled engine speaks the reference protocol only, not {config.protocol}"
    for url in (target_url, agent_url or target_url):
        scheme = urlsplit(websocket_url(url)).scheme
        if scheme != "ws":
            return f"the compiled engine has no TLS ({scheme}:// target)"
    if script is not None and any(step.expects_reply for step in script.steps[MAX_SEQ - 1:]):
        return (f"the compiled engine answers the first {MAX_SEQ - 1} messages of a round "
                f"only; script {script.name!r} expects a reply later than that")
    return None


ENGINES = ("auto", "compiled", "python")


def choose_engine(choice: str, target_url: str, config: TargetConfig,
                  agent_url: str | None = None,
                  script: Script | None = None) -> type[CompiledWorkerEngine | WorkerEngine]:
    """The engine class for ``choice`` (one of ENGINES): auto takes the compiled one where it
    can drive the target; compiled where it cannot is a HarnessError saying why."""
    if choice == "python":
        return WorkerEngine
    refusal = compiled_engine_refusal(target_url, config, agent_url, script)
    if refusal is None and config.long_poll_fallback and any(
            upgrade_refused(url, config.connect_timeout_s)
            for url in {target_url, agent_url or target_url}):
        # The Python engine falls back to long polling there; this one cannot.
        refusal = ("the target refuses the WebSocket upgrade, and the compiled engine has no "
                   "long-polling fallback")
    if refusal is None:
        return CompiledWorkerEngine
    if choice == "compiled":
        raise HarnessError(f"--engine compiled: {refusal}")
    return WorkerEngine


def upgrade_refused(url: str, timeout_s: float) -> bool:
    """True when the target (or a proxy before it) answers a WebSocket upgrade with plain
    HTTP; False when it upgrades, or cannot be reached (the engine then reports that)."""
    parts = urlsplit(websocket_url(url))
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = (f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: Y2hhdHByb2JlLWZsaWdodA==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 80),
                                      timeout=timeout_s) as connection:
            connection.sendall(request)
            answer = b""
            while b"\r\n" not in answer and len(answer) < 4096:
                chunk = connection.recv(4096)
                if not chunk:
                    return False
                answer += chunk
    except OSError:
        return False
    status = answer.split(b" ", 2)[1:2]
    return status != [b"101"]


def _address(url: str) -> tuple[bytes, str, str]:
    """(packed socket address, request path, Host header) of a ws:// URL."""
    parts = urlsplit(websocket_url(url))
    if parts.hostname is None:
        raise HarnessError(f"malformed target URL: {url!r}")
    port = parts.port or 80
    try:
        found = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TargetError(Cause.TRANSPORT, f"{url}: cannot resolve {parts.hostname!r}: "
                                           f"{exc.strerror}") from None
    # Of several addresses, the first that takes a connection, as asyncio tries them in turn
    # (localhost may name ::1 first for a server listening on 127.0.0.1 only); none: the
    # first, and the engine reports what connecting to it says.
    family, _, _, _, sockaddr = found[0] if len(found) == 1 else next(
        (item for item in found if _connects(item[0], item[4])), found[0])
    host = str(sockaddr[0])
    # struct sockaddr_in / sockaddr_in6 as the kernel reads them: family in host order,
    # port (and flow info) in network order.
    if family == socket.AF_INET:
        packed = (struct.pack("=H", socket.AF_INET) + struct.pack("!H", port)
                  + socket.inet_pton(socket.AF_INET, host) + bytes(8))
    else:
        flowinfo, scope_id = (int(sockaddr[2]), int(sockaddr[3])) if len(sockaddr) == 4 else (
            0, 0)
        packed = (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, flowinfo)
                  + socket.inet_pton(socket.AF_INET6, host) + struct.pack("=I", scope_id))
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return packed, path, parts.netloc


def _connects(family: int, sockaddr: tuple[Any, ...]) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(2.0)
            probe.connect(sockaddr)
        return True
    except OSError:
        return False


@dataclass
class _Output:
    """What the plugin reads of WorkerEngine.out."""

    events: deque[str] = field(default_factory=deque)
    late_sends: int = 0


class CompiledWorkerEngine:
    """One per Locust process, as WorkerEngine: customers (this worker's users) and its share
    of the agents, every connection in the C engine's thread."""

    def __init__(self, target_url: str, config: TargetConfig, codec: StampCodec,
                 worker: str, script: Script | None = None, agent_url: str | None = None,
                 agents: Sequence[AgentCredential] | None = None) -> None:
        refusal = compiled_engine_refusal(target_url, config, agent_url, script)
        if refusal is not None:
            raise HarnessError(refusal)
        self.worker = worker
        self.config = config
        self.host = socket.gethostname()
        self.clock_domain = clock_domain()
        self.agent_credentials = tuple(config.agents if agents is None else agents)
        self.out = _Output()
        self.failure: str | None = None
        self.failure_cause: str | None = None
        self._agents_ready = not self.agent_credentials
        self._indexes: dict[str, int] = {}
        self._sent_late = 0
        self.started_at = time.monotonic()
        reply_kinds = {} if script is None else {
            seq: f"reply:{step.kind}" for seq, step in enumerate(script.steps, start=1)
            if step.expects_reply}
        address, path, host_header = _address(target_url)
        agent_address, agent_path, agent_host = _address(agent_url or target_url)
        self._engine = _fastref.Engine(
            url=websocket_url(target_url), address=address, path=path, host_header=host_header,
            agent_url=websocket_url(agent_url or target_url), agent_address=agent_address,
            agent_path=agent_path, agent_host_header=agent_host,
            shop=config.shop, client_version=str(config.client_version), run=codec.run,
            secret=codec.secret, worker=worker, conn_prefix=f"swarm-{codec.run}-",
            agents=[(agent.id, agent.token or "", agent.id.replace(":", "_").replace("]", "_"))
                    for agent in self.agent_credentials],
            reply_kinds=reply_kinds, replies=tuple(AGENT_REPLIES),
            causes=tuple(cause.value for cause in _CAUSES),
            deadline_us=int(config.deadline_ms * 1000),
            connect_timeout_us=int(config.connect_timeout_s * 1e6),
            reconnect_window_us=int(config.reconnect_window_s * 1e6),
            late_send_us=LATE_SEND_US,
            heartbeat_us=int(config.heartbeat_interval_s * 1e6),
            heartbeat_timeout_us=int(config.heartbeat_timeout_s * 1e6))

    # -- greenlet side, as WorkerEngine ------------------------------------------------

    def start(self, sleep: Callable[[float], None]) -> None:
        self._engine.start()
        self.started_at = time.monotonic()

    @property
    def ready(self) -> bool:
        if not self._agents_ready:
            ready, failure, cause, _ = self._engine.status()
            if failure is not None and self.failure is None:
                self.failure, self.failure_cause = failure, cause
            self._agents_ready = bool(ready)
            if not ready and self.failure is None and (
                    time.monotonic() - self.started_at > self.config.connect_timeout_s * 2):
                self.failure = "probe agents did not log in in time"
        return self._agents_ready

    def play_round(self, customer: str, round_name: str, plan: list[Planned],
                   drop_after: int = -1, start_us: int | None = None) -> None:
        name = f"{self.worker}{round_name}"
        channels = self.config.channels
        channel = channels[zlib.crc32(name.encode()) % len(channels)]
        start = start_us if start_us is not None else (plan[0][0] if plan else now_us())
        self._engine.play_round(self._index(customer), f"{self.worker}{customer}", name,
                                channel, plan, drop_after, start)

    def leave(self, customer: str) -> None:
        index = self._indexes.get(customer)
        if index is not None:
            self._engine.leave(index)

    def _index(self, customer: str) -> int:
        index = self._indexes.get(customer)
        if index is None:
            index = self._indexes[customer] = len(self._indexes)
        return index

    @property
    def customers(self) -> set[str]:
        """Customers (worker-prefixed, as WorkerEngine.customers) whose connection is not
        closed for good."""
        names = {index: name for name, index in self._indexes.items()}
        return {f"{self.worker}{names[index]}" for index in self._engine.open_customers()}

    @property
    def connected_customers(self) -> int:
        """Customers logged in right now."""
        return self._engine.status()[3]

    def take_batch(self, cpu_percent: float | None) -> dict[str, Any]:
        sends, acks, receipts, events, late, forged, foreign, send_lag, loop_lag = (
            self._engine.take())
        batch = empty_batch(self.worker, self.host)
        batch["clock"] = self.clock_domain
        batch["engine"] = "compiled"
        batch["acks"], batch["sends"], batch["receipts"] = acks, sends, receipts
        batch["forged"], batch["foreign"] = forged, foreign
        batch["late_sends"] = late
        self.out.late_sends += late
        batch["send_lag_max_us"], batch["loop_lag_max_us"] = send_lag, loop_lag
        batch["cpu"] = cpu_percent
        batch["agents"] = [agent.id for agent in self.agent_credentials] if (
            self._agents_ready) else []
        self.out.events.extend(events)
        return batch

    def stop(self) -> None:
        self._engine.stop()
