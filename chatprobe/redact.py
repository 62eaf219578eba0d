"""Keeping secrets out of everything chatprobe writes (pure): URLs without credentials,
credentials inside frames and documents masked, one-line messages.

Used by the report's results, the canary's metrics and alerts: one definition of what is
secret, so a fix reaches every output at once.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

MASK = "******"
SECRET_FIELD = re.compile(r'("(?:token|password|secret|access_token|admin_token)"\s*:\s*")'
                          r'[^"]*(")', re.IGNORECASE)


def public_url(url: str) -> str:
    """A URL without user:password, query or fragment (where tokens travel); a plain name
    (no scheme) is returned as it is."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # not a valid URL after all: still drop what could be secret
        return url.partition("?")[0].partition("#")[0].rpartition("@")[2]
    if not parts.scheme or not parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def mask_secrets(text: str) -> str:
    """Credentials in a JSON text (a frame as it was sent) replaced by the mask."""
    return SECRET_FIELD.sub(rf"\g<1>{MASK}\g<2>", text)


def _secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(word in lowered for word in ("token", "secret", "password", "passwd")) or (
        lowered == "key" or lowered.endswith("_key"))


def scrub(value: Any) -> Any:
    """A JSON-like value with every secret masked: values under secret-sounding keys at any
    depth, and credentials inside strings."""
    if isinstance(value, dict):
        return {key: MASK if _secret_key(str(key)) and value[key] not in (None, "") else
                scrub(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(item) for item in value]
    if isinstance(value, str):
        return mask_secrets(value)
    return value


def one_line(text: object, limit: int = 300) -> str:
    """An error's text on one line, bounded (for status lines and problem reports)."""
    flat = " ".join(str(text).split())
    if not flat and isinstance(text, BaseException):
        flat = type(text).__name__
    return flat[:limit]
