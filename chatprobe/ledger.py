"""The delivery ledger: records stamped sends and receipts and names every message's outcome.

Pure code: every method takes the time (microseconds on the run's clock) as an argument and
does no I/O, so the same ledger serves asyncio probes, gevent Locust users and tests.

Rules (measurement.md):

* every sent message ends as exactly one of delivered (first receipt within the SLA), late
  (first receipt after the SLA but before the deadline) or lost (no receipt by the deadline);
  ``sent == delivered + late + lost + pending`` holds at every moment, and ``pending`` is 0
  after :meth:`Ledger.finish`;
* flags on top: duplicate (each extra copy received), reordered (first receipt after a later
  message of the same conversation was received: *not* loss plus duplicate), misrouted
  (received by a receiver not expected for that conversation), forged (stamp of this run whose
  signature or body does not check);
* classification depends only on the timestamps passed in, never on when :meth:`expire` runs,
  so a stalled harness cannot create false loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from enum import StrEnum

from chatprobe.histogram import LatencyHistogram
from chatprobe.stamp import StampCodec

EXAMPLES_KEPT = 10_000  # lost/late records kept for diagnosis once a long run prunes


class Outcome(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    LATE = "late"
    LOST = "lost"


class Receipt(StrEnum):
    """What one received text turned out to be."""

    FIRST = "first"
    DUPLICATE = "duplicate"
    AFTER_DEADLINE = "after_deadline"
    FORGED = "forged"
    FOREIGN = "foreign"
    UNKNOWN = "unknown"
    UNSTAMPED = "unstamped"
    EARLY = "early"  # receipt reported before its send (distributed runs): held until then


def stamp_fields(run: str, record: MessageRecord) -> str:
    """A message's stamp as evidence: the signed fields, without the signature."""
    return (f"cp:{run}:{record.sender}:{record.conversation}:{record.seq}:"
            f"{record.intended_us:x}")


class MessageRecord:
    """One stamped message and every hop chatprobe saw for it (times in µs, run clock)."""

    __slots__ = (
        "ack_us",
        "conversation",
        "first_receipt_us",
        "intended_us",
        "kind",
        "misrouted",
        "outcome",
        "receipts",
        "receiver",
        "reordered",
        "sender",
        "sent_us",
        "seq",
        "server_id",
    )

    def __init__(self, sender: str, conversation: str, seq: int, intended_us: int,
                 sent_us: int, kind: str = "") -> None:
        self.kind = kind
        self.sender = sender
        self.conversation = conversation
        self.seq = seq
        self.intended_us = intended_us
        self.sent_us = sent_us
        self.ack_us: int | None = None
        self.server_id: str | None = None
        self.first_receipt_us: int | None = None
        self.receiver: str | None = None
        self.receipts = 0
        self.outcome = Outcome.PENDING
        self.reordered = False
        self.misrouted = False

    @property
    def latency_us(self) -> int | None:
        if self.first_receipt_us is None:
            return None
        return self.first_receipt_us - self.intended_us

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass
class LedgerCounts:
    sent: int = 0
    delivered: int = 0
    late: int = 0
    lost: int = 0
    pending: int = 0
    duplicate: int = 0
    reordered: int = 0
    misrouted: int = 0
    forged: int = 0
    foreign: int = 0
    unknown: int = 0
    received_after_deadline: int = 0
    resent: int = 0  # sends recorded twice under one stamp (ignored; a harness fault)

    def merge(self, other: LedgerCounts) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    @property
    def availability(self) -> float | None:
        """delivered-within-SLA / closed messages (lost and late count against it)."""
        closed = self.delivered + self.late + self.lost
        return self.delivered / closed if closed else None


@dataclass
class _ConversationOrder:
    max_time_us: int
    max_seq: int
    received: list[MessageRecord]


