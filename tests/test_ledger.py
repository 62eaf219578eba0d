"""The delivery ledger: one example per outcome and flag, then property tests against a model.

The model below is written from the ledger's docstring, not from its code:

* outcome from the *first* receipt's latency (receipt time - intended send time):
  ``<= sla`` delivered, ``<= deadline`` late, otherwise (or never received) lost;
* a message is closed as lost by ``expire(now)`` once ``now - intended > deadline``;
* duplicate: each receipt after the first one ("each extra copy received");
* reordered: a first receipt of seq ``s`` when a higher seq of the same conversation already
  had its first receipt;
* misrouted: the first receipt's receiver is outside the conversation's expected receivers;
* none of this may depend on when ``expire`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from chatprobe.ledger import Ledger, LedgerCounts, MessageRecord, Outcome, Receipt
from chatprobe.stamp import StampCodec

SLA = 100
DEADLINE = 300
SECRET = b"ledger-test-secret"


def make_ledger(sla: int = SLA, deadline: int = DEADLINE) -> Ledger:
    return Ledger(StampCodec(run="run1", secret=SECRET), sla, deadline)


def send(ledger: Ledger, conversation: str = "c", intended: int = 1000,
         sent: int | None = None, body: str = "hi") -> tuple[str, MessageRecord]:
    return ledger.stamp_and_record(body, "cust", conversation, intended,
                                   intended if sent is None else sent)


def outcome(record: MessageRecord) -> Outcome:
    """Read the outcome afresh (keeps mypy from narrowing it across ledger calls)."""
    return record.outcome


def reconciles(counts: LedgerCounts) -> bool:
    return counts.sent == counts.delivered + counts.late + counts.lost + counts.pending


# -- construction ------------------------------------------------------------------------


@pytest.mark.parametrize("sla, deadline", [(0, 10), (-1, 10), (10, 9)])
def test_rejects_bad_sla_and_deadline(sla: int, deadline: int) -> None:
    with pytest.raises(ValueError):
        make_ledger(sla, deadline)


def test_sla_equal_to_deadline_allowed() -> None:
    ledger = make_ledger(50, 50)
    text, record = send(ledger, intended=0)
    assert ledger.record_received(text, "a", 50) is Receipt.FIRST
    assert record.outcome is Outcome.DELIVERED


def test_send_assigns_consecutive_seq_per_conversation() -> None:
    ledger = make_ledger()
    seqs = [send(ledger, conv)[1].seq for conv in ("a", "b", "a", "a", "b")]
    assert seqs == [1, 1, 2, 3, 2]
    assert ledger.counts.sent == 5 and ledger.counts.pending == 5
    assert ledger.pending_count == 5
    assert len(ledger.pending_records()) == 5


# -- one example per outcome -------------------------------------------------------------


@pytest.mark.parametrize("latency", [0, 1, SLA])
def test_delivered_within_sla(latency: int) -> None:
    ledger = make_ledger()
    text, record = send(ledger, intended=1000, sent=1005)
    assert ledger.record_received(text, "agent", 1000 + latency) is Receipt.FIRST
    assert record.outcome is Outcome.DELIVERED
    assert record.latency_us == latency  # from the intended send time, not the actual one
    assert record.receiver == "agent" and record.receipts == 1
    c = ledger.counts
    assert (c.sent, c.delivered, c.late, c.lost, c.pending) == (1, 1, 0, 0, 0)
    assert ledger.latency.count == 1
    assert ledger.latency.max_us() == max(latency, 1)
    assert ledger.late_records == [] and ledger.lost_records == []


@pytest.mark.parametrize("latency", [SLA + 1, DEADLINE])
def test_late_after_sla_before_deadline(latency: int) -> None:
    ledger = make_ledger()
    text, record = send(ledger, intended=1000)
    assert ledger.record_received(text, "agent", 1000 + latency) is Receipt.FIRST
    assert record.outcome is Outcome.LATE
    c = ledger.counts
    assert (c.delivered, c.late, c.lost, c.pending) == (0, 1, 0, 0)
    assert ledger.late_records == [record]
    assert ledger.latency.count == 1


def test_lost_via_expire_only_after_deadline() -> None:
    ledger = make_ledger()
    _, record = send(ledger, intended=1000)
    assert ledger.expire(1000 + DEADLINE) == []  # exactly at the deadline: not yet lost
    assert ledger.counts.pending == 1 and outcome(record) is Outcome.PENDING
    assert ledger.latest_deadline_us() == 1000 + DEADLINE
    assert ledger.expire(1000 + DEADLINE + 1) == [record]
    assert outcome(record) is Outcome.LOST
    c = ledger.counts
    assert (c.sent, c.delivered, c.late, c.lost, c.pending) == (1, 0, 0, 1, 0)
    assert ledger.lost_records == [record]
    assert ledger.expire(10**9) == []  # never twice
    assert ledger.counts.lost == 1
    assert ledger.latest_deadline_us() is None


def test_expire_closes_only_overdue_messages() -> None:
    ledger = make_ledger()
    _, old = send(ledger, "c", intended=1000)
    _, new = send(ledger, "c", intended=2000)
    assert ledger.expire(1000 + DEADLINE + 1) == [old]
    assert ledger.pending_records() == [new]
    assert ledger.counts.pending == 1 and ledger.counts.lost == 1


def test_lost_via_finish() -> None:
    ledger = make_ledger()
    text1, r1 = send(ledger, intended=1000)
    _, r2 = send(ledger, intended=1001)
    ledger.record_received(text1, "a", 1010)
    assert ledger.finish() == [r2]
    assert r2.outcome is Outcome.LOST and r1.outcome is Outcome.DELIVERED
    c = ledger.counts
    assert (c.sent, c.delivered, c.lost, c.pending) == (2, 1, 1, 0)
    assert ledger.lost_records == [r2]
    assert ledger.finish() == []
    assert ledger.counts.lost == 1


def test_received_after_expire_stays_lost() -> None:
    ledger = make_ledger()
    text, record = send(ledger, intended=1000)
    ledger.expire(2000)
    assert ledger.record_received(text, "a", 2001) is Receipt.AFTER_DEADLINE
    c = ledger.counts
    assert (c.delivered, c.late, c.lost, c.pending) == (0, 0, 1, 0)
    assert c.received_after_deadline == 1 and c.duplicate == 0
    assert record.outcome is Outcome.LOST
    assert record.first_receipt_us == 2001 and record.receiver == "a"
    assert ledger.latency.count == 0  # a lost message's latency is not a latency sample


def test_received_after_deadline_without_expire_is_lost() -> None:
    ledger = make_ledger()
    text, record = send(ledger, intended=1000)
    assert ledger.record_received(text, "a", 1000 + DEADLINE + 1) is Receipt.AFTER_DEADLINE
    c = ledger.counts
    assert (c.delivered, c.late, c.lost, c.pending) == (0, 0, 1, 0)
    assert c.received_after_deadline == 1
    assert record.outcome is Outcome.LOST
    assert ledger.lost_records == [record]
    assert ledger.latency.count == 0
    assert ledger.expire(10**9) == [] and ledger.finish() == []
    assert ledger.counts.lost == 1


def test_duplicate() -> None:
    ledger = make_ledger()
    text, record = send(ledger, intended=1000)
    assert ledger.record_received(text, "a", 1010) is Receipt.FIRST
    assert ledger.record_received(text, "a", 1020) is Receipt.DUPLICATE
    assert ledger.record_received(text, "a", 5000) is Receipt.DUPLICATE  # even much later
    c = ledger.counts
    assert (c.delivered, c.late, c.lost, c.pending, c.duplicate) == (1, 0, 0, 0, 2)
    assert record.receipts == 3 and record.first_receipt_us == 1010
    assert record.outcome is Outcome.DELIVERED
    assert ledger.latency.count == 1


def test_extra_copy_of_lost_message_counts_as_duplicate() -> None:
    """Pins the docstring's "each extra copy received": the second copy of a message that
    arrived after its deadline is a duplicate (whether or not expire ran in between)."""
    for run_expire in (False, True):
        ledger = make_ledger()
        text, _ = send(ledger, intended=1000)
        if run_expire:
            ledger.expire(2000)
        assert ledger.record_received(text, "a", 2001) is Receipt.AFTER_DEADLINE
        assert ledger.record_received(text, "a", 2002) is Receipt.DUPLICATE
        c = ledger.counts
        assert (c.lost, c.received_after_deadline, c.duplicate) == (1, 1, 1)


def test_reordered_is_not_loss_or_duplicate() -> None:
    ledger = make_ledger()
    t1, r1 = send(ledger, "c", intended=1000)
    t2, r2 = send(ledger, "c", intended=1001)
    t3, r3 = send(ledger, "c", intended=1002)
    assert ledger.record_received(t3, "a", 1010) is Receipt.FIRST
    assert ledger.record_received(t1, "a", 1011) is Receipt.FIRST
    assert ledger.record_received(t2, "a", 1012) is Receipt.FIRST
    c = ledger.counts
    assert (c.delivered, c.lost, c.duplicate, c.reordered) == (3, 0, 0, 2)
    assert (r1.reordered, r2.reordered, r3.reordered) == (True, True, False)


def test_order_is_per_conversation() -> None:
    ledger = make_ledger()
    a1, _ = send(ledger, "a", intended=1000)
    b1, _ = send(ledger, "b", intended=1000)
    b2, _ = send(ledger, "b", intended=1000)
    ledger.record_received(b2, "x", 1001)
    ledger.record_received(a1, "x", 1002)  # seq 1 of 'a' after seq 2 of 'b': fine
    assert ledger.counts.reordered == 0
    ledger.record_received(b1, "x", 1003)
    assert ledger.counts.reordered == 1


def test_duplicate_of_earlier_seq_is_not_reordered() -> None:
    ledger = make_ledger()
    t1, _ = send(ledger, "c", intended=1000)
    t2, _ = send(ledger, "c", intended=1000)
    ledger.record_received(t1, "a", 1001)
    ledger.record_received(t2, "a", 1002)
    assert ledger.record_received(t1, "a", 1003) is Receipt.DUPLICATE
    assert ledger.counts.reordered == 0 and ledger.counts.duplicate == 1


def test_misrouted_via_expect_receivers() -> None:
    ledger = make_ledger()
    ledger.expect_receivers("c", ["agent-1", "agent-2"])
    t1, r1 = send(ledger, "c", intended=1000)
    t2, r2 = send(ledger, "c", intended=1000)
    t3, r3 = send(ledger, "other", intended=1000)
    assert ledger.record_received(t1, "agent-2", 1001) is Receipt.FIRST
    assert ledger.record_received(t2, "agent-9", 1002) is Receipt.FIRST
    assert ledger.record_received(t3, "agent-9", 1003) is Receipt.FIRST  # no expectation
    assert (r1.misrouted, r2.misrouted, r3.misrouted) == (False, True, False)
    c = ledger.counts
    assert (c.misrouted, c.delivered) == (1, 3)


def test_expect_receivers_none_clears_expectation() -> None:
    ledger = make_ledger()
    ledger.expect_receivers("c", ["agent-1"])
    ledger.expect_receivers("c", None)
    text, record = send(ledger, "c")
    ledger.record_received(text, "agent-9", 1001)
    assert ledger.counts.misrouted == 0 and not record.misrouted


def test_duplicate_copy_to_wrong_receiver_is_misrouted() -> None:
    ledger = make_ledger()
    ledger.expect_receivers("c", ["agent-1"])
    text, _ = send(ledger, "c", intended=1000)
    ledger.record_received(text, "agent-1", 1001)
    ledger.record_received(text, "agent-9", 1002)
    assert ledger.counts.misrouted >= 1


def test_forged_body() -> None:
    ledger = make_ledger()
    text, record = send(ledger, body="pay 100")
    assert ledger.record_received(text.replace("100", "900"), "a", 1001) is Receipt.FORGED
    c = ledger.counts
    assert (c.forged, c.pending, c.delivered) == (1, 1, 0)
    assert record.outcome is Outcome.PENDING
    assert ledger.record_received(text, "a", 1002) is Receipt.FIRST  # the genuine one


def test_forged_signature_of_this_run() -> None:
    ledger = make_ledger()
    other_secret = StampCodec(run="run1", secret=b"not-the-ledger-secret")
    text = other_secret.stamp_text("x", "cust", "c", 1, 1000)
    send(ledger, "c")
    assert ledger.record_received(text, "a", 1001) is Receipt.FORGED
    assert ledger.counts.forged == 1 and ledger.counts.pending == 1


def test_foreign() -> None:
    ledger = make_ledger()
    send(ledger, "c")
    text = StampCodec(run="run2", secret=SECRET).stamp_text("x", "cust", "c", 1, 1000)
    assert ledger.record_received(text, "a", 1001) is Receipt.FOREIGN
    c = ledger.counts
    assert (c.foreign, c.forged, c.unknown, c.pending) == (1, 0, 0, 1)


def test_unknown() -> None:
    ledger = make_ledger()
    text = ledger.codec.stamp_text("x", "cust", "c", 99, 1000)
    assert ledger.record_received(text, "a", 1001) is Receipt.UNKNOWN
    assert ledger.counts.unknown == 1
    assert ledger.counts.sent == 0 and reconciles(ledger.counts)


def test_forgotten_closed_message_is_unknown() -> None:
    ledger = make_ledger()
    old, _ = send(ledger, "c", intended=1000)
    new, _ = send(ledger, "c", intended=5000)
    ledger.record_received(old, "a", 1001)
    ledger.record_received(new, "a", 5001)
    ledger.forget_closed_before(2000)
    assert ledger.record_received(old, "a", 6000) is Receipt.UNKNOWN
    assert ledger.record_received(new, "a", 6000) is Receipt.DUPLICATE


@pytest.mark.parametrize("text", ["", "hello", "[cp:broken"])
def test_unstamped(text: str) -> None:
    ledger = make_ledger()
    send(ledger)
    before = LedgerCounts(**vars(ledger.counts))
    assert ledger.record_received(text, "a", 1001) is Receipt.UNSTAMPED
    assert ledger.counts == before


def test_record_ack_keeps_hop() -> None:
    ledger = make_ledger()
    _, record = send(ledger)
    Ledger.record_ack(record, "srv-1", 1003)
    assert (record.server_id, record.ack_us) == ("srv-1", 1003)
    assert record.as_dict()["server_id"] == "srv-1"


def test_counts_merge_and_availability() -> None:
    a = LedgerCounts(sent=4, delivered=2, late=1, lost=1, duplicate=1)
    b = LedgerCounts(sent=2, delivered=2, reordered=3, forged=1)
    a.merge(b)
    assert a == LedgerCounts(sent=6, delivered=4, late=1, lost=1, duplicate=1, reordered=3,
                             forged=1)
    assert a.availability == pytest.approx(4 / 6)
    assert LedgerCounts().availability is None
    assert LedgerCounts(sent=1, pending=1).availability is None


# -- expire must not change classification -------------------------------------------------


def _late_arrival_after_higher_seq(run_expire: bool) -> LedgerCounts:
    """seq 2 arrives on time; seq 1 arrives after its deadline, at a wrong agent."""
    ledger = make_ledger()
    ledger.expect_receivers("c", ["agent-1"])
    t1, _ = send(ledger, "c", intended=1000)
    t2, _ = send(ledger, "c", intended=1000)
    ledger.record_received(t2, "agent-1", 1010)
    if run_expire:
        ledger.expire(1000 + DEADLINE + 50)
    assert ledger.record_received(t1, "agent-9", 1000 + DEADLINE + 100) is (
        Receipt.AFTER_DEADLINE)
    ledger.finish()
    return ledger.counts


def test_late_arrival_outcome_counts_do_not_depend_on_expire() -> None:
    with_expire = _late_arrival_after_higher_seq(True)
    without = _late_arrival_after_higher_seq(False)
    for key in ("sent", "delivered", "late", "lost", "pending", "duplicate",
                "received_after_deadline"):
        assert getattr(with_expire, key) == getattr(without, key), key


def test_late_arrival_flags_do_not_depend_on_expire() -> None:
    with_expire = _late_arrival_after_higher_seq(True)
    without = _late_arrival_after_higher_seq(False)
    assert (with_expire.reordered, with_expire.misrouted) == (
        without.reordered, without.misrouted)


# -- property tests against an independent model ----------------------------------------

START = 1000
RECEIVERS = ("agent-a", "agent-b", "agent-c")
EXPECTATIONS: tuple[frozenset[str] | None, ...] = (
    None, frozenset({"agent-a"}), frozenset({"agent-a", "agent-b"}))


@dataclass(frozen=True)
class Send:
    conversation: int
    gap: int  # sent time minus the previous send's
    lag: int  # sent time minus intended time (a generator behind its plan)
    first_receiver: int  # index into RECEIVERS; later copies go to agent-a (always expected)
    transits: tuple[int, ...]  # receipt times minus sent time, one per copy, ascending


@dataclass(frozen=True)
class Schedule:
    expected: tuple[frozenset[str] | None, ...]  # per conversation
    sends: tuple[Send, ...]
    expires: tuple[int, ...]  # absolute times


@st.composite
def schedules(draw: st.DrawFn) -> Schedule:
    conversations = draw(st.integers(1, 3))
    expected = tuple(draw(st.sampled_from(EXPECTATIONS)) for _ in range(conversations))
    sends = draw(st.lists(st.builds(
        Send,
        conversation=st.integers(0, conversations - 1),
        gap=st.integers(0, 120),
        lag=st.one_of(st.just(0), st.integers(0, DEADLINE + 100)),
        first_receiver=st.integers(0, len(RECEIVERS) - 1),
        # Sorted: copy 0 is the first one fed to the ledger (ties keep copy order).
        transits=st.lists(st.integers(0, 2 * DEADLINE), max_size=3).map(
            lambda t: tuple(sorted(t))),
    ), max_size=25).map(tuple))
    span = sum(s.gap for s in sends) + 3 * DEADLINE
    expires = tuple(draw(st.lists(st.integers(START, START + span), max_size=6)))
    return Schedule(expected, sends, expires)


@dataclass
class ModelMessage:
    conversation: str
    seq: int
    intended: int
    first: int | None = None
    expired: bool = False


@dataclass
class Model:
    """The docstring's rules, kept as plain counters."""

    messages: dict[int, ModelMessage] = field(default_factory=dict)
    max_seq: dict[str, int] = field(default_factory=dict)
    counts: LedgerCounts = field(default_factory=LedgerCounts)
    expected: dict[str, frozenset[str] | None] = field(default_factory=dict)
    # A message closed by expire and received afterwards: the case behind the known bug.
    received_after_expire: bool = False

    def send(self, index: int, message: ModelMessage) -> None:
        self.messages[index] = message
        self.counts.sent += 1
        self.counts.pending += 1

    def receive(self, index: int, receiver: str, now: int) -> Receipt:
        m = self.messages[index]
        c = self.counts
        if m.first is not None:
            c.duplicate += 1
            return Receipt.DUPLICATE
        m.first = now
        if self.max_seq.get(m.conversation, 0) > m.seq:
            c.reordered += 1
        self.max_seq[m.conversation] = max(self.max_seq.get(m.conversation, 0), m.seq)
        expected = self.expected[m.conversation]
        if expected is not None and receiver not in expected:
            c.misrouted += 1
        latency = now - m.intended
        if m.expired:
            self.received_after_expire = True
            assert latency > DEADLINE  # the model's own sanity: expire never runs early
            c.received_after_deadline += 1
            return Receipt.AFTER_DEADLINE
        c.pending -= 1
        if latency > DEADLINE:
            c.lost += 1
            c.received_after_deadline += 1
            return Receipt.AFTER_DEADLINE
        if latency <= SLA:
            c.delivered += 1
        else:
            c.late += 1
        return Receipt.FIRST

    def expire(self, now: int) -> set[int]:
        closed = set()
        for index, m in self.messages.items():
            if m.first is None and not m.expired and now - m.intended > DEADLINE:
                m.expired = True
                closed.add(index)
        self.counts.pending -= len(closed)
        self.counts.lost += len(closed)
        return closed

    def finish(self) -> None:
        for m in self.messages.values():
            if m.first is None and not m.expired:
                m.expired = True
                self.counts.lost += 1
        self.counts.pending = 0


