"""Stamps: the signed marker chatprobe embeds in a message so a receipt can be matched to its send.

Pure code, no I/O. A stamp is plain ASCII appended to the message text, so it survives
platforms that only pass text through::

    <body> [cp:<run>:<sender>:<conversation>:<seq>:<intended_us hex>:<signature hex>]

The signature is a keyed BLAKE2b (per-run secret) over everything before it, the body *and*
the stamp fields, and nothing may follow the stamp, so a receiver can tell a genuine message
from a corrupted or forged one. ``intended_us`` is the
intended send time in microseconds on the sender's clock (monotonic on one host).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, NamedTuple

STAMP_OPEN = "[cp:"
STAMP_CLOSE = "]"
_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SIG_BYTES = 6  # 48 bits: forging by chance is ~1 in 2.8e14 per attempt


class StampError(ValueError):
    """A stamp could not be made from the given fields."""


class ParsedStamp(NamedTuple):
    """What a receiver learns from a stamped text. ``valid`` is False when the signature or
    body does not check (corrupted or forged); ``foreign`` is True when it belongs to another
    run (another chatprobe instance on the same target)."""

    run: str
    sender: str
    conversation: str
    seq: int
    intended_us: int
    valid: bool
    foreign: bool


@dataclass(frozen=True, slots=True)
class StampCodec:
    """Makes and reads stamps of one run. Thread-safe (immutable)."""

    run: str
    secret: bytes
    # The keyed hash with the key already absorbed: a copy per stamp costs about two thirds
    # of a keyed start, and every message is signed once and checked once.
    _keyed: Any = field(init=False, repr=False, compare=False)

    @classmethod
    def new_run(cls, run: str | None = None) -> StampCodec:
        return cls(run=run or secrets.token_hex(4), secret=secrets.token_bytes(16))

    def __post_init__(self) -> None:
        if not _ID_PATTERN.fullmatch(self.run):
            raise StampError(f"run id {self.run!r} must be 1-64 of [A-Za-z0-9_-]")
        if not 8 <= len(self.secret) <= 64:  # 64: BLAKE2b's longest key
            raise StampError("stamp secret must be 8 to 64 bytes")
        object.__setattr__(self, "_keyed", hashlib.blake2b(key=self.secret,
                                                           digest_size=_SIG_BYTES))

    def __reduce__(self) -> tuple[type[StampCodec], tuple[str, bytes]]:
        # The keyed hash cannot be pickled: a copy (another process's, say) keys its own.
        return type(self), (self.run, self.secret)

    def _sign(self, signed: str) -> str:
        hasher = self._keyed.copy()
        hasher.update(signed.encode())
        return str(hasher.hexdigest())

    def stamp_text(self, body: str, sender: str, conversation: str, seq: int,
                   intended_us: int) -> str:
        """Return ``body`` with a signed stamp appended."""
        if ":" in sender or ":" in conversation or "]" in sender or "]" in conversation:
            raise StampError("sender and conversation ids must not contain ':' or ']'")
        if intended_us < 0:
            raise StampError(f"stamp times must be non-negative, got {intended_us}")
        fields = f"{self.run}:{sender}:{conversation}:{seq}:{intended_us:x}"
        # Signed: everything before the signature, the body and the fields in one piece
        # (one slice to check on receipt, where every message is checked).
        head = f"{body} {STAMP_OPEN}{fields}:" if body else f"{STAMP_OPEN}{fields}:"
        return f"{head}{self._sign(head)}{STAMP_CLOSE}"

    def parse(self, text: str) -> ParsedStamp | None:
        """Find the stamp in ``text``; None when there is none (an ordinary message)."""
        start = text.rfind(STAMP_OPEN)
        if start < 0:
            return None
        end = text.find(STAMP_CLOSE, start)
        if end < 0:
            return None
        parts = text[start + 4 : end].split(":")
        if len(parts) != 6:
            return None
        run, sender, conversation, seq_text, t_text, signature = parts
        try:
            seq = int(seq_text)
            intended_us = int(t_text, 16)
        except ValueError:
            return None
        if run != self.run:
            return ParsedStamp(run, sender, conversation, seq, intended_us, False, True)
        # Anything after the stamp is as much a change as a change to the body.
        valid = end == len(text) - 1 and self._sign(text[:end - len(signature)]) == signature
        return ParsedStamp(run, sender, conversation, seq, intended_us, valid, False)


def has_stamp(text: str) -> bool:
    """Cheap check that a text carries a chatprobe stamp (synthetic traffic marker)."""
    return STAMP_OPEN in text
