"""The reference protocol's frames: encode/decode, field validation, client versions."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatprobe.protocols.wire import (
    ProtocolError,
    decode,
    encode,
    optional_int,
    require_str,
    version_tuple,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12)


@settings(max_examples=200)
@given(frame_type=st.text(max_size=10),
       fields=st.dictionaries(st.text(max_size=8).filter(lambda k: k != "type"), json_values,
                              max_size=5))
def test_encode_decode_round_trip(frame_type: str, fields: dict[str, Any]) -> None:
    frame = {"type": frame_type, **fields}
    text = encode(frame)
    assert "\n" not in text  # one frame, one line
    assert decode(text) == frame


def test_encode_is_compact_and_keeps_unicode() -> None:
    text = encode({"type": "msg", "text": "你好"})
    assert text == '{"type":"msg","text":"你好"}'


def test_decode_rejects_binary() -> None:
    with pytest.raises(ProtocolError, match="binary"):
        decode(b'{"type": "hello"}')


@pytest.mark.parametrize("text", ["", "not json", "{", "{'type': 'x'}", "{\"type\": \"x\"} x"])
def test_decode_rejects_non_json(text: str) -> None:
    with pytest.raises(ProtocolError, match="not JSON"):
        decode(text)


def test_decode_rejects_deep_nesting_without_crashing() -> None:
    with pytest.raises(ProtocolError):
        decode("[" * 200_000 + "]" * 200_000)


@pytest.mark.parametrize("text", ["[]", "\"hello\"", "3", "null", "{}", "{\"type\": 1}",
                                  "{\"type\": null}", "{\"kind\": \"hello\"}"])
def test_decode_rejects_non_frames(text: str) -> None:
    with pytest.raises(ProtocolError, match="string 'type'"):
        decode(text)


def test_protocol_error_is_value_error() -> None:
    assert issubclass(ProtocolError, ValueError)


def test_require_str() -> None:
    assert require_str({"shop": "demo"}, "shop") == "demo"
    assert require_str({"shop": "x" * 256}, "shop") == "x" * 256
    assert require_str({"c": "x" * 10}, "c", max_len=10) == "x" * 10


@pytest.mark.parametrize("frame", [{}, {"shop": ""}, {"shop": 3}, {"shop": None},
                                   {"shop": ["demo"]}, {"shop": "x" * 257}])
def test_require_str_rejects(frame: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError, match="'shop'"):
        require_str(frame, "shop")


def test_require_str_custom_max_len() -> None:
    with pytest.raises(ProtocolError, match="at most 4"):
        require_str({"c": "12345"}, "c", max_len=4)


@pytest.mark.parametrize("frame, expected", [({}, None), ({"n": None}, None), ({"n": 0}, 0),
                                             ({"n": 12}, 12), ({"n": 2**62}, 2**62)])
def test_optional_int(frame: dict[str, Any], expected: int | None) -> None:
    assert optional_int(frame, "n") == expected


@pytest.mark.parametrize("value", [-1, True, False, 1.0, "3", [1]])
def test_optional_int_rejects(value: Any) -> None:
    with pytest.raises(ProtocolError, match="'n'"):
        optional_int({"n": value}, "n")


@pytest.mark.parametrize("version, expected", [
    ("5.2.10", (5, 2, 10, 0)),
    ("5", (5, 0, 0, 0)),
    ("v5.1", (5, 1, 0, 0)),
    ("5.x.3", (5, 0, 3, 0)),
    ("", (0, 0, 0, 0)),
    ("1.2.3.4.5", (1, 2, 3, 4)),
    ("5.2rc1", (5, 2, 0, 0)),
])
def test_version_tuple(version: str, expected: tuple[int, ...]) -> None:
    assert version_tuple(version) == expected


@pytest.mark.parametrize("older, newer", [
    ("4.9.9", "5.0.0"), ("5.2.9", "5.2.10"), ("5.9", "5.10"), ("0", "3.0.0"),
])
def test_version_order(older: str, newer: str) -> None:
    assert version_tuple(older) < version_tuple(newer)


@pytest.mark.parametrize("version", ["5.²", "①.0"])
def test_version_tuple_never_raises_on_odd_digits(version: str) -> None:
    version_tuple(version)


def test_equal_versions_of_different_length_compare_equal() -> None:
    assert version_tuple("3.0") >= version_tuple("3.0.0")


def test_pre_release_suffix_does_not_inflate_version() -> None:
    assert version_tuple("5.2rc1") < version_tuple("5.10")


def test_encode_output_is_json() -> None:
    frame = {"type": "ack", "id": 7, "nested": {"a": [1, 2]}}
    assert json.loads(encode(frame)) == frame
