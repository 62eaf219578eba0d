"""Benchmark (not a test): CPU per stamped, confirmed message, against a floor and against the
plain locustfile's round trip. Run: .venv/bin/python benchmarks/bench_floor.py [--users 60]

bench_swarm.py finds the load where a worker falls behind its plan: a cliff, which moves with
this VM's speed from one run to the next. This script measures cost instead, at a load well
below the cliff, so that the numbers compare across runs and across code:

floor   the least Python that does a swarm worker's job against benchmarks/relay_server.py:
        the shopper script's rounds on a plan (open, 5 stamped messages, close), every
        message acked, confirmed by a probe agent and 3 of them answered, the answers
        confirmed by the customer, a timer per request and per round's wait for answers,
        flat records. One uvloop thread, callbacks only, no layers, no reconnects, no
        Locust: a yardstick for what the job itself costs in CPython here, not a proven
        bound (compiled code could go lower).
engine  chatprobe's WorkerEngine (the swarm worker's chat loop) doing the same, without
        Locust and without mobile reconnects, its rounds handed over from another thread
        as Locust's users hand them over.
c-engine chatprobe's compiled engine (chatprobe/swarm/_fastref.c, the swarm's worker for
        reference targets over ws://) doing the engine's job, driven the same way.
c-floor the floor's job written in C (benchmarks/floor.c, one thread on epoll, no Python),
        built with the machine's C compiler: what compiled code costs per message here,
        kernel time included. Skipped when there is no C compiler.
plain   benchmarks/plain_echo_locustfile.py under Locust: CPU per round trip (send one
        message, wait for its echo), as bench_swarm.py's (b).

Each line gives microseconds of CPU (user + system, the whole process) per unit and the rate
one core would sustain at that cost. The floor's ceiling over the plain locustfile's is the
ratio (a)/(b) the floor would reach on a whole core.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import heapq
import itertools
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_swarm  # noqa: E402

from chatprobe.config import load_target  # noqa: E402
from chatprobe.protocols.websocket import FIN_TEXT, client_frame  # noqa: E402
from chatprobe.stamp import ParsedStamp, StampCodec  # noqa: E402
from chatprobe.swarm.collector import SEND_FIELDS  # noqa: E402
from chatprobe.swarm.engine import Planned, WorkerEngine, now_us  # noqa: E402
from chatprobe.swarm.fastref import CompiledWorkerEngine, compiled_engine_refusal  # noqa: E402
from chatprobe.swarm.scripts import AGENT_REPLIES, Script, load_script  # noqa: E402
from chatprobe.verdict import LATE_SEND_US  # noqa: E402

THINK_SCALE = 0.01  # as bench_swarm.py's (a)
WARM_UP_S = 1.5


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the floor -------------------------------------------------------------------------


class _Floor:
    """Shared state of the floor: the records, the send clock, the codec."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.codec = StampCodec.new_run()
        self.reply_seqs = {seq for seq, step in enumerate(script.steps, start=1)
                           if step.expects_reply}
        self.sends: list[Any] = []
        self.acks: list[Any] = []
        self.receipts: list[Any] = []
        self.late = 0
        self.loop = asyncio.get_running_loop()
        self.due: list[tuple[int, int, _FloorCustomer]] = []
        self.order = itertools.count()
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0
        self.sending = False
        self.stop_at = float("inf")
        self.failure: str | None = None  # a relay that stopped answering: no numbers

    def receipt(self, frame: dict[str, Any], receiver: str,
                received: int) -> ParsedStamp | None:
        """Records a stamped message's receipt; its stamp, or None when it has no valid one."""
        stamp = self.codec.parse(frame["text"])
        if stamp is None or not stamp.valid:
            return None
        self.receipts.extend((stamp.conversation, stamp.seq, receiver, received))
        return stamp

    def schedule(self, at_us: int, customer: _FloorCustomer) -> None:
        heapq.heappush(self.due, (at_us, next(self.order), customer))
        if self.sending:
            return
        if self.timer is None or at_us < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self._arm(at_us)

    def _arm(self, at_us: int) -> None:
        self.timer_at = at_us
        wait_ms = -(-(at_us - now_us()) // 1000)
        self.timer = self.loop.call_later(max(0, wait_ms) / 1000, self._fire)

    def _fire(self) -> None:
        self.timer = None
        due = self.due
        self.sending = True
        while due and due[0][0] <= (now := now_us()):
            heapq.heappop(due)[2].send_next(now)
        self.sending = False
        if due:
            self._arm(due[0][0])


class _Connection(asyncio.Protocol):
    """A WebSocket client connection reduced to what the floor needs: the handshake's
    answer skipped, then whole unfragmented frames; writes made while a read is handled
    leave together after it (as chatprobe's do)."""

    def __init__(self, owner: _FloorCustomer | _FloorAgent, port: int) -> None:
        self.owner = owner
        self.port = port
        self.buffer = b""
        self.upgraded = False
        self.held: list[bytes] | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write((  # type: ignore[union-attr]
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            self.buffer += data
            end_of_head = self.buffer.find(b"\r\n\r\n")
            if end_of_head < 0:
                return
            data, self.buffer, self.upgraded = self.buffer[end_of_head + 4:], b"", True
            self.ready.set_result(None)
        buffer = self.buffer + data if self.buffer else data
        at, end = 0, len(buffer)
        on_frame = self.owner.on_frame
        self.held = []
        while end - at >= 2:
            length, header = buffer[at + 1] & 0x7F, 2
            if length == 126:
                if end - at < 4:
                    break
                length, header = (buffer[at + 2] << 8) | buffer[at + 3], 4
            if end - at < header + length:
                break
            payload = buffer[at + header:at + header + length]
            at += header + length
            on_frame(orjson.loads(payload))
        self.buffer = buffer[at:]
        held, self.held = self.held, None
        if held and self.transport is not None:
            self.transport.write(b"".join(held))

    def send(self, frame: dict[str, Any]) -> None:
        data = client_frame(FIN_TEXT, orjson.dumps(frame))
        if self.held is not None:
            self.held.append(data)
        elif self.transport is not None:
            self.transport.write(data)


class _FloorCustomer:
    def __init__(self, floor: _Floor, name: str, rng: random.Random) -> None:
        self.floor = floor
        self.name = name
        self.rng = rng
        self.rounds = 0
        self.plan: list[Planned] = []
        self.plan_end_us = now_us()
        self.round_start_us = 0  # when the round was planned to begin
        self.asked_us = 0  # when its open was sent
        self.earliest_us = 0  # its start plus the time the target took to open it
        self.index = 0
        self.awaiting = 0
        self.round_name = ""
        self.conversation = 0
        self.connection: _Connection | None = None
        self.open_timer: asyncio.TimerHandle | None = None
        self.answers_timer: asyncio.TimerHandle | None = None

    def start_round(self) -> None:
        self.rounds += 1
        self.asked_us = now_us()
        self.round_start_us = self.plan_end_us
        self.plan = self.floor.script.plan(self.rng, self.plan_end_us, THINK_SCALE)
        self.plan_end_us = self.plan[-1][0]
        self.index = 0
        self.round_name = f"w1{self.name}-{self.rounds}"
        assert self.connection is not None
        self.connection.send({"type": "open", "ref": self.round_name, "channel": "web"})
        self.open_timer = self.floor.loop.call_later(5.0, self._no_answer)

    def _no_answer(self) -> None:
        self.floor.failure = f"the relay did not answer {self.round_name}'s open in 5 s"

    def on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        floor = self.floor
        if kind == "ack":
            seq = int(frame["client_msg_id"].rsplit("-", 1)[1])
            floor.acks.extend((self.round_name, seq, now_us(), str(frame["id"])))
        elif kind == "message":
            if floor.receipt(frame, self.name, now_us()) is None:
                return
            self.awaiting -= 1
            if self.awaiting == 0 and self.index == len(self.plan):
                self.close()
        elif kind == "opened":
            if self.open_timer is not None:
                self.open_timer.cancel()
            self.conversation = frame["conversation"]
            self.awaiting = 0
            # As the engine: the time the target took to open is not the generator's delay.
            self.earliest_us = self.round_start_us + now_us() - self.asked_us
            floor.schedule(self.plan[0][0], self)

    def send_next(self, now: int) -> None:
        floor = self.floor
        intended, kind, body = self.plan[self.index]
        if now - max(intended, self.earliest_us) > LATE_SEND_US:
            floor.late += 1
        seq = self.index + 1
        name = self.round_name
        floor.sends.extend((name, name, seq, intended, now, kind))
        text = floor.codec.stamp_text(body, name, name, seq, intended)
        if seq in floor.reply_seqs:
            self.awaiting += 1
        assert self.connection is not None
        self.connection.send({"type": "send", "conversation": self.conversation,
                              "client_msg_id": f"{floor.codec.run}-{name}-{seq}",
                              "text": text})
        self.index += 1
        if self.index < len(self.plan):
            floor.schedule(self.plan[self.index][0], self)
        elif self.awaiting:
            self.answers_timer = floor.loop.call_later(10.0, self.close)
        else:
            self.close()

    def close(self) -> None:
        if self.answers_timer is not None:
            self.answers_timer.cancel()
            self.answers_timer = None
        assert self.connection is not None
        self.connection.send({"type": "close", "conversation": self.conversation})
        floor = self.floor
        if floor.loop.time() < floor.stop_at:
            floor.loop.call_later(max(0, self.plan_end_us - now_us()) / 1e6, self.start_round)


class _FloorAgent:
    def __init__(self, floor: _Floor, name: str) -> None:
        self.floor = floor
        self.name = name
        self.connection: _Connection | None = None

    def on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        floor = self.floor
        if kind == "message":
            received = now_us()
            stamp = floor.receipt(frame, self.name, received)
            if stamp is None:
                return
            if stamp.seq in floor.reply_seqs and self.connection is not None:
                conversation = f"{stamp.conversation}>r"
                text = floor.codec.stamp_text(AGENT_REPLIES[stamp.seq % len(AGENT_REPLIES)],
                                              self.name, conversation, stamp.seq, received)
                floor.sends.extend((self.name, conversation, stamp.seq, received, now_us(),
                                    "reply"))
                self.connection.send({
                    "type": "reply", "conversation": frame["conversation"],
                    "client_msg_id": f"{floor.codec.run}-r-{stamp.conversation}-{stamp.seq}",
                    "text": text})
        elif kind == "ack":
            floor.acks.extend((self.name, 0, now_us(), str(frame["id"])))


async def _floor_run(port: int, users: int, seconds: float) -> dict[str, float]:
    floor = _Floor(load_script("shopper"))
    loop = floor.loop

    async def connect(owner: _FloorCustomer | _FloorAgent, hello: dict[str, Any]) -> None:
        _, connection = await loop.create_connection(lambda: _Connection(owner, port),
                                                     "127.0.0.1", port)
        await connection.ready
        owner.connection = connection
        connection.send(hello)

    for credential in load_target(None).agents:
        agent = _FloorAgent(floor, credential.id)
        await connect(agent, {"type": "hello", "role": "agent", "agent": agent.name})
    customers = []
    for i in range(users):
        customer = _FloorCustomer(floor, f"c{i}", random.Random(i))
        await connect(customer, {"type": "hello", "role": "customer", "customer": customer.name})
        customers.append(customer)
    floor.stop_at = loop.time() + WARM_UP_S + seconds + 1
    for customer in customers:
        customer.plan_end_us = now_us()
        customer.start_round()
    await asyncio.sleep(WARM_UP_S)
    cpu0, sent0, late0, t0 = cpu_seconds(), len(floor.sends), floor.late, time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, sent1, late1, t1 = cpu_seconds(), len(floor.sends), floor.late, time.monotonic()
    if floor.failure is not None:
        raise SystemExit(f"floor: {floor.failure}")
    messages = (sent1 - sent0) // SEND_FIELDS
    return {"per_s": messages / (t1 - t0), "cpu_us": (cpu1 - cpu0) / messages * 1e6,
            "late": late1 - late0}


def floor_phase(port: int, users: int, seconds: float) -> dict[str, float]:
    import uvloop

    return uvloop.run(_floor_run(port, users, seconds))


# -- chatprobe's engine ------------------------------------------------------------------


def engine_phase(port: int, users: int, seconds: float,
                 compiled: bool = False) -> dict[str, float]:
    script = load_script("shopper")
    engine_class = CompiledWorkerEngine if compiled else WorkerEngine
    engine = engine_class(f"http://127.0.0.1:{port}", load_target(None), StampCodec.new_run(),
                          "w0", script)
    engine.start(time.sleep)
    deadline = time.monotonic() + 10
    while not engine.ready:
        if time.monotonic() > deadline:
            raise SystemExit(f"engine: the probe agents did not log in ({engine.failure})")
        time.sleep(0.01)
    rngs = [random.Random(i) for i in range(users)]
    plan_end = [now_us()] * users
    rounds = [0] * users
    stop = time.monotonic() + WARM_UP_S + seconds
    sent = 0
    mark: tuple[float, float, int, int] | None = None  # when the measured time began

    def take() -> None:
        nonlocal sent
        sent += len(engine.take_batch(None)["sends"]) // SEND_FIELDS

    def hand_over() -> None:
        # As Locust's users do: each customer's rounds up to a second ahead, in bursts.
        horizon = now_us() + 1_000_000
        for user in range(users):
            while plan_end[user] < horizon:
                rounds[user] += 1
                plan = script.plan(rngs[user], plan_end[user], THINK_SCALE)
                engine.play_round(f"c{user}", f"c{user}-{rounds[user]}", plan, -1,
                                  plan_end[user])
                plan_end[user] = plan[-1][0]

    started = time.monotonic()
    while (now := time.monotonic()) < stop:
        hand_over()
        take()
        if mark is None and now - started >= WARM_UP_S:
            mark = (now, cpu_seconds(), sent, engine.out.late_sends)
        time.sleep(0.2)  # hands over a second ahead: a fifth of that is plenty
    take()
    end = (time.monotonic(), cpu_seconds(), sent, engine.out.late_sends)
    engine.stop()
    assert mark is not None
    t0, cpu0, sent0, late0 = mark
    messages = end[2] - sent0
    return {"per_s": messages / (end[0] - t0), "cpu_us": (end[1] - cpu0) / messages * 1e6,
            "late": end[3] - late0}


# -- the floor in C ------------------------------------------------------------------------


def build_compiled(folder: str) -> str | None:
    """Build benchmarks/floor.c; its path, or None when this machine has no C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    binary = os.path.join(folder, "floor")
    built = subprocess.run([compiler, "-O2", "-o", binary, str(ROOT / "benchmarks" / "floor.c")],
                           capture_output=True, text=True, check=False)
    if built.returncode != 0:
        print(f"c-floor: {compiler} failed: {built.stderr.strip()[-300:]}")
        return None
    return binary


def compiled_input(port: int, users: int, seconds: float) -> str:
    """The C floor's standard input: the same script, replies and stamps as the floor's."""
    script = load_script("shopper")
    codec = StampCodec.new_run()
    reply_mask = sum(1 << seq for seq, step in enumerate(script.steps, start=1)
                     if step.expects_reply)
    kinds = {step.kind: index for index, step in enumerate(script.steps)}
    lines = [f"{port} {users} {seconds} {WARM_UP_S} {codec.run} {codec.secret.hex()} "
             f"{reply_mask} {LATE_SEND_US}",
             " ".join(credential.id for credential in load_target(None).agents),
             "\t".join(AGENT_REPLIES)]
    rng = random.Random(1)
    for _ in range(5000):  # rounds drawn at random by each customer, as many as it needs
        plan = script.plan(rng, 0, THINK_SCALE)
        lines.append(f"R {len(plan)}")
        lines.extend(f"{at}\t{kinds[kind]}\t{body}" for at, kind, body in plan)
    return "\n".join(lines) + "\n"


def compiled_phase(binary: str, port: int, users: int, seconds: float) -> dict[str, float]:
    output = subprocess.run([binary], input=compiled_input(port, users, seconds),
                            capture_output=True, text=True, check=False)
    if output.returncode != 0:
        raise SystemExit(f"the compiled floor failed: {output.stderr.strip()[-500:]}")
    result: dict[str, float] = json.loads(output.stdout.strip().splitlines()[-1])
    if result["invalid"] or result["receipts"] == 0:
        raise SystemExit(f"the compiled floor checked its stamps wrong: {result}")
    return result


# -- the whole benchmark -------------------------------------------------------------------


def run_phase(phase: str, port: int, users: int, seconds: float) -> dict[str, float]:
    output = subprocess.run([sys.executable, __file__, "--phase", phase, "--port", str(port),
                             "--users", str(users), "--seconds", str(seconds)],
                            capture_output=True, text=True, cwd=ROOT, check=False)
    if output.returncode != 0:
        raise SystemExit(f"the {phase} phase failed: {output.stderr.strip()[-500:]}")
    result: dict[str, float] = json.loads(output.stdout.strip().splitlines()[-1])
    return result


def describe(name: str, result: dict[str, float], unit: str) -> str:
    return (f"{name:<7}{result['cpu_us']:6.0f} µs of CPU per {unit} at {result['per_s']:,.0f}/s "
            f"-> {1e6 / result['cpu_us']:,.0f}/s on a whole core")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=60,
                        help="customers of the floor and the engine (well below the cliff)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured time per phase")
    parser.add_argument("--rounds", type=int, default=2, help="floor and engine, alternated")
    parser.add_argument("--phase", choices=("floor", "engine", "c-engine"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.users < 1 or args.seconds < 2 or args.rounds < 1:
        raise SystemExit("bench_floor: --users and --rounds must be at least 1, "
                         "--seconds at least 2")
    if args.phase is not None:
        if args.phase == "floor":
            result = floor_phase(args.port, args.users, args.seconds)
        else:
            result = engine_phase(args.port, args.users, args.seconds,
                                  compiled=args.phase == "c-engine")
        print(json.dumps(result))
        return
    relay, url = bench_swarm.start_relay()
    port = int(url.rsplit(":", 1)[1])
    phases = ("floor", "engine", "c-engine", "c-floor")
    results: dict[str, list[dict[str, float]]] = {phase: [] for phase in phases}
    with tempfile.TemporaryDirectory(prefix="chatprobe-bench-floor-") as folder:
        try:
            binary = build_compiled(folder)
            if binary is None:
                print("c-floor: skipped (no C compiler, cc or gcc, or it failed)")
            refusal = compiled_engine_refusal(url, load_target(None))
            if refusal is not None:
                print(f"c-engine: skipped, {refusal}")
            # Alternated, so that this VM's drift over minutes touches all alike.
            for _ in range(args.rounds):
                for phase in phases:
                    if (phase == "c-floor" and binary is None) or (
                            phase == "c-engine" and refusal is not None):
                        continue
                    if phase == "c-floor":
                        assert binary is not None
                        result = compiled_phase(binary, port, args.users, args.seconds)
                    else:
                        result = run_phase(phase, port, args.users, args.seconds)
                    results[phase].append(result)
                    print(describe(phase, result, "stamped message") + f", "
                          f"{result['late']:.0f} sends late", flush=True)
        finally:
            relay.terminate()
            relay.wait()
    rate, shares = bench_swarm.bench_b(args.users, args.seconds + 4, 3.0)
    plain = {"per_s": rate, "cpu_us": shares["locust"] / 100 / rate * 1e6}
    print(describe("plain", plain, "round trip") + f" (Locust at {shares['locust']:.0f} % "
          "of a core)")
    best = {phase: min(r["cpu_us"] for r in runs) for phase, runs in results.items() if runs}
    print(f"engine over floor: {best['engine'] / best['floor']:.2f}x the CPU per message")
    ratios = ", ".join(f"{phase} {plain['cpu_us'] / best[phase]:.2f}" for phase in phases
                       if phase in best)
    print(f"ratio (a)/(b) on a whole core: {ratios} (the swarm's worker also runs Locust's "
          "greenlets, and must stay below its cliff)")


if __name__ == "__main__":
    main()