OUTCOME_KEYS = ("sent", "delivered", "late", "lost", "pending", "duplicate",
                "received_after_deadline", "forged", "foreign", "unknown")
FLAG_KEYS = ("reordered", "misrouted")


def events(schedule: Schedule, use_expire: bool) -> list[tuple[int, int, int, int]]:
    """(time, kind, message index, copy index) in the order the ledger sees them.
    kind: 0 send, 1 receipt, 2 expire (message index = expire index)."""
    out: list[tuple[int, int, int, int]] = []
    sent = START
    for i, s in enumerate(schedule.sends):
        sent += s.gap
        out.append((sent + s.lag, 0, i, 0))
        for j, transit in enumerate(s.transits):
            out.append((sent + s.lag + transit, 1, i, j))
    if use_expire:
        out.extend((t, 2, k, 0) for k, t in enumerate(schedule.expires))
    out.sort()
    return out


def run_schedule(schedule: Schedule, use_expire: bool, check_flags: str) -> dict[int, Outcome]:
    """Feed ``schedule`` to a ledger and to the model step by step; compare at every step.

    ``check_flags``: "always", or "until_expire_interferes" (stop comparing reordered and
    misrouted once a message closed by expire is received: the known bug)."""
    ledger = make_ledger()
    model = Model()
    for k, expected in enumerate(schedule.expected):
        ledger.expect_receivers(f"c{k}", expected)
        model.expected[f"c{k}"] = expected
    texts: dict[int, str] = {}
    records: dict[int, MessageRecord] = {}
    next_seq: dict[str, int] = {}
    for time_, kind, i, j in events(schedule, use_expire):
        if kind == 0:
            s = schedule.sends[i]
            conversation = f"c{s.conversation}"
            # The schedule sends at time_ (= sent); intended = sent - lag.
            intended = time_ - s.lag
            text, record = ledger.stamp_and_record(f"m{i}", "cust", conversation, intended,
                                                   time_)
            next_seq[conversation] = next_seq.get(conversation, 0) + 1
            assert record.seq == next_seq[conversation]
            model.send(i, ModelMessage(conversation, record.seq, intended))
            texts[i], records[i] = text, record
        elif kind == 1:
            s = schedule.sends[i]
            receiver = RECEIVERS[s.first_receiver] if j == 0 else "agent-a"
            got = ledger.record_received(texts[i], receiver, time_)
            want = model.receive(i, receiver, time_)
            assert got is want, (i, j, time_)
        else:
            expired = ledger.expire(time_)
            want_closed = model.expire(time_)
            assert {id(r) for r in expired} == {id(records[n]) for n in want_closed}
        assert reconciles(ledger.counts)
        for key in OUTCOME_KEYS:
            assert getattr(ledger.counts, key) == getattr(model.counts, key), key
        if check_flags == "always" or not model.received_after_expire:
            for key in FLAG_KEYS:
                assert getattr(ledger.counts, key) == getattr(model.counts, key), key
    ledger.finish()
    model.finish()
    assert ledger.counts.pending == 0 and ledger.pending_records() == []
    assert reconciles(ledger.counts)
    for key in OUTCOME_KEYS:
        assert getattr(ledger.counts, key) == getattr(model.counts, key), key
    if check_flags == "always" or not model.received_after_expire:
        for key in FLAG_KEYS:
            assert getattr(ledger.counts, key) == getattr(model.counts, key), key
    c = ledger.counts
    assert len(ledger.lost_records) == c.lost
    assert len(ledger.late_records) == c.late
    assert ledger.latency.count == c.delivered + c.late
    assert sorted((r.conversation, r.seq) for r in ledger.lost_records) == sorted(
        (m.conversation, m.seq) for i, m in model.messages.items()
        if m.expired or (m.first is not None and m.first - m.intended > DEADLINE))
    outcomes = {i: r.outcome for i, r in records.items()}
    assert Outcome.PENDING not in outcomes.values()
    return outcomes