class Ledger:
    """Classifies stamped messages of one run. Not thread-safe: one owner, or merge counts."""

    def __init__(self, codec: StampCodec, sla_us: int, deadline_us: int,
                 hold_early_receipts: bool = False,
                 on_outcome: Callable[[MessageRecord], None] | None = None) -> None:
        """``hold_early_receipts``: in a distributed run a receipt can reach the ledger before
        its send record (they come from different processes); hold it until the send arrives
        instead of calling it unknown. ``on_outcome`` is called once per message when it is
        classified (delivered, late or lost), e.g. to feed Locust's statistics."""
        if sla_us <= 0 or deadline_us < sla_us:
            raise ValueError("need 0 < sla <= deadline")
        self.codec = codec
        self.sla_us = sla_us
        self.deadline_us = deadline_us
        self.counts = LedgerCounts()
        self.latency = LatencyHistogram()
        self._pending: dict[tuple[str, int], MessageRecord] = {}
        self._closed: dict[tuple[str, int], MessageRecord] = {}
        self._next_seq: dict[str, int] = {}
        self._order: dict[str, _ConversationOrder] = {}
        self._expected: dict[str, frozenset[str]] = {}
        self.lost_records: list[MessageRecord] = []
        self.late_records: list[MessageRecord] = []
        self.hold_early_receipts = hold_early_receipts
        self.on_outcome = on_outcome
        self._early: dict[tuple[str, int], list[tuple[str, int]]] = {}

    # -- sending -----------------------------------------------------------------------

    def expect_receivers(self, conversation: str, receivers: Iterable[str] | None) -> None:
        """Receipts of this conversation by anyone outside ``receivers`` are misrouted."""
        if receivers is None:
            self._expected.pop(conversation, None)
        else:
            self._expected[conversation] = frozenset(receivers)

    def stamp_and_record(self, body: str, sender: str, conversation: str, intended_us: int,
                         sent_us: int, kind: str = "") -> tuple[str, MessageRecord]:
        """Stamp ``body`` with the conversation's next sequence number and record the send."""
        seq = self._next_seq.get(conversation, 0) + 1
        self._next_seq[conversation] = seq
        text = self.codec.stamp_text(body, sender, conversation, seq, intended_us)
        return text, self.record_send(sender, conversation, seq, intended_us, sent_us, kind)

    def record_send(self, sender: str, conversation: str, seq: int, intended_us: int,
                    sent_us: int, kind: str = "") -> MessageRecord:
        """Record a send stamped elsewhere (another process made the stamp)."""
        key = (conversation, seq)
        known = self._pending.get(key) or self._closed.get(key)
        if known is not None:
            # The same stamp recorded twice is a harness fault; never count one message twice.
            self.counts.resent += 1
            return known
        record = MessageRecord(sender, conversation, seq, intended_us, sent_us, kind)
        self._pending[key] = record
        self.counts.sent += 1
        self.counts.pending += 1
        early = self._early.pop(key, None)
        if early is not None:
            for receiver, received_us in sorted(early, key=lambda item: item[1]):
                self.record_receipt(conversation, seq, receiver, received_us)
        return record

    @staticmethod
    def record_ack(record: MessageRecord, server_id: str, ack_us: int) -> None:
        """The target accepted the message and gave it an id (the first hop)."""
        record.server_id = server_id
        record.ack_us = ack_us

    def record_ack_of(self, conversation: str, seq: int, server_id: str, ack_us: int) -> bool:
        """:meth:`record_ack` for a send recorded earlier (by another process); False when
        the send is unknown or already forgotten."""
        key = (conversation, seq)
        record = self._pending.get(key) or self._closed.get(key)
        if record is None:
            return False
        self.record_ack(record, server_id, ack_us)
        return True

    # -- receiving ---------------------------------------------------------------------

    def record_received(self, text: str, receiver: str, received_us: int) -> Receipt:
        """Match a received text against the ledger and classify it."""
        stamp = self.codec.parse(text)
        counts = self.counts
        if stamp is None:
            return Receipt.UNSTAMPED
        if stamp.foreign:
            counts.foreign += 1
            return Receipt.FOREIGN
        if not stamp.valid:
            counts.forged += 1
            return Receipt.FORGED
        return self.record_receipt(stamp.conversation, stamp.seq, receiver, received_us)

    def record_receipt(self, conversation: str, seq: int, receiver: str,
                       received_us: int) -> Receipt:
        """Classify a receipt of a genuine stamp (already parsed and verified)."""
        counts = self.counts
        key = (conversation, seq)
        record = self._pending.pop(key, None)
        if record is None:
            closed = self._closed.get(key)
            if closed is None:
                if self.hold_early_receipts:
                    self._early.setdefault(key, []).append((receiver, received_us))
                    return Receipt.EARLY
                counts.unknown += 1
                return Receipt.UNKNOWN
            closed.receipts += 1
            self._check_route(closed, receiver)
            if closed.first_receipt_us is None:
                # Declared lost by expire() before it arrived: it stays lost, but its flags
                # are the same as if it had arrived before expire() ran.
                closed.first_receipt_us = received_us
                closed.receiver = receiver
                self._check_order(closed)
                counts.received_after_deadline += 1
                return Receipt.AFTER_DEADLINE
            counts.duplicate += 1
            return Receipt.DUPLICATE
        counts.pending -= 1
        record.receipts = 1
        record.first_receipt_us = received_us
        record.receiver = receiver
        self._check_order(record)
        self._check_route(record, receiver)
        self._closed[key] = record
        latency = received_us - record.intended_us
        if latency > self.deadline_us:
            record.outcome = Outcome.LOST
            counts.lost += 1
            counts.received_after_deadline += 1
            self.lost_records.append(record)
            if self.on_outcome is not None:
                self.on_outcome(record)
            return Receipt.AFTER_DEADLINE
        self.latency.record_us(latency)
        if latency <= self.sla_us:
            record.outcome = Outcome.DELIVERED
            counts.delivered += 1
        else:
            record.outcome = Outcome.LATE
            counts.late += 1
            self.late_records.append(record)
        if self.on_outcome is not None:
            self.on_outcome(record)
        return Receipt.FIRST

    def _check_order(self, record: MessageRecord) -> None:
        """Reordered: a higher seq of the same conversation was first received strictly
        earlier. Decided by receipt times, not by the order receipts reach the ledger, so a
        distributed run (batches from several processes) counts what a single process would.
        """
        time_us = record.first_receipt_us
        assert time_us is not None
        order = self._order.get(record.conversation)
        if order is None:
            self._order[record.conversation] = _ConversationOrder(time_us, record.seq, [record])
            return
        if time_us >= order.max_time_us:
            # The common case, receipts in time order: one comparison. (At equal times the
            # one that reached the ledger first counts as first.)
            if record.seq < order.max_seq:
                record.reordered = True
                self.counts.reordered += 1
        else:
            for other in order.received:
                assert other.first_receipt_us is not None
                if other.seq > record.seq and other.first_receipt_us <= time_us:
                    if not record.reordered:
                        record.reordered = True
                        self.counts.reordered += 1
                elif (other.seq < record.seq and other.first_receipt_us > time_us
                      and not other.reordered):
                    other.reordered = True
                    self.counts.reordered += 1
        order.received.append(record)
        order.max_time_us = max(order.max_time_us, time_us)
        order.max_seq = max(order.max_seq, record.seq)

    def _check_route(self, record: MessageRecord, receiver: str) -> None:
        """Any copy reaching a receiver not expected for its conversation: misrouted (once)."""
        if record.misrouted:
            return
        expected = self._expected.get(record.conversation)
        if expected is not None and receiver not in expected:
            record.misrouted = True
            self.counts.misrouted += 1

    # -- closing -----------------------------------------------------------------------

    def expire(self, now_us: int) -> list[MessageRecord]:
        """Close every pending message whose deadline has passed as lost; return them."""
        cutoff = now_us - self.deadline_us
        expired = [r for r in self._pending.values() if r.intended_us < cutoff]
        for record in expired:
            del self._pending[(record.conversation, record.seq)]
            record.outcome = Outcome.LOST
            self._closed[(record.conversation, record.seq)] = record
        self.counts.pending -= len(expired)
        self.counts.lost += len(expired)
        self.lost_records.extend(expired)
        self._report(expired)
        return expired

    def _report(self, records: list[MessageRecord]) -> None:
        if self.on_outcome is not None:
            for record in records:
                self.on_outcome(record)

    def forget_closed_before(self, intended_before_us: int) -> None:
        """Drop closed records older than a retention horizon (long runs). A copy arriving
        later counts as unknown instead of duplicate; lost and late examples are kept up to
        EXAMPLES_KEPT each."""
        stale = [k for k, r in self._closed.items() if r.intended_us < intended_before_us]
        for key in stale:
            del self._closed[key]
        for conversation in [c for c, o in self._order.items()
                             if o.max_time_us < intended_before_us]:
            del self._order[conversation]
        del self.lost_records[EXAMPLES_KEPT:]
        del self.late_records[EXAMPLES_KEPT:]

    def finish(self) -> list[MessageRecord]:
        """End of run: whatever is still pending is lost. Call after the last deadline."""
        remaining = list(self._pending.values())
        for record in remaining:
            record.outcome = Outcome.LOST
            self._closed[(record.conversation, record.seq)] = record
        self._pending.clear()
        self.counts.pending = 0
        self.counts.lost += len(remaining)
        self.lost_records.extend(remaining)
        # Receipts whose send never showed up: stamps of this run we cannot account for.
        self.counts.unknown += sum(len(v) for v in self._early.values())
        self._early.clear()
        self._report(remaining)
        return remaining

    @property
    def pending_count(self) -> int:
        return self.counts.pending

    def pending_records(self) -> list[MessageRecord]:
        return list(self._pending.values())

    def latest_deadline_us(self) -> int | None:
        if not self._pending:
            return None
        return max(r.intended_us for r in self._pending.values()) + self.deadline_us
