"""The two kinds of failure a probe reports, kept apart (measurement.md exit codes).

HarnessError: chatprobe itself could not run (bad arguments, config, local problem): exit 3.
TargetError: the target is broken in a way the probe exists to report: exit 2, with a cause.
"""

from __future__ import annotations

from chatprobe.diagnosis import Cause, Diagnosis


class HarnessError(Exception):
    """chatprobe could not run; the message is one line for the user."""

    def __init__(self, message: str) -> None:
        # One line whatever it quotes: a hostile or broken file's keys and values can hold
        # line breaks and control characters.
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))


class TargetError(Exception):
    """The target failed (unreachable, rejected login, garbage frames)."""

    def __init__(self, cause: Cause, detail: str) -> None:
        super().__init__(f"{cause.value}: {detail}")
        self.cause = cause
        self.detail = detail

    @property
    def diagnosis(self) -> Diagnosis:
        return Diagnosis(self.cause, self.detail)
