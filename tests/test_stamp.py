"""Stamps: round trip, signature over body and fields, foreign runs, malformed input, ids."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatprobe.stamp import STAMP_CLOSE, STAMP_OPEN, ParsedStamp, StampCodec, StampError, has_stamp

SECRET = b"0123456789abcdef"

# Ids may hold anything but ':' and ']' (stamp_text's rule).
ids = st.text(st.characters(codec="utf-8", exclude_characters=":]"), max_size=20)
bodies = st.text(st.characters(codec="utf-8"), max_size=60)


def codec(run: str = "run1") -> StampCodec:
    return StampCodec(run=run, secret=SECRET)


def parsed(text: str, c: StampCodec | None = None) -> ParsedStamp:
    result = (c or codec()).parse(text)
    assert result is not None, text
    return result


def test_round_trip_returns_every_field() -> None:
    text = codec().stamp_text("hello", "cust-1", "conv-7", 42, 1_234_567)
    assert text.startswith("hello " + STAMP_OPEN)
    assert text.endswith(STAMP_CLOSE)
    assert has_stamp(text)
    assert parsed(text) == ParsedStamp("run1", "cust-1", "conv-7", 42, 1_234_567, True, False)


def test_round_trip_with_empty_body_and_zero_time() -> None:
    text = codec().stamp_text("", "s", "c", 1, 0)
    assert text.startswith(STAMP_OPEN)
    assert parsed(text) == ParsedStamp("run1", "s", "c", 1, 0, True, False)


@settings(max_examples=200)
@given(body=bodies, sender=ids, conversation=ids, seq=st.integers(0, 10**12),
       intended=st.integers(0, 2**63))
def test_round_trip_property(body: str, sender: str, conversation: str, seq: int,
                             intended: int) -> None:
    text = codec().stamp_text(body, sender, conversation, seq, intended)
    assert parsed(text) == ParsedStamp("run1", sender, conversation, seq, intended, True, False)


@settings(max_examples=200)
@given(body=bodies.filter(bool), data=st.data())
def test_signature_covers_body(body: str, data: st.DataObject) -> None:
    text = codec().stamp_text(body, "s", "c", 3, 99)
    i = data.draw(st.integers(0, len(body) - 1), label="index")
    replacement = data.draw(st.characters(codec="utf-8").filter(
        lambda ch: ch != body[i]), label="replacement")
    tampered = text[:i] + replacement + text[i + 1:]
    result = parsed(tampered)
    assert result.valid is False
    assert result.foreign is False
    assert (result.sender, result.conversation, result.seq) == ("s", "c", 3)


def test_signature_covers_body_single_char_example() -> None:
    text = codec().stamp_text("pay 100", "s", "c", 1, 5)
    assert parsed(text).valid
    assert parsed(text.replace("pay 100", "pay 900")).valid is False


@pytest.mark.parametrize("old, new", [
    (":c:", ":d:"),  # conversation
    (":s:", ":t:"),  # sender
    (":7:", ":8:"),  # seq
])
def test_signature_covers_fields(old: str, new: str) -> None:
    text = codec().stamp_text("body", "s", "c", 7, 5)
    tampered = text.replace(old, new, 1)
    assert tampered != text
    assert parsed(tampered).valid is False


def test_signature_covers_time() -> None:
    text = codec().stamp_text("body", "s", "c", 7, 255)
    assert ":ff:" in text  # the stamp's time is hexadecimal
    tampered = parsed(text.replace(":ff:", ":fe:"))
    assert tampered.intended_us == 254
    assert tampered.valid is False


def test_same_run_other_secret_is_forged_not_foreign() -> None:
    text = codec().stamp_text("x", "s", "c", 1, 1)
    other = StampCodec(run="run1", secret=b"another-secret-16")
    result = parsed(text, other)
    assert result.valid is False
    assert result.foreign is False


def test_foreign_run_is_flagged() -> None:
    text = codec("otherrun").stamp_text("x", "s", "c", 4, 10)
    result = parsed(text, codec("run1"))
    assert result.foreign is True
    assert result.valid is False
    assert (result.run, result.sender, result.conversation, result.seq, result.intended_us) == (
        "otherrun", "s", "c", 4, 10)


@pytest.mark.parametrize("text", ["", "hello", "[cp", "cp:run1:s:c:1:0:sig]", "[c p:x]"])
def test_no_stamp_gives_none(text: str) -> None:
    assert codec().parse(text) is None


def test_has_stamp_false_for_plain_text() -> None:
    assert has_stamp("just a message") is False


@pytest.mark.parametrize("text", [
    "[cp:run1:s:c:1:0:sig",  # no closing bracket
    "x [cp:run1:s:c:1:0]",  # five fields
    "x [cp:run1:s:c:1:0:sig:extra]",  # seven fields
    "x [cp:run1:s:c:one:0:sig]",  # seq not a number
    "x [cp:run1:s:c::0:sig]",  # empty seq
    "x [cp:run1:s:c:1:!!:sig]",  # time not base 36
    "x [cp:run1:s:c:1::sig]",  # empty time
    "x [cp:]",
])
def test_malformed_stamp_gives_none(text: str) -> None:
    assert codec().parse(text) is None


def test_genuine_stamp_parses_after_malformed_looking_body() -> None:
    body = "see [cp:broken and [cp:a:b] here"
    text = codec().stamp_text(body, "s", "c", 2, 8)
    result = parsed(text)
    assert result.valid and (result.seq, result.intended_us) == (2, 8)


@pytest.mark.parametrize("sender, conversation", [
    ("a:b", "c"), ("a", "c:d"), ("a]", "c"), ("a", "c]"), (":", ":")])
def test_ids_with_colon_or_bracket_rejected(sender: str, conversation: str) -> None:
    with pytest.raises(StampError):
        codec().stamp_text("x", sender, conversation, 1, 0)


def test_negative_time_rejected() -> None:
    with pytest.raises(StampError):
        codec().stamp_text("x", "s", "c", 1, -1)


@pytest.mark.parametrize("run", ["", "a.b", "a b", "a:b", "a]b", "x" * 65, "ünï"])
def test_bad_run_id_rejected(run: str) -> None:
    with pytest.raises(StampError):
        StampCodec(run=run, secret=SECRET)


def test_run_id_with_trailing_newline_rejected() -> None:
    with pytest.raises(StampError):
        StampCodec(run="abc\n", secret=SECRET)


@pytest.mark.parametrize("run", ["a", "A-Z_0-9", "x" * 64])
def test_good_run_ids_accepted(run: str) -> None:
    assert StampCodec(run=run, secret=SECRET).run == run


def test_short_secret_rejected() -> None:
    with pytest.raises(StampError):
        StampCodec(run="r", secret=b"1234567")


def test_secret_longer_than_a_blake2b_key_rejected_as_a_stamp_error() -> None:
    longest = StampCodec(run="r", secret=b"k" * 64)
    assert longest.parse(longest.stamp_text("hi", "c", "c", 1, 2)) is not None
    with pytest.raises(StampError, match="8 to 64 bytes"):
        StampCodec(run="r", secret=b"k" * 65)


def test_a_pickled_codec_checks_and_makes_the_same_stamps() -> None:
    """What multiprocessing hands another process: the keyed hash is rebuilt there."""
    original = codec()
    text = original.stamp_text("hello", "c1", "conv", 7, 123)
    copy = pickle.loads(pickle.dumps(original))
    assert copy == original and copy.parse(text) == parsed(text)
    assert copy.stamp_text("hello", "c1", "conv", 7, 123) == text
    assert not parsed(text.replace("hello", "hellO"), copy).valid


def test_new_run_makes_distinct_valid_codecs() -> None:
    a, b = StampCodec.new_run(), StampCodec.new_run()
    assert a.run != b.run and a.secret != b.secret
    text = a.stamp_text("x", "s", "c", 1, 1)
    assert parsed(text, a).valid
    assert parsed(text, b).foreign
    assert StampCodec.new_run("fixed").run == "fixed"


@settings(max_examples=200)
@given(body=bodies)
def test_stamp_survives_text_before_it(body: str) -> None:
    """Whatever the body holds (brackets, colons, stamp look-alikes) the stamp is found."""
    text = codec().stamp_text(body, "s", "conv", 9, 77)
    assert parsed(text) == ParsedStamp("run1", "s", "conv", 9, 77, True, False)


def test_prefix_added_by_platform_keeps_fields_but_fails_signature() -> None:
    text = codec().stamp_text("hello", "s", "conv", 9, 77)
    result = parsed("Customer wrote: " + text)
    assert (result.run, result.sender, result.conversation, result.seq, result.intended_us) == (
        "run1", "s", "conv", 9, 77)
    assert result.valid is False


def test_text_after_stamp_changes_body() -> None:
    text = codec().stamp_text("hello", "s", "conv", 9, 77)
    result = parsed(text + " (sent from app)")
    assert result.seq == 9
    assert result.valid is False
