"""From a network profile to what this run emulates (pure): the proxy's fault units, and the
list of every parameter with whether it is applied here and why not.

Nothing is silently ignored: a parameter the run cannot emulate appears in the plan with
``emulated=False`` and a reason, and the summary prints it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

from chatprobe.netem.faults import (
    DOWN,
    UP,
    Bandwidth,
    Fault,
    IdleTimeout,
    Latency,
    ResetPeer,
    Stall,
    Upgrade,
)
from chatprobe.profiles import Capabilities, PlanItem, Profile, emulation_plan

# The kernel layer (namespaces, nftables, tbf, netem) is not built yet: its parameters are
# listed as skipped rather than claimed.
KERNEL_NOT_BUILT = "skipped: chatprobe's kernel layer (namespaces, nftables) is not built yet"
PROXY_ONLY = Capabilities(root=False, netns=False, nftables=False, tbf=False, netem=False)


def proxy_faults(profile: Profile, seed: int | None = None,
                 secure: bool = False) -> Callable[[], list[Fault]]:
    """A factory of fresh fault units per connection for the profile's proxy part.
    ``secure``: the target speaks TLS, so the HTTP-aware faults cannot apply (and would
    only make every connection wait for a request head it never sees in clear)."""
    rng = random.Random(seed)

    def build() -> list[Fault]:
        faults: list[Fault] = []
        if profile.upgrade != "pass" and not secure:
            faults.append(Upgrade(mode=profile.upgrade, toxicity=profile.upgrade_toxicity))
        for direction, link in ((UP, profile.up), (DOWN, profile.down)):
            # Stall before the link: what waits out a stall then crosses the shaped link at
            # its rate, instead of leaving all at once.
            if profile.stall_every_s and profile.stall_s:
                faults.append(Stall(direction, profile.stall_every_s, profile.stall_s))
            if link.latency_ms or link.jitter_ms:
                faults.append(Latency(direction, link.latency_ms, link.jitter_ms,
                                      random.Random(rng.random())))
            if link.bandwidth_kbit:
                faults.append(Bandwidth(direction, link.bandwidth_kbit))
        if profile.idle_timeout_s:
            faults.append(IdleTimeout(timeout_s=profile.idle_timeout_s,
                                      action=profile.idle_timeout_action))
        if profile.forged_rst_after_s:
            faults.append(ResetPeer(after_s=profile.forged_rst_after_s,
                                    block_s=profile.reconnect_block_s or 0.0))
        return faults

    return build


def run_plan(profile: Profile, target_url: str) -> list[PlanItem]:
    """What this run applies of ``profile`` against ``target_url``."""
    items = []
    secure = target_url.startswith(("https:", "wss:"))
    for item in emulation_plan(profile, PROXY_ONLY):
        if item.layer.startswith("kernel") or (not item.emulated and item.layer != "proxy"):
            item = replace(item, emulated=False, why=KERNEL_NOT_BUILT)
        elif item.layer == "proxy" and "kernel" in item.why:
            item = replace(item, why="the proxy paces bytes (no real queueing: the kernel "
                                     "layer is not built yet)")
        elif secure and item.parameter.startswith("middlebox.upgrade"):
            item = replace(item, emulated=False,
                           why="skipped: over TLS the proxy cannot see the HTTP upgrade")
        items.append(item)
    return items


def skipped(plan: list[PlanItem]) -> list[PlanItem]:
    return [item for item in plan if not item.emulated]
