"""Fault settings of the reference service: Faults.parse validation."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatprobe.service.faults import FaultError, Faults


def test_empty_document_is_no_faults() -> None:
    faults = Faults.parse({})
    assert faults == Faults()
    assert faults.delays is False and faults.pause_push is False and faults.seed is None


def test_full_document() -> None:
    faults = Faults.parse({"drop": 0.1, "duplicate": 1, "reorder": 0, "delay_ms": 250,
                           "delay_jitter_ms": 12.5, "pause_push": True, "seed": 42})
    assert faults == Faults(drop=0.1, duplicate=1.0, reorder=0.0, delay_ms=250.0,
                            delay_jitter_ms=12.5, pause_push=True, seed=42)
    assert isinstance(faults.duplicate, float) and isinstance(faults.delay_ms, float)


def test_seed_null_allowed() -> None:
    assert Faults.parse({"seed": None}).seed is None


@pytest.mark.parametrize("delay, jitter, expected", [
    (0, 0, False), (1, 0, True), (0, 1, True), (600_000, 600_000, True)])
def test_delays(delay: float, jitter: float, expected: bool) -> None:
    assert Faults.parse({"delay_ms": delay, "delay_jitter_ms": jitter}).delays is expected


@pytest.mark.parametrize("data", [None, [], "drop=0.5", 0.5])
def test_not_an_object(data: Any) -> None:
    with pytest.raises(FaultError, match="JSON object"):
        Faults.parse(data)


def test_unknown_fields_named() -> None:
    with pytest.raises(FaultError) as info:
        Faults.parse({"drop": 0.1, "loss": 0.5, "latency": 3})
    message = str(info.value)
    assert "latency" in message and "loss" in message and "drop" not in message


@pytest.mark.parametrize("key", ["drop", "duplicate", "reorder"])
@pytest.mark.parametrize("value", [-0.01, 1.01, float("nan"), float("inf"), "0.5", True,
                                   None, [0.5]])
def test_bad_probability(key: str, value: Any) -> None:
    with pytest.raises(FaultError, match=key):
        Faults.parse({key: value})


@pytest.mark.parametrize("key", ["delay_ms", "delay_jitter_ms"])
@pytest.mark.parametrize("value", [-1, 600_000.5, float("nan"), float("inf"), "100", False,
                                   None])
def test_bad_delay(key: str, value: Any) -> None:
    with pytest.raises(FaultError, match=key):
        Faults.parse({key: value})


@pytest.mark.parametrize("value", [1, 0, "true", None])
def test_bad_pause_push(value: Any) -> None:
    with pytest.raises(FaultError, match="pause_push"):
        Faults.parse({"pause_push": value})


@pytest.mark.parametrize("value", [True, 1.0, "42"])
def test_bad_seed(value: Any) -> None:
    with pytest.raises(FaultError, match="seed"):
        Faults.parse({"seed": value})


def test_fault_error_is_value_error() -> None:
    assert issubclass(FaultError, ValueError)


@settings(max_examples=200)
@given(st.builds(
    Faults,
    drop=st.floats(0, 1), duplicate=st.floats(0, 1), reorder=st.floats(0, 1),
    delay_ms=st.floats(0, 600_000), delay_jitter_ms=st.floats(0, 600_000),
    pause_push=st.booleans(), seed=st.none() | st.integers()))
def test_as_dict_round_trip(faults: Faults) -> None:
    assert Faults.parse(faults.as_dict()) == faults
