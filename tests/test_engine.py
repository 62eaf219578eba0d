"""The swarm's chat loops against the reference service, without Locust: the Python engine
(chatprobe/swarm/engine.py) and the compiled one (chatprobe/swarm/fastref.py) alike. The send
clock keeps each customer's messages in order and never early, a customer that leaves sends
none of what it had queued, and rounds planned after a refused connection get a new
connection at their time."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from chatprobe.config import AgentCredential
from chatprobe.stamp import StampCodec
from chatprobe.swarm.collector import ACK_FIELDS, RECEIPT_FIELDS, SEND_FIELDS, records
from chatprobe.swarm.engine import (
    LOOP_THREAD_LOGGERS,
    Planned,
    WorkerEngine,
    agents_of_worker,
    now_us,
)
from chatprobe.swarm.fastref import CompiledWorkerEngine
from chatprobe.swarm.scripts import load_script
from tests.conftest import ServiceProcess, scaled

Batches = dict[str, list[Any]]
Engine = WorkerEngine | CompiledWorkerEngine


class Engines(list[Engine]):
    """The engines a test started, and the kind it starts."""

    def __init__(self, engine_class: type[Engine]) -> None:
        super().__init__()
        self.engine_class = engine_class


@pytest.fixture(params=[WorkerEngine, CompiledWorkerEngine], ids=["python", "compiled"])
def engines(request: pytest.FixtureRequest) -> Iterator[Engines]:
    # The loop thread takes over these loggers (as in a Locust worker); give them back.
    loggers = [logging.getLogger(name) for name in LOOP_THREAD_LOGGERS]
    saved = [(logger.handlers, logger.propagate) for logger in loggers]
    started = Engines(request.param)
    yield started
    deadline = time.monotonic() + scaled(10)
    for engine in started:
        # Customers leave and close their connections (the service then stops at once),
        # then the loop ends.
        for key in list(engine.customers):
            engine.leave(key.removeprefix(engine.worker))
        while engine.customers:
            assert time.monotonic() < deadline, f"customers still open: {engine.customers}"
            time.sleep(0.02)
        engine.stop()
    for logger, (handlers, propagate) in zip(loggers, saved, strict=True):
        logger.handlers, logger.propagate = handlers, propagate


def start_engine(engines: Engines, service: ServiceProcess, **config: Any) -> Engine:
    # No probe agents: the service accepts and acks sends to a queued conversation.
    # A short deadline: no agent answers, and a leaving customer waits that long for them.
    engine = engines.engine_class(
        service.base_url, service.target_config(deadline_ms=300.0, **config),
        StampCodec.new_run(), "w0", script=load_script("shopper"), agents=())
    engines.append(engine)
    engine.start(time.sleep)
    return engine


def collect(engine: Engine, seen: Batches, done: Callable[[Batches], bool],
            what: str) -> Batches:
    """Take the engine's batches until ``done`` holds (bounded)."""
    deadline = time.monotonic() + scaled(20)
    while not done(seen):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} in time: {seen} {list(engine.out.events)}")
        take(engine, seen)
        time.sleep(0.02)  # polling interval of a bounded wait, not a synchronisation
    return seen


def take(engine: Engine, seen: Batches) -> None:
    """One batch of the engine's, its flat lists read back as records."""
    batch = engine.take_batch(None)
    for key, width in (("sends", SEND_FIELDS), ("acks", ACK_FIELDS),
                       ("receipts", RECEIPT_FIELDS)):
        seen.setdefault(key, []).extend(records(batch[key], width))


def plan(start_us: int, count: int, gap_us: int, label: str) -> list[Planned]:
    return [(start_us + i * gap_us, "greeting", f"{label} message {i + 1}")
            for i in range(count)]


def sends_of(seen: Batches, round_name: str) -> list[tuple[Any, ...]]:
    return [record for record in seen.get("sends", []) if record[1] == round_name]


def test_each_customers_messages_leave_in_order_and_never_before_their_plan(
        reference_service: ServiceProcess, engines: Engines) -> None:
    engine = start_engine(engines, reference_service)
    start = now_us() + 100_000
    # Three customers whose messages interleave on the one clock, 1-3 ms apart.
    for number in range(3):
        engine.play_round(f"c{number}", f"c{number}-1",
                          plan(start + number * 1_000, 8, 3_000, f"c{number}"))
    seen = collect(engine, {}, lambda s: len(s.get("acks", ())) == 24, "24 acks")
    for number in range(3):
        records = sends_of(seen, f"w0c{number}-1")
        assert [record[2] for record in records] == list(range(1, 9))
        sent_times = [record[4] for record in records]
        assert sent_times == sorted(sent_times)
        assert all(sent >= intended for _, _, _, intended, sent, _ in records)
    assert sorted((conversation, seq) for conversation, seq, _, _ in seen["acks"]) == sorted(
        (f"w0c{number}-1", seq) for number in range(3) for seq in range(1, 9))


