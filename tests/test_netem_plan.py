"""From a profile to the proxy's fault units and the run's emulation plan (pure)."""

from __future__ import annotations

from chatprobe.netem.faults import (
    DOWN,
    UP,
    Bandwidth,
    IdleTimeout,
    Latency,
    ResetPeer,
    Stall,
    Upgrade,
)
from chatprobe.netem.plan import proxy_faults, run_plan, skipped
from chatprobe.profiles import Direction, Profile, load_profile


def test_a_profile_becomes_fault_units_per_direction_stall_first() -> None:
    profile = Profile(name="p", up=Direction(latency_ms=100, jitter_ms=5, bandwidth_kbit=800),
                      down=Direction(latency_ms=50), stall_every_s=60, stall_s=2,
                      idle_timeout_s=30, idle_timeout_action="rst", upgrade="strip",
                      upgrade_toxicity=0.1, forged_rst_after_s=20, reconnect_block_s=90)
    faults = proxy_faults(profile, seed=1)()
    kinds = [(type(f), f.direction) for f in faults]
    assert kinds == [(Upgrade, UP), (Stall, UP), (Latency, UP), (Bandwidth, UP),
                     (Stall, DOWN), (Latency, DOWN), (IdleTimeout, "both"),
                     (ResetPeer, "both")]
    upgrade, _, latency, bandwidth, *_ = faults
    assert isinstance(upgrade, Upgrade) and upgrade.toxicity == 0.1
    assert isinstance(latency, Latency) and (latency.latency_ms, latency.jitter_ms) == (100, 5)
    assert isinstance(bandwidth, Bandwidth) and bandwidth.kbit == 800
    reset = faults[-1]
    assert isinstance(reset, ResetPeer) and (reset.after_s, reset.block_s) == (20, 90)
    # A fresh set per connection: their state (bandwidth clock, jitter) is per connection.
    build = proxy_faults(profile)
    first, second = build(), build()
    assert all(a is not b for a, b in zip(first, second, strict=True))


def test_a_clean_profile_has_nothing_to_do() -> None:
    assert proxy_faults(Profile(name="clean"))() == []
    assert run_plan(Profile(name="clean"), "http://h") == []


def test_the_plan_lists_what_this_run_skips_and_why() -> None:
    # Without capabilities (not root): the proxy alone, and the kernel's parameters skipped.
    plan = run_plan(load_profile("vpn-overseas"), "http://h")
    missing = {item.parameter: item for item in skipped(plan)}
    assert set(missing) == {"up.loss_percent", "down.loss_percent", "link.mtu"}
    assert all(item.why.startswith("needs root")
               for item in missing.values())
    applied = {item.parameter for item in plan if item.emulated}
    assert {"up.latency_ms", "down.bandwidth_kbit", "middlebox.stall_s"} <= applied


def test_over_tls_the_upgrade_faults_are_skipped_and_said_so() -> None:
    profile = load_profile("corporate-proxy")
    plain = {item.parameter: item for item in run_plan(profile, "http://h")}
    secure = {item.parameter: item for item in run_plan(profile, "https://h")}
    assert plain["middlebox.upgrade"].emulated
    assert not secure["middlebox.upgrade"].emulated
    assert "TLS" in secure["middlebox.upgrade"].why
    # ... and the proxy does not build what it cannot apply.
    assert any(isinstance(f, Upgrade) for f in proxy_faults(profile)())
    assert not any(isinstance(f, Upgrade) for f in proxy_faults(profile, secure=True)())