@settings(max_examples=200, deadline=None)
@given(schedules())
def test_property_matches_model_without_expire(schedule: Schedule) -> None:
    run_schedule(schedule, use_expire=False, check_flags="always")


@settings(max_examples=200, deadline=None)
@given(schedules())
def test_property_matches_model_with_expire(schedule: Schedule) -> None:
    run_schedule(schedule, use_expire=True, check_flags="until_expire_interferes")


@settings(max_examples=200, deadline=None)
@given(schedules())
def test_property_outcomes_do_not_depend_on_expire(schedule: Schedule) -> None:
    assert run_schedule(schedule, True, "until_expire_interferes") == run_schedule(
        schedule, False, "always")


# The schedule of test_late_arrival_flags_do_not_depend_on_expire: c0 expects agent-a; seq 1
# arrives after its deadline (expired at 1330) at agent-b, seq 2 on time.
_KNOWN_BAD = Schedule(
    expected=(frozenset({"agent-a"}),),
    sends=(Send(0, 0, 0, 1, (DEADLINE + 100,)), Send(0, 0, 0, 0, (10,))),
    expires=(START + DEADLINE + 50,),
)


@settings(max_examples=200, deadline=None)
@given(schedules())
@example(_KNOWN_BAD)
def test_property_flags_do_not_depend_on_expire(schedule: Schedule) -> None:
    run_schedule(schedule, use_expire=True, check_flags="always")