def test_a_customer_that_leaves_sends_none_of_its_queued_rounds(
        reference_service: ServiceProcess, engines: Engines) -> None:
    engine = start_engine(engines, reference_service)
    start = now_us() + 100_000
    engine.play_round("leaver", "leaver-1", plan(start, 3, 5_000, "first"))
    engine.play_round("leaver", "leaver-2", plan(start + 2_000_000, 3, 5_000, "second"))
    seen = collect(engine, {}, lambda s: len(sends_of(s, "w0leaver-1")) == 3, "first round")
    engine.leave("leaver")
    # A customer planned after the leaver's second round: once its message is sent, the
    # clock has passed every message of that round.
    engine.play_round("marker", "marker-1", plan(start + 2_200_000, 1, 0, "marker"))
    collect(engine, seen, lambda s: len(sends_of(s, "w0marker-1")) == 1, "marker")
    assert sends_of(seen, "w0leaver-2") == []


def test_rounds_planned_after_a_refused_connection_get_a_new_one_at_their_time(
        reference_service: ServiceProcess, engines: Engines) -> None:
    # The shop does not exist yet: the customer's login is refused.
    engine = start_engine(engines, reference_service, shop="popup")
    start = now_us() + 100_000
    later = start + int(scaled(3) * 1_000_000)
    engine.play_round("early", "early-1", plan(start, 3, 5_000, "refused"))
    engine.play_round("early", "early-2", plan(later, 3, 5_000, "accepted"))
    seen = collect(engine, {}, lambda s: len(sends_of(s, "w0early-1")) == 3,
                   "the refused round's records")
    assert any("early dead" in event for event in engine.out.events), engine.out.events
    # Recorded as sent (the customer tried), so the ledger calls them lost at the deadline.
    assert now_us() < later, "the machine is too slow for this test's margin"
    reference_service.ok("PUT", "/admin/shops/popup", {"name": "Popup"})
    collect(engine, seen, lambda s: sum(1 for conversation, *_ in s.get("acks", ())
                                        if conversation == "w0early-2") == 3,
            "acks of the round planned after the refusal")
    assert [conversation for conversation, *_ in seen["acks"]].count("w0early-1") == 0
    assert all(sent >= intended for *_, intended, sent, _ in sends_of(seen, "w0early-2"))


def test_a_customer_that_leaves_mid_round_closes_at_once_not_at_its_next_message(
        reference_service: ServiceProcess, engines: Engines) -> None:
    engine = start_engine(engines, reference_service)
    start = now_us() + 100_000
    next_message = start + int(scaled(10) * 1_000_000)  # a long think before message 2
    engine.play_round("slow", "slow-1", [(start, "greeting", "hello"),
                                         (next_message, "product_question", "is it in stock?")])
    seen = collect(engine, {}, lambda s: len(sends_of(s, "w0slow-1")) == 1, "first message")
    engine.leave("slow")
    deadline = time.monotonic() + scaled(5)
    while "w0slow" in engine.customers:
        assert time.monotonic() < deadline, "the leaving customer kept its connection"
        time.sleep(0.02)  # polling interval of a bounded wait
    assert now_us() < next_message
    take(engine, seen)  # anything sent before it left
    assert len(sends_of(seen, "w0slow-1")) == 1


def test_the_probe_agents_are_shared_out_among_the_workers_each_logged_in_once() -> None:
    agents = tuple(AgentCredential(f"probe-{i}", f"token-{i}") for i in range(1, 6))
    shares = [agents_of_worker(agents, index, [0, 1]) for index in range(2)]
    assert [[a.id for a in share] for share in shares] == [
        ["probe-1", "probe-3", "probe-5"], ["probe-2", "probe-4"]]
    # Locust's worker indexes only count up: a worker that left before the start leaves a
    # gap, and every agent still has its worker.
    gap = [agents_of_worker(agents, index, [0, 2]) for index in range(3)]
    assert [len(share) for share in gap] == [3, 0, 2]
    # More workers than agents: some confirm nothing; a late joiner beyond the workers the
    # run started with logs in none (a second session would take an agent's conversations).
    assert [len(agents_of_worker(agents[:2], index, [0, 1, 2])) for index in range(4)] == [
        1, 1, 0, 0]
    # A worker that was not told (an older master, a local run) behaves as worker 0 did.
    assert agents_of_worker(agents, 0, []) == agents and agents_of_worker(agents, 1, []) == ()
