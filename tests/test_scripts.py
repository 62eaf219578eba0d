"""Conversation scripts: planning a round (pure)."""

from __future__ import annotations

import random

from chatprobe.swarm.scripts import load_script


def test_a_round_is_planned_from_its_start_each_think_time_jittered_by_half() -> None:
    script = load_script("shopper")
    start, scale = 1_000_000, 0.5
    plan = script.plan(random.Random(7), start, scale)
    assert [kind for _, kind, _ in plan] == [step.kind for step in script.steps]
    previous = start
    for (at, _, body), step in zip(plan, script.steps, strict=True):
        gap_s = (at - previous) / 1e6
        # Half to one and a half of the scaled think time (µs rounding aside).
        assert step.think_s * scale * 0.5 - 1e-6 <= gap_s <= step.think_s * scale * 1.5, step
        assert body and "{" not in body
        previous = at
    assert script.plan(random.Random(7), start, scale) == plan  # a seed replays a round
