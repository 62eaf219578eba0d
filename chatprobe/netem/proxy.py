"""The fault-injecting TCP proxy (edge): listens on loopback, forwards to the target, and
applies :mod:`chatprobe.netem.faults` to each connection.

Per connection and direction one task reads chunks and stamps each with its release time
(the faults' ``release_at`` chain), and one task writes them when due, so latency does not
cut throughput (Toxiproxy's model). A profile's ``toxicity`` is decided once per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from chatprobe.netem.faults import DOWN, UP, Fault, Kill, StreamClock

CHUNK = 64 * 1024
HEAD_LIMIT = 16 * 1024  # an HTTP request head larger than this is passed on unread
HEAD_WAIT_S = 1.0


@dataclass
class ProxyStats:
    """What the proxy did, for the run's report and for tests."""

    connections: int = 0
    faulted: int = 0  # connections the profile applied to (toxicity)
    refused: int = 0  # admission refused (reconnect blocked)
    upgrades_refused: int = 0
    kills: dict[str, int] = field(default_factory=dict)  # reason -> count
    # The kernel layer's path in front of the proxy, if any: packets per nftables counter
    # (loss_up, forged_rst, port_refused...) and tbf queue drops, read when it closes.
    kernel: dict[str, int] = field(default_factory=dict)


def abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close with a RST (SO_LINGER 0) instead of a FIN, as a firewall rejecting a flow."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER 0: close() sends a RST instead of a FIN.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Connection:
    def __init__(self, proxy: FaultProxy, client_r: asyncio.StreamReader,
                 client_w: asyncio.StreamWriter, faults: Sequence[Fault]) -> None:
        self.proxy = proxy
        self.client_r, self.client_w = client_r, client_w
        self.server_w: asyncio.StreamWriter | None = None
        self.faults = faults
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.started = loop.time()
        self.last_activity = self.started
        self.blackholed = False
        self.done = loop.create_future()
        self.passed = {UP: 0, DOWN: 0}
        self.ended: set[str] = set()
        self.task = asyncio.current_task()

    async def run(self) -> None:
        proxy = self.proxy
        try:
            head = b""
            if any(type(f).rewrite_request is not Fault.rewrite_request for f in self.faults):
                head, answer = await self._request_head()
                if answer is not None:
                    proxy.stats.upgrades_refused += 1
                    self.client_w.write(answer)
                    await self.client_w.drain()
                    self.client_w.close()
                    return
            try:
                server_r, server_w = await asyncio.open_connection(proxy.target_host,
                                                                   proxy.target_port)
            except OSError:
                abort_with_rst(self.client_w)  # as the target itself would refuse
                return
            self.server_w = server_w
            # The request head takes the uplink's faults like every other byte.
            tasks = [self._pump(UP, self.client_r, server_w, first=head),
                     self._pump(DOWN, server_r, self.client_w), self._watch()]
            runners = [asyncio.ensure_future(t) for t in tasks]
            try:
                await self.done
            finally:
                for runner in runners:
                    runner.cancel()
                await asyncio.gather(*runners, return_exceptions=True)
        finally:
            for writer in (self.client_w, self.server_w):
                if writer is not None:
                    writer.close()

    async def _request_head(self) -> tuple[bytes, bytes | None]:
        try:
            # A protocol whose server speaks first (or not HTTP at all) sends no head: after
            # a moment the connection is forwarded as it is.
            async with asyncio.timeout(HEAD_WAIT_S):
                head = await self.client_r.readuntil(b"\r\n\r\n")
        except TimeoutError:
            return b"", None
        except asyncio.LimitOverrunError:
            return await self.client_r.read(HEAD_LIMIT), None
        except asyncio.IncompleteReadError as exc:
            return exc.partial, None
        answer = None
        for fault in self.faults:
            head, answer = fault.rewrite_request(head, self.proxy.rng)
            if answer is not None:
                break
        return head, answer

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def kill(self, kill: Kill) -> None:
        stats = self.proxy.stats
        stats.kills[kill.reason] = stats.kills.get(kill.reason, 0) + 1
        for fault in self.faults:
            fault.on_killed(kill, self.loop.time())
        writers = [w for w in (self.client_w, self.server_w) if w is not None]
        if kill.action == "silent":
            # Both sockets stay open and nothing passes: neither end learns anything, as
            # behind a firewall that forgot the flow. The pumps keep reading (and dropping)
            # until one end gives up and closes; then both go.
            self.blackholed = True
            return
        if kill.action == "rst":
            for writer in writers:
                abort_with_rst(writer)
        else:
            for writer in writers:
                writer.close()
        self.finish()

    async def _pump(self, direction: str, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, first: bytes = b"") -> None:
        faults = [f for f in self.faults if f.direction in (direction, "both")]
        clock = StreamClock(self.started)
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        limit = next((k.limit_bytes for f in faults if (k := f.kill_after()) is not None
                      and k.limit_bytes is not None), None)
        writer_task = asyncio.ensure_future(self._write(queue, writer, faults))
        try:
            while True:
                data, first = first or await reader.read(CHUNK), b""
                if not data:
                    break
                if self.blackholed:
                    continue  # a forgotten flow: read and dropped, neither end told
                if limit is not None:
                    data = data[:limit - self.passed[direction]]  # cut at the limit
                now = self.loop.time()
                self.last_activity = now
                release = now
                for fault in faults:
                    release = fault.release_at(clock, now, len(data), release)
                self.passed[direction] += len(data)
                queue.put_nowait((release, data))
                if limit is not None and self.passed[direction] >= limit:
                    await queue.join()
                    self.kill(Kill("fin", f"data limit {limit} bytes"))
                    return
            if self.blackholed:
                self.finish()  # one end gave up on the dead flow: drop both
                return
            await queue.join()  # the other side gets everything before the FIN
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            # A reset on one side is passed on as a reset, as a router would.
            abort_with_rst(writer)
            self.finish()
            return
        finally:
            writer_task.cancel()
        # The server hung up (after the client's half-close, or on its own): over.
        self.ended.add(direction)
        if DOWN in self.ended:
            self.finish()

    async def _write(self, queue: asyncio.Queue[tuple[float, bytes]],
                     writer: asyncio.StreamWriter, faults: Sequence[Fault]) -> None:
        while True:
            release, data = await queue.get()
            try:
                delay = release - self.loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                pieces, pause = [data], 0.0
                for fault in faults:
                    if type(fault).slices is not Fault.slices:
                        pieces, pause = fault.slices(data)
                for index, piece in enumerate(pieces):
                    if index and pause:
                        await asyncio.sleep(pause)
                    if not self.blackholed:
                        writer.write(piece)
                        await writer.drain()
                self.last_activity = self.loop.time()
            except (ConnectionError, OSError):
                self.finish()
            finally:
                queue.task_done()

    async def _watch(self) -> None:
        """Timed deaths: after a while into the connection, or after a while idle."""
        kills = [k for f in self.faults if (k := f.kill_after()) is not None
                 and k.limit_bytes is None]
        if not kills:
            return
        while True:
            now = self.loop.time()
            due: list[tuple[float, Kill]] = []
            for kill in kills:
                if kill.after_s is not None:
                    due.append((self.started + kill.after_s, kill))
                if kill.idle_s is not None:
                    due.append((self.last_activity + kill.idle_s, kill))
            at, first = min(due, key=lambda item: item[0])
            if at <= now:
                self.kill(first)
                return
            await asyncio.sleep(at - now)


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target_host:target_port``. ``faults`` builds a
    fresh list of fault units per connection (their state is per connection, except what a
    fault deliberately shares, such as a reconnect block). ``listen_sock``: a listening
    socket made elsewhere (the kernel layer makes it inside a network namespace) to serve
    on instead of a new one on loopback; the proxy closes it."""

    def __init__(self, target_host: str, target_port: int,
                 faults: Callable[[], Sequence[Fault]], toxicity: float = 1.0,
                 seed: int | None = None, listen_sock: socket.socket | None = None) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.make_faults = faults
        self.toxicity = toxicity
        self.rng = random.Random(seed)
        self.stats = ProxyStats()
        self.shared: list[Fault] = list(faults())  # admission state spans connections
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._listen_sock = listen_sock
        self.port = 0

    async def start(self) -> int:
        if self._listen_sock is not None:
            self._server = await asyncio.start_server(self._accept, sock=self._listen_sock,
                                                      limit=CHUNK)
        else:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0,
                                                      limit=CHUNK)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        now = asyncio.get_running_loop().time()
        if not all(f.admit(now) for f in self.shared):
            self.stats.refused += 1
            abort_with_rst(writer)
            return
        faulted = self.rng.random() < self.toxicity
        faults: Sequence[Fault] = []
        if faulted:
            self.stats.faulted += 1
            faults = [*self.make_faults()]
            # Faults that remember across connections use the shared instance.
            faults = [next((s for s in self.shared if type(s) is type(f) and
                            type(f).admit is not Fault.admit), f) for f in faults]
        connection = _Connection(self, reader, writer, faults)
        self._connections.add(connection)
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        # Asyncio logs an error for a cancelled connection handler: end them instead, by
        # cutting their sockets (which also wakes one still reading a request head).
        tasks = [c.task for c in self._connections if c.task is not None]
        for connection in list(self._connections):
            connection.blackholed = False
            for writer in (connection.client_w, connection.server_w):
                if writer is not None:
                    writer.transport.abort()
            connection.finish()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
