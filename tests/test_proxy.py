"""The fault proxy over real loopback sockets: each fault unit against an echo server or a
real WebSocket server, measured with the test's own clock and byte counts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import InvalidStatus

from chatprobe.netem.faults import (
    DOWN,
    UP,
    Bandwidth,
    Fault,
    IdleTimeout,
    Latency,
    LimitData,
    ResetPeer,
    Slicer,
    Stall,
    Upgrade,
)
from chatprobe.netem.proxy import FaultProxy, abort_with_rst
from chatprobe.protocols.websocket import connect
from tests.conftest import scaled


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@asynccontextmanager
async def proxied_echo(faults: Sequence[Fault], toxicity: float = 1.0
                       ) -> AsyncIterator[FaultProxy]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = FaultProxy("127.0.0.1", port, lambda: list(faults), toxicity=toxicity, seed=1)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
        server.close()


async def round_trip_s(port: int, payload: bytes = b"x" * 100) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(payload)
    await reader.readexactly(len(payload))
    elapsed = time.monotonic() - started
    writer.close()
    return elapsed


def run(coroutine: object) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coroutine, timeout=scaled(30))  # type: ignore[arg-type]
    asyncio.run(bounded())


def test_latency_on_the_uplink_only_adds_to_the_round_trip_once() -> None:
    async def main() -> None:
        async with proxied_echo([Latency(UP, 150.0)]) as proxy:
            rtts = [await round_trip_s(proxy.port) for _ in range(5)]
        # At least the delay, and once only: both ways would be 300 ms.
        assert all(0.150 <= rtt < 0.300 * scaled(1) for rtt in rtts), rtts
    run(main())


def test_latency_does_not_cut_throughput() -> None:
    # 50 chunks sent back to back through 100 ms each way: all arrive ~200 ms later, not
    # 50 x 200 ms later (Toxiproxy's model, each chunk released on its own arrival time).
    async def main() -> None:
        async with proxied_echo([Latency(UP, 100.0), Latency(DOWN, 100.0)]) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            started = time.monotonic()
            for _ in range(50):
                writer.write(b"y" * 1000)
                await writer.drain()
                await asyncio.sleep(0.002)
            await reader.readexactly(50_000)
            elapsed = time.monotonic() - started
            writer.close()
        # Chunk after chunk through the delay would take 50 x 200 ms = 10 s.
        assert 0.2 <= elapsed < 2.0 * scaled(1), elapsed
    run(main())


def test_bandwidth_limits_the_rate_of_a_bulk_transfer() -> None:
    async def main() -> None:
        async with proxied_echo([Bandwidth(DOWN, kbit=800.0)]) as proxy:
            # 50 KB at 800 kbit/s = 0.5 s on the way back.
            elapsed = await round_trip_s(proxy.port, b"z" * 50_000)
        assert 0.5 <= elapsed < 1.0 * scaled(1), elapsed  # paced at the rate, not slower
    run(main())


def test_slicer_cuts_writes_into_small_delayed_segments() -> None:
    async def main() -> None:
        async with proxied_echo([Slicer(UP, size=10, delay_ms=10.0)]) as proxy:
            elapsed = await round_trip_s(proxy.port, b"s" * 100)  # 10 slices, 9 pauses
        assert elapsed >= 0.09, elapsed
    run(main())


def test_a_stall_holds_data_until_it_ends_and_the_connection_survives() -> None:
    async def main() -> None:
        # Period 0.6 s whose last 0.4 s stall: a send 0.3 s in waits until 0.6 s.
        async with proxied_echo([Stall(UP, every_s=0.6, stall_s=0.4)]) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            opened = time.monotonic()
            await asyncio.sleep(0.3)
            writer.write(b"during the stall")
            await reader.readexactly(16)
            arrived = time.monotonic() - opened
            writer.close()
        # The proxy's stall clock starts when it accepts, a little before the client's
        # connect returns: 10 ms of slack, far below the 0.3 s a missed stall would show.
        assert arrived >= 0.59, arrived
    run(main())


@pytest.mark.parametrize("action", ["silent", "fin", "rst"])
def test_idle_timeout_kills_the_flow_the_way_the_profile_says(action: str) -> None:
    async def main() -> None:
        async with proxied_echo([IdleTimeout(timeout_s=0.2, action=action)]) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            # Idle, then killed: each way looks different from the client's side.
            killed = f"idle {0.2:g} s"
            while proxy.stats.kills.get(killed, 0) == 0:
                await asyncio.sleep(0.02)
            if action == "silent":
                writer.write(b"into the void")
                await writer.drain()
                with pytest.raises(TimeoutError):  # no answer, and no error either
                    async with asyncio.timeout(0.3):
                        await reader.read(100)
            elif action == "fin":
                assert await reader.read(100) == b""  # an orderly end of stream
            else:
                with pytest.raises(ConnectionResetError):
                    await reader.read(100)
            writer.close()
    run(main())


def test_forged_reset_kills_the_connection_and_blocks_reconnects_for_a_while() -> None:
    async def main() -> None:
        async with proxied_echo([ResetPeer(after_s=0.1, block_s=0.5)]) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            with pytest.raises(ConnectionResetError):
                await reader.read(100)
            reset_at = time.monotonic()
            # Reconnects during the block are reset at once; after it they work again.
            while time.monotonic() - reset_at < 0.4:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                    writer.write(b"hello")
                    await reader.readexactly(5)
            assert proxy.stats.refused >= 1
            while time.monotonic() - reset_at < 0.6:
                await asyncio.sleep(0.05)
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"again")
            assert await reader.readexactly(5) == b"again"
    run(main())


def test_data_limit_closes_the_connection_after_that_many_bytes() -> None:
    async def main() -> None:
        async with proxied_echo([LimitData(DOWN, bytes=1000)]) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"d" * 3000)
            received = await reader.read(100_000)
            while chunk := await reader.read(100_000):
                received += chunk
            assert 1000 <= len(received) < 3000
    run(main())


def test_toxicity_applies_the_faults_to_that_share_of_connections() -> None:
    async def main() -> None:
        async with proxied_echo([Latency(UP, 100.0)], toxicity=0.3) as proxy:
            rtts = [await round_trip_s(proxy.port) for _ in range(40)]
        slow = sum(rtt >= 0.1 for rtt in rtts)
        assert slow == proxy.stats.faulted
        assert 3 <= slow <= 25  # seeded; decided once per connection
    run(main())


async def _ws_echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


@pytest.mark.parametrize("mode,status", [("strip", 426), ("refuse", 403)])
def test_a_proxy_that_strips_or_refuses_the_upgrade_stops_websockets(mode: str,
                                                                      status: int) -> None:
    async def main() -> None:
        async with serve(_ws_echo, "127.0.0.1", 0) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            async with FaultProxy("127.0.0.1", port, lambda: [Upgrade(mode=mode)]) as proxy:
                with pytest.raises(InvalidStatus) as caught:
                    await connect(f"ws://127.0.0.1:{proxy.port}/", scaled(5))
                assert caught.value.response.status_code == status
            async with FaultProxy("127.0.0.1", port, lambda: []) as clean:
                ws = await connect(f"ws://127.0.0.1:{clean.port}/", scaled(5))
                await ws.send("through")
                assert await ws.recv() == "through"
                await ws.close()
    run(main())


def test_a_client_reset_reaches_the_target_as_a_reset() -> None:
    async def main() -> None:
        target_saw: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def watch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.read(100)
                await reader.read(100)
                target_saw.set_result("eof")
            except ConnectionResetError:
                target_saw.set_result("reset")

        server = await asyncio.start_server(watch, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with FaultProxy("127.0.0.1", port, lambda: [Latency(UP, 1.0)]) as proxy:
            _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"hello")
            await writer.drain()
            abort_with_rst(writer)
            assert await target_saw == "reset"
        server.close()
    run(main())


def test_a_forgotten_flow_is_dropped_once_its_client_gives_up() -> None:
    async def main() -> None:
        async with proxied_echo([IdleTimeout(timeout_s=0.1, action="silent")]) as proxy:
            _reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            while not proxy.stats.kills:
                await asyncio.sleep(0.02)
            assert len(proxy._connections) == 1  # blackholed, still held
            writer.close()  # the client's own timeout fires: it hangs up
            while proxy._connections:
                await asyncio.sleep(0.02)
    run(main())
