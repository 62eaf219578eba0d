"""From a network profile to what this run emulates (pure): the proxy's fault units, and the
list of every parameter with the layer that applies it here, or why it is not applied.

Nothing is silently ignored: a parameter the run cannot emulate appears in the plan with
``emulated=False`` and a reason, and the summary prints it. The machine's capabilities are
detected elsewhere (:mod:`chatprobe.netem.kernel`) and passed in.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from urllib.parse import urlsplit

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

# Without the kernel layer (not root, not Linux, or switched off): the proxy alone.
PROXY_ONLY = Capabilities(root=False, netns=False, nftables=False, tbf=False, netem=False)
DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
# Why the HTTP-aware faults do not apply to a TLS target (the run lists them with this).
TLS_SKIP = ("skipped: the target speaks TLS, so the proxy relays encrypted bytes and cannot "
            "see, strip or refuse the HTTP upgrade")


def proxy_faults(profile: Profile, seed: int | None = None, secure: bool = False,
                 kernel: frozenset[str] = frozenset()) -> Callable[[], list[Fault]]:
    """A factory of fresh fault units per connection for the profile's proxy part.
    ``secure``: the target speaks TLS, so the HTTP-aware faults cannot apply (and would
    only make every connection wait for a request head it never sees in clear).
    ``kernel``: the parameters (``up.bandwidth_kbit``...) the kernel layer applies in this
    run; the proxy leaves them alone instead of applying them twice."""
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
            if link.bandwidth_kbit and f"{direction}.bandwidth_kbit" not in kernel:
                faults.append(Bandwidth(direction, link.bandwidth_kbit))
        if profile.idle_timeout_s and "middlebox.idle_timeout_s" not in kernel:
            faults.append(IdleTimeout(timeout_s=profile.idle_timeout_s,
                                      action=profile.idle_timeout_action))
        if profile.forged_rst_after_s and "middlebox.forged_rst_after_s" not in kernel:
            faults.append(ResetPeer(after_s=profile.forged_rst_after_s,
                                    block_s=profile.reconnect_block_s or 0.0))
        return faults

    return build


def run_plan(profile: Profile, target_url: str, caps: Capabilities = PROXY_ONLY,
             kernel_off: str | None = None) -> list[PlanItem]:
    """What this run applies of ``profile`` against ``target_url`` with ``caps``.
    ``kernel_off``: why the kernel layer is switched off although the machine may have it
    (then its parameters say that instead of what the machine lacks)."""
    items = []
    parts = urlsplit(target_url)
    secure = parts.scheme in ("https", "wss")
    for item in emulation_plan(profile, caps):
        if kernel_off is not None and not item.emulated:
            item = replace(item, why=f"skipped: {kernel_off}")
        elif kernel_off is not None and item.parameter.endswith(".bandwidth_kbit"):
            item = replace(item, why=f"the proxy paces bytes (no real queueing: {kernel_off})")
        elif secure and item.parameter.startswith("middlebox.upgrade"):
            item = replace(item, emulated=False,
                           why=TLS_SKIP)
        elif (item.parameter == "link.allowed_ports" and item.emulated and parts.hostname
              and profile.allowed_ports is not None):
            port = _port(target_url)
            if port not in profile.allowed_ports:
                item = replace(item, why=f"{item.why}; the target's port {port} is not "
                                         "among them, so every connection to it is refused")
        items.append(item)
    return items


def _port(target_url: str) -> int:
    parts = urlsplit(target_url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return port or DEFAULT_PORTS.get(parts.scheme, 80)


def skipped(plan: list[PlanItem]) -> list[PlanItem]:
    return [item for item in plan if not item.emulated]
