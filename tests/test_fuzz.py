"""Hostile input never crashes the harness or corrupts a result (issue 8 item 3): hypothesis
throws generated input at the stamp parser and the ledger, the reference protocol's codec and
client, the WebSocket client's frame parser and every config loader, for a bounded number of
inputs each. The only exceptions allowed are each entry point's documented one-line errors.
The count of inputs tried is printed in the test summary (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatprobe.canary.config import parse_canary
from chatprobe.config import load_target, parse_target
from chatprobe.errors import HarnessError, TargetError
from chatprobe.ledger import Ledger, Receipt
from chatprobe.profiles import parse_profile
from chatprobe.protocols import wire
from chatprobe.protocols.reference import ReferenceAdapter, _Link
from chatprobe.stamp import StampCodec
from chatprobe.swarm.scripts import parse_script
from chatprobe.swarm.shapes import parse_shape
from tests.conftest import TIMEOUT_SCALE

# Inputs per target; the whole module stays around a minute on this 2-core machine.
EXAMPLES = int(2000 * TIMEOUT_SCALE)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=6),
    max_leaves=30)


class Tally:
    """Counts the inputs a fuzz test tried and reports them for the summary."""

    def __init__(self, record: Callable[[str, object], None], name: str) -> None:
        self.record, self.name, self.count = record, name, 0
        self.started = time.monotonic()

    def __call__(self) -> None:
        self.count += 1

    def report(self) -> None:
        """Called at the end of the test: a property recorded later misses its report."""
        self.record("fuzz", f"{self.name}: {self.count} inputs in "
                            f"{time.monotonic() - self.started:.1f} s, no crash")


@pytest.fixture
def tally(record_property: Callable[[str, object], None],
          request: pytest.FixtureRequest) -> Tally:
    return Tally(record_property, request.node.name.removeprefix("test_"))


def test_stamp_parser_and_ledger_never_count_a_forgery_as_delivered(tally: Tally) -> None:
    codec = StampCodec.new_run("fuzzrun")
    genuine = codec.stamp_text("is it in stock?", "c1", "c1", 1, 1000)
    third_party = StampCodec("fuzzrun", b"someone else's key")

    @FUZZ
    @given(st.one_of(
        st.text(max_size=300),
        # A genuine stamp with a stretch of it replaced: a corrupted or forged copy.
        st.tuples(st.integers(0, len(genuine)), st.integers(0, 12), st.text(max_size=12)).map(
            lambda cut: genuine[:cut[0]] + cut[2] + genuine[cut[0] + cut[1]:]),
        # A correctly formed stamp of the same run signed with another key.
        st.tuples(st.text(max_size=40), st.integers(1, 5)).map(
            lambda made: third_party.stamp_text(made[0], "c1", "c1", made[1], 1000)),
    ))
    def check(text: str) -> None:
        tally()
        ledger = Ledger(codec, 1_000_000, 2_000_000)
        ledger.record_send("c1", "c1", 1, 1000, 1000)
        parsed = codec.parse(text)
        receipt = ledger.record_received(text, "agent", 2000)
        if text != genuine and (parsed is None or not parsed.valid or parsed.foreign):
            assert ledger.counts.delivered == 0, text
            assert receipt is not Receipt.FIRST
            if parsed is not None and not parsed.valid and not parsed.foreign:
                assert receipt is Receipt.FORGED and ledger.counts.forged == 1
        if parsed is not None and parsed.valid and not parsed.foreign:
            # Only the genuine text (or one whose body part alone changed into an
            # equally valid one, impossible without the key) checks.
            assert codec.parse(text) == parsed

    check()
    tally.report()


def test_the_wire_codec_turns_any_text_into_a_frame_or_a_protocol_error(tally: Tally) -> None:
    nested = st.integers(1, 5000).map(lambda depth: "[" * depth + "]" * depth)

    @FUZZ
    @given(st.one_of(st.text(), st.binary(max_size=200), nested,
                     json_values.map(json.dumps),
                     st.dictionaries(st.text(max_size=10), json_values, max_size=6).map(
                         lambda d: json.dumps({"type": "message", **d}))))
    def check(text: str | bytes) -> None:
        tally()
        try:
            frame = wire.decode(text)
        except wire.ProtocolError:
            return
        assert isinstance(frame, dict) and isinstance(frame["type"], str)
        wire.decode(wire.encode(frame))  # whatever was accepted goes back out

    check()
    tally.report()


def test_the_reference_client_survives_any_frame_from_the_target(tally: Tally) -> None:
    adapter = ReferenceAdapter("http://127.0.0.1:9", load_target(None))
    kinds = st.sampled_from(["ack", "message", "error", "opened", "welcome", "closed",
                             "status", "assigned", "pong", "x"])

    async def run_all() -> None:
        events: list[str] = []

        def new_link() -> _Link:
            return _Link(adapter, {"type": "hello"}, lambda text, server_id: None,
                         lambda kind, detail: events.append(detail))

        link, dispatching = new_link(), new_link()

        @FUZZ
        @given(st.one_of(
            st.text(max_size=200),
            st.builds(lambda kind, fields: json.dumps({**fields, "type": kind}), kinds,
                      st.dictionaries(st.sampled_from(["id", "client_msg_id", "ref", "code",
                                                       "text", "conversation", "ts"]),
                                      json_values, max_size=5))))
        def check(raw: str) -> None:
            tally()
            # A protocol error or a session ended by the target is reported: allowed.
            with contextlib.suppress(TargetError):
                link.on_raw(raw)
            # The path every frame takes (fast for acks and messages) lets nothing escape: a
            # protocol error ends the link, anything else is reported.
            nonlocal dispatching
            dispatching._dispatch(raw)
            if dispatching.dead is not None:
                dispatching = new_link()
            # What guarded() catches from the harness's own code is a bug, not a report.
            assert not any(e.startswith("harness error") for e in events), (raw, events)

        check()

    asyncio.run(run_all())
    tally.report()


def test_the_websocket_client_survives_any_bytes_after_the_handshake(tally: Tally) -> None:
    from websockets.protocol import State

    from tests.test_websocket import opened_client

    small_frames = st.builds(
        lambda opcode, fin, payload, extra: bytes([fin << 7 | opcode, len(payload)])
        + payload + extra, st.integers(0, 15), st.integers(0, 1),
        st.binary(max_size=125), st.binary(max_size=20))
    oversized = st.integers(1 << 20, 1 << 40).map(
        lambda size: bytes([0x81, 127]) + size.to_bytes(8, "big"))

    async def run_all() -> None:
        @FUZZ
        @given(st.lists(st.one_of(st.binary(max_size=300), small_frames, oversized),
                        max_size=6))
        def check(chunks: list[bytes]) -> None:
            tally()
            ws, _ = opened_client()  # a real opening handshake first: frames from here on
            assert ws.opened.done() and ws.protocol.state is State.OPEN
            messages: list[object] = []
            ws.deliver_to(messages.append)
            for chunk in chunks:
                ws.data_received(chunk)
            for message in messages:
                assert isinstance(message, str | bytes)
                if isinstance(message, str):
                    message.encode()  # valid UTF-8 or never delivered

        check()

    asyncio.run(run_all())
    tally.report()


def test_the_compiled_engine_survives_any_bytes_from_the_target(tally: Tally) -> None:
    import chatprobe.swarm._fastref as compiled
    from chatprobe.config import AgentCredential
    from chatprobe.swarm.fastref import CompiledWorkerEngine
    from chatprobe.swarm.scripts import load_script

    codec = StampCodec.new_run("fuzzrun")
    engine = CompiledWorkerEngine("http://127.0.0.1:9", load_target(None), codec, "w0",
                                  script=load_script("shopper"),
                                  agents=[AgentCredential("probe-1", "t")])._engine
    kinds = st.sampled_from(["ack", "message", "error", "opened", "welcome", "closed",
                             "status", "assigned", "pong", "x"])
    texts = st.one_of(st.text(max_size=80), st.builds(
        lambda body, seq: codec.stamp_text(body, "w0c1-1", "w0c1-1", seq, 5),
        st.text(max_size=40), st.integers(-3, 70)))
    frames = st.builds(lambda kind, fields: json.dumps({**fields, "type": kind}).encode(),
                       kinds, st.dictionaries(
                           st.sampled_from(["id", "client_msg_id", "ref", "code", "text",
                                            "conversation", "ts", "last_id"]),
                           json_values | texts, max_size=5))

    def framed(payload: bytes, opcode: int, fin: int) -> bytes:
        head = bytes([fin << 7 | opcode])
        if len(payload) < 126:
            return head + bytes([len(payload)]) + payload
        return head + bytes([126]) + len(payload).to_bytes(2, "big") + payload

    chunks = st.one_of(
        st.binary(max_size=300),
        st.builds(framed, frames | st.binary(max_size=200), st.sampled_from([0, 1, 2, 8, 9, 10]),
                  st.integers(0, 1)),
        st.integers(1 << 20, 1 << 40).map(lambda n: bytes([0x81, 127]) + n.to_bytes(8, "big")))

    @FUZZ
    @given(role=st.integers(0, 1), state=st.integers(0, 1), data=st.lists(chunks, max_size=5))
    def check(role: int, state: int, data: list[bytes]) -> None:
        tally()
        events = engine.feed(role, state, b"".join(data))
        # Each event names who it happened to (the agent, or the customer "fuzz"): no bytes
        # of the input take the place of a name.
        assert all(event.startswith(("probe-1 ", "probe-1: ", "fuzz ", "fuzz: "))
                   for event in events), events

    assert isinstance(compiled.Engine, type)
    check()
    tally.report()


def test_every_config_loader_answers_any_document_with_one_line(tally: Tally,
                                                                tmp_path: Path) -> None:
    loaders: list[Callable[[Any], object]] = [
        lambda d: parse_target(d, "fuzz.yaml"),
        lambda d: parse_profile(d, "fuzz.yaml"),
        lambda d: parse_shape(d, "fuzz.yaml"),
        lambda d: parse_script(d, "fuzz.yaml"),
        lambda d: parse_canary(d, tmp_path / "canary.yaml"),
    ]
    documents = st.one_of(json_values, st.dictionaries(
        st.sampled_from(["agents", "channels", "targets", "stages", "steps", "up", "down",
                         "link", "middlebox", "budget_s", "thresholds", "name", "url",
                         "sla_ms", "deadline_ms", "protocol", "toxicity"]),
        json_values, max_size=5))

    @FUZZ
    @given(st.sampled_from(range(len(loaders))), documents)
    def check(which: int, document: Any) -> None:
        tally()
        try:
            loaders[which](document)
        except HarnessError as exc:
            assert "\n" not in str(exc) and str(exc), repr(exc)

    check()
    tally.report()
