"""Conversation scripts: what a fake customer says, in which order, with which pauses (pure).

Read from fixtures/conversations/*.yaml. Each step has a message kind (the name its latency
is reported under), a think time before it, and text templates filled with high-entropy
details ({product}, {size}, {order}, {n}) so bodies are realistic and never repeat.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatprobe.config import read_document
from chatprobe.errors import HarnessError
from chatprobe.paths import fixtures_dir

PRODUCTS = ("down jacket", "running shoes", "rice cooker", "phone case", "silk scarf",
            "coffee beans", "kids' backpack", "bluetooth speaker", "air fryer", "yoga mat")
SIZES = ("S", "M", "L", "XL", "XXL", "38", "39", "40", "42", "44")


@dataclass(frozen=True)
class Step:
    kind: str
    think_s: float
    texts: tuple[str, ...]
    expects_reply: bool = False  # the probe agent answers it: measures agent -> customer


THINK_JITTER_LOW = 0.5  # a think time lasts 0.5-1.5 times the script's think_s

AGENT_REPLIES = ("Let me check that for you.", "Yes, it is in stock and ships tonight.",
                 "I have forwarded this to our after-sales team, sorry for the wait.")


@dataclass(frozen=True)
class Script:
    name: str
    steps: tuple[Step, ...]
    # Share of customers whose connection drops once mid-conversation (mobile users).
    reconnect_share: float = 0.0

    def body(self, step: Step, rng: random.Random) -> str:
        return rng.choice(step.texts).format(
            product=rng.choice(PRODUCTS), size=rng.choice(SIZES),
            order=rng.randrange(10**11, 10**12), n=rng.randrange(1, 10))

    def plan(self, rng: random.Random, start_us: int,
             think_scale: float) -> list[tuple[int, str, str]]:
        """One round's messages from ``start_us``: (planned time µs, kind, body) each."""
        plan = []
        intended = start_us
        for step in self.steps:
            # People take more or less time than the script's figure (half to one and a half
            # of it, the mean kept): customers spawned together do not type in lockstep.
            intended += int(step.think_s * think_scale * (THINK_JITTER_LOW + rng.random())
                            * 1_000_000)
            plan.append((intended, step.kind, self.body(step, rng)))
        return plan


def parse_script(document: Any, source: str) -> Script:
    if not isinstance(document, dict) or not isinstance(document.get("steps"), list):
        raise HarnessError(f"{source}: a conversation script needs a 'steps' list")
    steps = []
    for i, item in enumerate(document["steps"]):
        where = f"{source}: steps[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("kind"), str):
            raise HarnessError(f"{where} needs a 'kind'")
        think = item.get("think_s", 1.0)
        if isinstance(think, bool) or not isinstance(think, int | float) or think < 0:
            raise HarnessError(f"{where}.think_s must be a number of seconds >= 0")
        texts = item.get("texts")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise HarnessError(f"{where}.texts must be a non-empty list of strings")
        for text in texts:
            try:
                text.format(product="", size="", order=0, n=0)
            except (KeyError, IndexError, ValueError) as exc:
                raise HarnessError(f"{where}: bad placeholder in {text!r}: {exc}") from None
        expects_reply = item.get("expects_reply", False)
        if not isinstance(expects_reply, bool):
            raise HarnessError(f"{where}.expects_reply must be true or false")
        steps.append(Step(item["kind"], float(think), tuple(texts), expects_reply))
    if not steps:
        raise HarnessError(f"{source}: a conversation script needs at least one step")
    if not any(step.think_s > 0 for step in steps):
        # Open model: each round starts when the one before was planned to end, so a round
        # of no length would be followed by the next at once, without end.
        raise HarnessError(f"{source}: at least one step needs a think_s above 0 (each "
                           "round would follow the one before without pause)")
    share = document.get("reconnect_share", 0.0)
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
        raise HarnessError(f"{source}: reconnect_share must be between 0 and 1")
    return Script(str(document.get("name", Path(source).stem)), tuple(steps), float(share))


def load_script(name_or_path: str) -> Script:
    path = Path(name_or_path)
    if not path.suffix:
        path = fixtures_dir() / "conversations" / f"{name_or_path}.yaml"
    document = read_document(path, "script", f"no conversation script {name_or_path!r}")
    return parse_script(document, str(path))
