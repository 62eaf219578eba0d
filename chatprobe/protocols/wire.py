"""The reference chat protocol's frames: encoding, decoding and validation (pure, no I/O).

Shared by the reference service and the reference adapter so both speak exactly the protocol
documented in docs/protocol.md. A frame is one JSON object per WebSocket text message with a
string ``type``.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

PROTOCOL_VERSION = 1

# Error codes the service sends in {"type": "error", "code": ...} frames.
ERR_BAD_FRAME = "bad_frame"
ERR_AUTH_FAILED = "auth_failed"
ERR_SESSION_EXPIRED = "session_expired"
ERR_ACCOUNT_FROZEN = "account_frozen"
ERR_UNKNOWN_SHOP = "unknown_shop"
ERR_UNKNOWN_CONVERSATION = "unknown_conversation"
ERR_NOT_LOGGED_IN = "not_logged_in"
ERR_NOT_YOUR_CONVERSATION = "not_your_conversation"

Frame = dict[str, Any]


class ProtocolError(ValueError):
    """A frame does not follow the reference protocol."""


def encode(frame: Frame) -> str:
    # orjson: every frame of every message passes here, on both ends; stdlib json cost
    # about a tenth of a swarm worker's CPU.
    try:
        return orjson.dumps(frame).decode()
    except TypeError:  # an integer beyond 64 bits, which only a hostile peer sends us
        return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def decode(text: str | bytes) -> Frame:
    """Parse one frame; raise ProtocolError with a short reason if it is not valid."""
    if isinstance(text, bytes):
        raise ProtocolError("binary frame where a JSON text frame was expected")
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError as exc:  # also nesting deeper than 1,024 levels
        raise ProtocolError(f"not JSON: {str(exc)[:80]}") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise ProtocolError("frame is not a JSON object with a string 'type'")
    return frame


def require_str(frame: Frame, key: str, max_len: int = 256) -> str:
    value = frame.get(key)
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise ProtocolError(f"'{key}' must be a non-empty string of at most {max_len} chars")
    return value


def optional_int(frame: Frame, key: str) -> int | None:
    value = frame.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"'{key}' must be a non-negative integer")
    return value


_LEADING_DIGITS = re.compile(r"[0-9]+")


def version_tuple(version: str) -> tuple[int, int, int, int]:
    """'5.2.10' -> (5, 2, 10, 0). A leading 'v' is ignored; each part counts by its leading
    ASCII digits ('2rc1' -> 2, 'beta' -> 0); padded to four parts so '3.0' == '3.0.0'."""
    parts = [0, 0, 0, 0]
    for index, piece in enumerate(version.strip().lstrip("vV").split(".")[:4]):
        match = _LEADING_DIGITS.match(piece)
        parts[index] = int(match.group()) if match else 0
    return parts[0], parts[1], parts[2], parts[3]