def test_known_bad_schedule_outcomes_match_model() -> None:
    """The explicit example of the expire-independence test agrees on every count too."""
    run_schedule(_KNOWN_BAD, use_expire=True, check_flags="until_expire_interferes")
    run_schedule(_KNOWN_BAD, use_expire=False, check_flags="always")


# -- distributed merge: sends and receipts recorded from different processes ---------------

Event = tuple[int, str, int, str, int]  # (order key, kind, seq, receiver, time)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_receipts_reported_before_their_sends_give_the_same_counts(data: st.DataObject) -> None:
    """A master ledger fed worker batches in any interleaving (receipt batches may overtake
    send batches) classifies exactly like a ledger that saw everything in order."""
    messages = data.draw(st.integers(1, 25))
    latencies = data.draw(st.lists(st.one_of(st.none(), st.integers(0, 500)),
                                   min_size=messages, max_size=messages))
    in_order = Ledger(StampCodec(run="run1", secret=SECRET), SLA, DEADLINE)
    merged = Ledger(StampCodec(run="run1", secret=SECRET), SLA, DEADLINE,
                    hold_early_receipts=True)
    sends = [(seq, 1000 + 10 * seq) for seq in range(1, messages + 1)]
    receipts = [(seq, 1000 + 10 * seq + lat) for seq, lat in
                zip(range(1, messages + 1), latencies, strict=True) if lat is not None]
    for seq, intended in sends:
        in_order.record_send("cust", "c", seq, intended, intended)
    for seq, at in sorted(receipts, key=lambda r: r[1]):
        in_order.record_receipt("c", seq, "agent", at)
    # The merged ledger gets the receipt batch first, then the sends, in random chunks.
    split = data.draw(st.integers(0, len(receipts)))
    ordered_receipts = sorted(receipts, key=lambda r: r[1])
    for seq, at in ordered_receipts[:split]:
        assert merged.record_receipt("c", seq, "agent", at) is Receipt.EARLY
    for seq, intended in sends:
        merged.record_send("cust", "c", seq, intended, intended)
    for seq, at in ordered_receipts[split:]:
        merged.record_receipt("c", seq, "agent", at)
    in_order.finish()
    merged.finish()
    assert merged.counts == in_order.counts


def test_receipt_whose_send_never_arrives_is_unknown_at_finish() -> None:
    ledger = Ledger(StampCodec(run="run1", secret=SECRET), SLA, DEADLINE,
                    hold_early_receipts=True)
    assert ledger.record_receipt("c", 7, "agent", 5) is Receipt.EARLY
    assert ledger.counts.unknown == 0
    ledger.finish()
    assert ledger.counts.unknown == 1


def test_on_outcome_is_called_once_per_message() -> None:
    seen: list[tuple[int, Outcome]] = []
    ledger = Ledger(StampCodec(run="run1", secret=SECRET), SLA, DEADLINE,
                    on_outcome=lambda r: seen.append((r.seq, r.outcome)))
    for seq, intended in ((1, 0), (2, 0), (3, 0)):
        ledger.record_send("cust", "c", seq, intended, intended, kind="greeting")
    ledger.record_receipt("c", 1, "agent", 50)
    ledger.record_receipt("c", 1, "agent", 60)  # a duplicate is not a new outcome
    ledger.record_receipt("c", 2, "agent", 200)
    ledger.expire(10_000)
    ledger.finish()
    assert seen == [(1, Outcome.DELIVERED), (2, Outcome.LATE), (3, Outcome.LOST)]
