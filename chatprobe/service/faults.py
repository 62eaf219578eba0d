"""Fault settings for the reference service's customer -> agent push path (pure)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


class FaultError(ValueError):
    """A fault document is invalid."""


@dataclass(frozen=True)
class Faults:
    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay_ms: float = 0.0
    delay_jitter_ms: float = 0.0
    pause_push: bool = False
    seed: int | None = None

    @classmethod
    def parse(cls, data: Any) -> Faults:
        if not isinstance(data, dict):
            raise FaultError("faults must be a JSON object")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise FaultError(f"unknown fault field(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for key in ("drop", "duplicate", "reorder"):
            if key in data:
                value = data[key]
                if not _is_number(value) or not 0.0 <= value <= 1.0:
                    raise FaultError(f"{key} must be a probability between 0 and 1")
                values[key] = float(value)
        for key in ("delay_ms", "delay_jitter_ms"):
            if key in data:
                value = data[key]
                if not _is_number(value) or not 0.0 <= value <= 600_000:
                    raise FaultError(f"{key} must be between 0 and 600000 milliseconds")
                values[key] = float(value)
        if "pause_push" in data:
            if not isinstance(data["pause_push"], bool):
                raise FaultError("pause_push must be true or false")
            values["pause_push"] = data["pause_push"]
        if "seed" in data and data["seed"] is not None:
            if not isinstance(data["seed"], int) or isinstance(data["seed"], bool):
                raise FaultError("seed must be an integer or null")
            values["seed"] = data["seed"]
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def delays(self) -> bool:
        return self.delay_ms > 0 or self.delay_jitter_ms > 0


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
