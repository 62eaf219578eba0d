"""Benchmark (not a test): the pure core's cost per message, stamp + ledger record + match.

Run: .venv/bin/python benchmarks/bench_core.py [--messages N]
Prints microseconds per message for each step and the total against the 10 µs target, and
what an agent's bounded memory of its messages costs per message once it is full.
"""

from __future__ import annotations

import argparse
import time

from chatprobe.ledger import Ledger
from chatprobe.protocols.link import REPLY_MEMORY, RecentMap
from chatprobe.stamp import StampCodec

TARGET_US = 10.0
BODY = "Hi, is the down jacket still in stock in size XL? Order 418273645512."


def bench(messages: int, conversations: int) -> dict[str, float]:
    codec = StampCodec.new_run("bench")
    ledger = Ledger(codec, sla_us=3_000_000, deadline_us=10_000_000)
    names = [f"c{i}" for i in range(conversations)]
    texts: list[str] = []
    t0 = time.perf_counter_ns()
    for j in range(messages):
        name = names[j % conversations]
        text, _ = ledger.stamp_and_record(BODY, name, name, j, j)
        texts.append(text)
    t1 = time.perf_counter_ns()
    for j, text in enumerate(texts):
        ledger.record_received(text, "probe-1", j + 500)
    t2 = time.perf_counter_ns()
    ledger.expire(messages + 20_000_000)
    t3 = time.perf_counter_ns()
    assert ledger.counts.delivered == messages, ledger.counts
    send_us = (t1 - t0) / 1000 / messages
    receive_us = (t2 - t1) / 1000 / messages
    expire_us = (t3 - t2) / 1000 / messages
    return {"stamp+record": send_us, "parse+verify+match": receive_us, "expire": expire_us,
            "total": send_us + receive_us + expire_us}


def reply_memory_at_its_bound(messages: int) -> float:
    """µs per message an agent's memory of its messages' conversations costs once full (it
    grows with every message an agent receives, for the whole run)."""
    memory: RecentMap[str, int] = RecentMap(REPLY_MEMORY)
    for i in range(REPLY_MEMORY):
        memory.remember(str(i), i)
    keys = [str(i) for i in range(REPLY_MEMORY, REPLY_MEMORY + messages)]
    t0 = time.perf_counter_ns()
    for i, key in enumerate(keys):
        memory.remember(key, i)
    return (time.perf_counter_ns() - t0) / 1000 / messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    best: dict[str, float] | None = None
    for _ in range(args.rounds):
        result = bench(args.messages, args.conversations)
        if best is None or result["total"] < best["total"]:
            best = result
    assert best is not None
    for name, value in best.items():
        print(f"{name:<22}{value:8.2f} µs/message")
    ratio = best["total"] / TARGET_US
    verdict = "within" if ratio <= 1 else "OVER"
    print(f"total / target ({TARGET_US:g} µs) = {ratio:.2f}  ({verdict} target; "
          f"{1e6 / best['total']:,.0f} messages/s on one core)")
    print(f"an agent's reply memory, full ({REPLY_MEMORY:,} ids): "
          f"{reply_memory_at_its_bound(args.messages):.2f} µs/message")


if __name__ == "__main__":
    main()
