"""Promotion shapes: load curves of sales events, read from YAML files (pure).

A shape is a list of stages; each stage moves to ``users`` at ``spawn_rate`` users/s and
holds until the stage's ``duration`` ends. Users add shapes by dropping a file into
fixtures/shapes/; no code needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatprobe.config import read_document
from chatprobe.errors import HarnessError
from chatprobe.paths import fixtures_dir


@dataclass(frozen=True)
class Stage:
    duration_s: float
    users: int
    spawn_rate: float


@dataclass(frozen=True)
class Shape:
    name: str
    description: str
    stages: tuple[Stage, ...]

    @property
    def total_s(self) -> float:
        return sum(stage.duration_s for stage in self.stages)

    def at(self, elapsed_s: float) -> tuple[int, float] | None:
        """(users, spawn_rate) the run should have ``elapsed_s`` into it; None when over."""
        end = 0.0
        for stage in self.stages:
            end += stage.duration_s
            if elapsed_s < end:
                return stage.users, stage.spawn_rate
        return None

    def fitted(self, duration_s: float | None) -> Shape:
        """The same curve in ``duration_s``: time scaled, spawn rates scaled to match, so a
        x10 spike stays a x10 spike, only faster."""
        if duration_s is None or duration_s == self.total_s:
            return self
        factor = duration_s / self.total_s
        return Shape(self.name, self.description, tuple(
            Stage(s.duration_s * factor, s.users, s.spawn_rate / factor) for s in self.stages))

    def peak_users(self) -> int:
        return max(stage.users for stage in self.stages)


def shapes_dir() -> Path:
    return fixtures_dir() / "shapes"


def available_shapes() -> list[str]:
    return sorted(p.stem for p in shapes_dir().glob("*.yaml"))


def parse_shape(document: Any, source: str) -> Shape:
    if not isinstance(document, dict) or not isinstance(document.get("stages"), list):
        raise HarnessError(f"{source}: a shape needs a 'stages' list")
    stages = []
    for i, item in enumerate(document["stages"]):
        where = f"{source}: stages[{i}]"
        if not isinstance(item, dict):
            raise HarnessError(f"{where} must be a mapping")
        unknown = sorted(str(k) for k in item if k not in ("duration", "users", "spawn_rate"))
        if unknown:
            raise HarnessError(f"{where}: unknown field(s) {', '.join(unknown)}")
        duration, users = item.get("duration"), item.get("users")
        rate = item.get("spawn_rate", max(1, users if isinstance(users, int) else 1))
        if isinstance(duration, bool) or not isinstance(duration, int | float) or duration <= 0:
            raise HarnessError(f"{where}.duration must be a positive number of seconds")
        if isinstance(users, bool) or not isinstance(users, int) or users < 0:
            raise HarnessError(f"{where}.users must be a whole number >= 0")
        if isinstance(rate, bool) or not isinstance(rate, int | float) or rate <= 0:
            raise HarnessError(f"{where}.spawn_rate must be a positive number")
        stages.append(Stage(float(duration), users, float(rate)))
    if not stages:
        raise HarnessError(f"{source}: a shape needs at least one stage")
    return Shape(str(document.get("name", Path(source).stem)),
                 str(document.get("description", "")), tuple(stages))


def load_shape(name_or_path: str) -> Shape:
    """A shape by name (fixtures/shapes/NAME.yaml) or by file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = shapes_dir() / f"{name_or_path}.yaml"
    known = ", ".join(available_shapes()) or "none"
    document = read_document(path, "shape", f"no shape {name_or_path!r} (known: {known})")
    return parse_shape(document, str(path))
