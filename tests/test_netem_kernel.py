"""The kernel layer: network namespaces, veth, nftables and tc for real (as root, with nft),
probed with the real reference service over real sockets and checked against its counters;
and the pure builders (ruleset text, tc and ip commands, names), which run everywhere."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import chatprobe.probe as probe_module
from chatprobe.netem import kernel
from chatprobe.netem.faults import Bandwidth, IdleTimeout, Latency, ResetPeer
from chatprobe.netem.kernel import KernelPath, KernelSpec, Layout
from chatprobe.netem.plan import PROXY_ONLY, proxy_faults, run_plan
from chatprobe.netem.session import behind
from chatprobe.probe import ProbeHooks, ProbeOptions, run_probe
from chatprobe.profiles import (
    Capabilities,
    Direction,
    Profile,
    available_profiles,
    emulation_plan,
    load_profile,
)
from tests.conftest import ROOT, ServiceProcess, scaled
from tests.test_cli import chatprobe

ALL = Capabilities(root=True, netns=True, nftables=True, tbf=True, netem=True)
NO_NETEM = Capabilities(root=True, netns=True, nftables=True, tbf=True, netem=False)


def require_kernel() -> None:
    """Skip unless this process can build paths: root, ip, tc tbf and nftables. In CI (root,
    `bash dev.sh test` installs nftables) a missing piece fails instead of skipping."""
    if os.geteuid() != 0:
        pytest.skip("the kernel layer needs root (CI runs these as root)")
    switched_off = kernel.disabled_reason()
    if switched_off is not None:
        pytest.skip(switched_off)
    caps = kernel.detect()
    missing = [name for name, ok in (("ip netns", caps.netns), ("nftables (nft)", caps.nftables),
                                     ("tc tbf", caps.tbf)) if not ok]
    if missing:
        message = f"the kernel layer needs {', '.join(missing)} (bash dev.sh test installs nft)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def kernel_names() -> set[str]:
    """Names of our namespaces and host links that exist now."""
    namespaces, links = kernel.existing_names()
    return set(namespaces) | set(links)


def random_body(size: int) -> str:
    """High-entropy text (permessage-deflate must not shrink it below the MTU)."""
    return base64.b64encode(random.randbytes(size * 3 // 4)).decode()


def probe_behind(service: ServiceProcess, profile: Profile | None, options: ProbeOptions,
                 **config: Any) -> tuple[dict[str, Any], dict[str, int]]:
    """One probe with the customers behind ``profile`` (agents connect directly); its
    document and the kernel counters of the customers' path."""
    target = service.target_config(**config)

    async def main() -> tuple[dict[str, Any], dict[str, int]]:
        async with behind(service.base_url, profile) as (url, proxy):
            if profile is not None and not profile.is_clean:
                assert url.startswith("http://198.1"), url  # inside our namespaces
            summary = await run_probe(url, target, options, agent_url=service.base_url)
        return summary.to_json(), proxy.stats.kernel if proxy is not None else {}

    return asyncio.run(main())


# ------------------------------------------------------------------- acceptance, as root


@pytest.mark.alone
def test_five_percent_loss_adds_tail_latency_and_loses_nothing(
        reference_service: ServiceProcess) -> None:
    require_kernel()
    lossy = Profile(name="lossy-5", up=Direction(loss_percent=5), down=Direction(loss_percent=5))
    options = ProbeOptions(messages=200, customers=5, rate_per_s=100)
    deadlines = {"sla_ms": scaled(5000), "deadline_ms": scaled(15000)}
    clean, _ = probe_behind(reference_service, None, options, **deadlines)
    doc, counters = probe_behind(reference_service, lossy, options, **deadlines)
    assert counters.get("loss_up", 0) > 0 and counters.get("loss_down", 0) > 0, counters
    for run in (clean, doc):
        assert run["sent"] == 200 and run["lost"] == 0 and run["duplicate"] == 0
        assert run["delivered"] + run["late"] == 200
    # TCP turns every lost segment into a retransmission: no message lost, the tail grows.
    assert reference_service.stats()["accepted"] == 400
    tail, clean_tail = doc["latency_ms"], clean["latency_ms"]
    # About one message in ten loses a segment (5 % each way) and waits for its
    # retransmission: the p99 (the 2nd-slowest of 200) is one of them, whatever the clean
    # run's own hiccups.
    assert tail["p99"] > clean_tail["p99"], (clean_tail, tail)


def test_a_pmtu_blackhole_loses_large_messages_and_mss_clamping_fixes_it(
        reference_service: ServiceProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    require_kernel()
    if Path("/proc/sys/net/ipv4/tcp_mtu_probing").read_text().strip() != "0":
        pytest.skip("this host probes for the path MTU itself (tcp_mtu_probing): no "
                    "blackhole to see")
    blackhole = Profile(name="pmtu-blackhole", mtu=1280, pmtu_blackhole=True)
    clamped = Profile(name="pmtu-clamped", mtu=1280, pmtu_blackhole=True, mss_clamp=1240)
    options = ProbeOptions(messages=20, customers=2, rate_per_s=50)

    small, _ = probe_behind(reference_service, blackhole, options, deadline_ms=scaled(10000))
    assert (small["sent"], small["delivered"], small["lost"]) == (20, 20, 0)
    accepted = reference_service.stats()["accepted"]

    monkeypatch.setattr(probe_module, "customer_body", lambda rng: random_body(4096))
    # Every 4 KB message is larger than the narrow hop; its "fragmentation needed" is
    # dropped, so TCP resends full-size segments into the hole until the deadline.
    large, counters = probe_behind(reference_service, blackhole, options, deadline_ms=2000.0)
    assert (large["sent"], large["delivered"], large["late"], large["lost"]) == (20, 0, 0, 20)
    assert counters.get("frag_needed_dropped", 0) > 0, counters
    assert reference_service.stats()["accepted"] == accepted  # none reached the service

    fixed, counters = probe_behind(reference_service, clamped, options,
                                   deadline_ms=scaled(10000))
    assert (fixed["sent"], fixed["delivered"], fixed["lost"]) == (20, 20, 0)
    assert counters.get("frag_needed_dropped", 0) == 0, counters
    assert reference_service.stats()["accepted"] == accepted + 20


def test_a_forged_reset_kills_the_connection_and_the_harness_recovers(
        reference_service: ServiceProcess) -> None:
    require_kernel()
    # Every flow is reset 1 s into its life (both ends), then reconnects to the server are
    # refused for 1 s; the customers reconnect with back-off and resume.
    profile = Profile(name="forged-rst", forged_rst_after_s=1.0, reconnect_block_s=1.0)
    options = ProbeOptions(messages=120, customers=3, rate_per_s=40)
    doc, counters = probe_behind(reference_service, profile, options,
                                 sla_ms=scaled(8000), deadline_ms=scaled(20000))
    assert counters.get("forged_rst", 0) >= 3, counters  # each customer's first flow
    assert counters.get("reset_after_forged", 0) >= 1, counters  # the other end, too
    assert doc["events"].get("customer disconnected", 0) >= 3, doc["events"]
    assert doc["events"].get("customer resumed", 0) >= 3, doc["events"]
    # Messages sent while a connection was down are delivered after the resume or counted
    # lost; none vanish, and the service's own counter agrees with the ledger.
    assert doc["sent"] == 120 == doc["delivered"] + doc["late"] + doc["lost"]
    assert doc["lost"] == 0 and doc["duplicate"] == 0, doc["examples"]
    assert reference_service.stats()["accepted"] == 120


def test_a_firewall_whose_conntrack_forgets_an_idle_flow_resets_it_and_nothing_is_lost(
        reference_service: ServiceProcess) -> None:
    require_kernel()
    # conntrack's policy forgets an established flow after 2 s idle; once the service has
    # taken (and acked) the first 100 messages the customers fall silent for 4 s (no
    # heartbeat), so the next packet of each customer's flow is "new" without a SYN and is
    # answered with a reset. They reconnect, resume and resend what was unacked.
    profile = Profile(name="idle-conntrack", idle_timeout_s=2, idle_timeout_action="rst")
    options = ProbeOptions(messages=200, customers=4, rate_per_s=400)

    async def go_quiet(sent: int) -> None:
        if sent == 100:
            # The idle time runs from each flow's last packet (the service's ack), not from
            # the last send: wait for the acks first.
            async with asyncio.timeout(scaled(10)):
                while (await asyncio.to_thread(reference_service.stats))["accepted"] < 100:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(4.0)  # the idle time the firewall must see: the fault

    async def main() -> tuple[dict[str, Any], dict[str, int]]:
        config = reference_service.target_config(heartbeat_interval_s=3600.0,
                                                 deadline_ms=scaled(20_000))
        async with behind(reference_service.base_url, profile) as (url, proxy):
            assert url.startswith("http://198.1"), url  # through our namespaces
            assert proxy is not None
            assert not proxy.shared, proxy.shared  # the idle timeout is the kernel's job
            summary = await run_probe(url, config, options, ProbeHooks(after_send=go_quiet),
                                      agent_url=reference_service.base_url)
            assert not proxy.stats.kills, proxy.stats.kills  # conntrack did it, not the proxy
        return summary.to_json(), proxy.stats.kernel  # read as the path is taken down

    doc, counters = asyncio.run(main())
    assert counters.get("idle_forgotten", 0) >= 4, counters  # each customer's flow
    assert doc["events"].get("customer disconnected", 0) >= 4, doc["events"]
    assert doc["events"].get("customer resumed", 0) >= 4, doc["events"]
    assert doc["sent"] == 200 == reference_service.stats()["accepted"]
    assert doc["lost"] == 0 and doc["duplicate"] == 0, doc["examples"]
    assert doc["delivered"] + doc["late"] == 200


def test_a_path_is_removed_when_its_context_exits() -> None:
    require_kernel()
    spec = KernelSpec(loss_up=1, bandwidth_down_kbit=1000, mtu=1400, pmtu_blackhole=True,
                      parameters=frozenset({"up.loss_percent"}))
    with KernelPath(spec) as path:
        names = set(path.names)
        assert len(names) == 4 and names <= kernel_names()
        subnet = str(path.layout.subnet) if path.layout else ""
        assert subnet in subprocess.run(["ip", "route"], capture_output=True, text=True,
                                        check=True).stdout
    assert not names & kernel_names()
    assert subnet not in subprocess.run(["ip", "route"], capture_output=True, text=True,
                                        check=True).stdout
    # Our tables live only inside our namespaces: the host's ruleset never had one.
    host_tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                                 check=True).stdout
    assert kernel.TABLE not in host_tables


@pytest.fixture
def child() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=scaled(10))


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError("the child printed nothing in time")
    return proc.stdout.readline().strip()


CHILD_PATH = """
from chatprobe.netem.kernel import KernelPath, KernelSpec
path = KernelPath(KernelSpec(loss_up=1, parameters=frozenset({"up.loss_percent"}))).open()
print(" ".join(path.names), flush=True)
import time
time.sleep(120)
"""


def test_what_a_killed_run_left_is_removed_by_the_next(
        child: list[subprocess.Popen[str]]) -> None:
    require_kernel()
    proc = subprocess.Popen([sys.executable, "-c", CHILD_PATH], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    child.append(proc)
    names = read_line(proc, scaled(30)).split()
    assert len(names) == 4 and set(names) <= kernel_names()
    # A live owner's path is not a leftover.
    assert not set(names) & set(kernel.cleanup_leftovers())
    proc.kill()  # a crash: no finally, no atexit
    proc.wait(timeout=scaled(10))
    assert kernel.stale(names, kernel.pid_alive, os.getpid(), frozenset()) == names
    left = set(names) & kernel_names()  # (another test process may have removed them)
    cleaned = chatprobe("profiles", "cleanup")
    assert cleaned.returncode == 0, cleaned.stderr
    removed = set(cleaned.stdout.strip().removeprefix("removed: ").split(", "))
    assert left <= removed
    assert not set(names) & kernel_names()


CHILD_BEHIND = """
import asyncio
from chatprobe.netem.session import behind
from chatprobe.profiles import Direction, Profile

async def main() -> None:
    profile = Profile(name="lossy", up=Direction(loss_percent=1))
    async with behind("http://127.0.0.1:9", profile) as (url, proxy):
        print(url, flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


def test_ctrl_c_removes_the_path(child: list[subprocess.Popen[str]]) -> None:
    require_kernel()
    proc = subprocess.Popen([sys.executable, "-c", CHILD_BEHIND], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    child.append(proc)
    url = read_line(proc, scaled(30))
    assert url.startswith("http://198.1"), url
    mine = {n for n in kernel_names() if kernel.owner_pid(n) == proc.pid}
    assert len(mine) == 4, mine
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=scaled(20))
    assert not mine & kernel_names()


def test_every_shipped_profile_builds_its_kernel_part() -> None:
    require_kernel()
    caps = kernel.detect()
    for name in available_profiles():
        profile = load_profile(name)
        spec = KernelSpec.from_plan(profile, run_plan(profile, "http://127.0.0.1:443", caps))
        if not spec.active:
            continue
        with KernelPath(spec) as path:
            assert set(path.names) <= kernel_names(), name
            assert isinstance(path.counters(), dict)


# --------------------------------------------------------------------------- pure, anywhere


def test_layout_names_fit_linux_limits_and_addresses_stay_in_the_benchmark_range() -> None:
    layout = Layout(pid=4194304, index=9999, block=511)
    assert len(layout.host_link) <= 15  # IFNAMSIZ - 1
    assert layout.namespaces == ("cp-4194304-9999-a", "cp-4194304-9999-b",
                                 "cp-4194304-9999-s")
    assert str(layout.subnet) == "198.19.255.0/24" and layout.edge_address == "198.19.255.10"
    assert str(Layout(pid=1, index=0, block=0).subnet) == "198.18.0.0/24"
    for name in (layout.host_link, *layout.namespaces, "cp-77-probe"):
        assert kernel.owner_pid(name) in (4194304, 77)
    assert kernel.owner_pid("cpx-1-a") is None and kernel.owner_pid("docker0") is None


def test_only_dead_owners_and_our_own_unused_names_are_stale() -> None:
    names = ["cp-10-0", "cp-10-0-a", "cp-20-1-s", "cp-30-0-b", "cp-30-1-b", "eth0"]
    alive = {20}.__contains__
    assert kernel.stale(names, alive, own_pid=30, own_active=frozenset({"cp-30-0-b"})) == [
        "cp-10-0", "cp-10-0-a", "cp-30-1-b"]


def test_used_blocks_come_from_addresses_and_routes_in_the_pool() -> None:
    output = ("5: cp-1-0    inet 198.18.7.1/30 scope global cp-1-0\n"
              "198.18.9.0/24 via 198.18.9.2 dev cp-1-1\n"
              "10.0.0.0/8 dev eth0\n198.19.255.254 dev x\n198.16.0.0/13 dev y\n")
    used = kernel.used_blocks(output)
    assert {7, 9, 511} <= used and 0 in used  # the /13 covers the whole pool
    assert kernel.used_blocks("10.1.2.3/24 dev eth0") == set()


def test_the_access_ruleset_holds_each_kernel_parameter() -> None:
    spec = KernelSpec(loss_up=0.5, loss_down=8, mss_clamp=1360, pmtu_blackhole=True,
                      allowed_ports=(443,), idle_timeout_s=60, idle_action="silent",
                      forged_rst_after_s=60, reconnect_block_s=90,
                      parameters=frozenset({"up.loss_percent"}))
    text = kernel.access_ruleset(spec)
    assert 'iifname "to-host" numgen random mod 10000 < 50 counter name "loss_up" drop' in text
    assert 'iifname "to-border" numgen random mod 10000 < 800 counter name "loss_down"' in text
    assert "icmp type destination-unreachable icmp code frag-needed" in text
    assert "chain local_out" in text  # the router's own ICMP leaves through output
    assert "policy = { established: 60 }" in text and 'ct timeout set "idle"' in text
    assert "tcp flags & (syn | ack) != syn counter name \"idle_forgotten\" drop" in text
    assert 'tcp dport != { 443 } counter name "port_refused" reject with tcp reset' in text
    assert "add @young { ct id timeout 60000ms }" in text
    assert "timeout 90000ms" in text and "tcp flags set rst | ack" in text
    assert "tcp option maxseg size > 1360 tcp option maxseg size set 1360" in text
    # Loss comes first: a dropped packet meets no other rule.
    assert text.index("loss_up\" drop") < text.index("frag-needed") < text.index("maxseg")
    assert kernel.border_ruleset(spec) is not None
    assert kernel.border_ruleset(KernelSpec()) is None
    quiet = kernel.access_ruleset(KernelSpec(loss_up=2, idle_timeout_s=60, idle_action="rst"))
    assert "loss_down" not in quiet.split("chain through")[1]
    assert "@young" not in quiet and "local_out" not in quiet
    assert "!= syn counter name \"idle_forgotten\" reject with tcp reset" in quiet
    # A reset at once: no "young" set to wait on.
    at_once = kernel.access_ruleset(KernelSpec(forged_rst_after_s=0))
    assert "@young" not in at_once.split("chain through")[1] and "@blocked" not in at_once


def test_tc_commands_shape_each_direction_and_use_netem_only_for_bursty_loss() -> None:
    layout = Layout(pid=5, index=0, block=3)
    spec = KernelSpec(bandwidth_up_kbit=700, bandwidth_down_kbit=30000, mtu=1420)
    up, down = kernel.tc_commands(layout, spec)
    assert up[:8] == ["tc", "-n", "cp-5-0-a", "qdisc", "add", "dev", "to-border", "root"]
    assert up[10:14] == ["tbf", "rate", "700kbit", "burst"] and "250ms" in up
    assert int(up[14]) >= 2 * 1434  # at least two frames in the bucket
    assert down[6] == "to-host" and "30000kbit" in down and int(down[down.index("burst") + 1]) \
        == 37500  # 10 ms at the rate
    bursty = KernelSpec(loss_up=2, netem_up=True, bandwidth_up_kbit=30000)
    netem, tbf = kernel.tc_commands(layout, bursty)
    assert netem[8:] == ["handle", "1:", "netem", "loss", "gemodel", "0.6803%", "33.33%",
                         "100%", "0%"]
    assert tbf[7:11] == ["parent", "1:1", "handle", "10:"]
    assert kernel.tc_commands(layout, KernelSpec(loss_up=2)) == []  # nftables does that


def test_ip_batches_build_links_then_addresses_then_routes() -> None:
    layout = Layout(pid=5, index=1, block=2)
    batches = kernel.ip_batches(layout, KernelSpec(mtu=1280))
    first_ns, first = batches[0]
    assert first_ns is None and first[:3] == ["netns add cp-5-1-a", "netns add cp-5-1-b",
                                              "netns add cp-5-1-s"]
    assert "gso_max_segs 1" in first[3]
    assert any("mtu 1280" in line for ns, lines in batches if ns == "cp-5-1-a"
               for line in lines)
    routes = [i for i, (_, lines) in enumerate(batches) if lines[0].startswith("route")]
    addresses = [i for i, (_, lines) in enumerate(batches)
                 if any(line.startswith("addr") for line in lines)]
    assert min(routes) > max(addresses)
    assert batches[routes[0]][1] == ["route add 198.18.2.0/24 via 198.18.2.2 dev cp-5-1"]
    assert kernel.teardown_batch(layout) == ["link del cp-5-1", "netns del cp-5-1-a",
                                             "netns del cp-5-1-b", "netns del cp-5-1-s"]


def test_counters_are_read_from_nft_json() -> None:
    text = ('{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"counter": {"family": "inet",'
            ' "name": "loss_up", "table": "chatprobe", "handle": 2, "packets": 7, '
            '"bytes": 400}}]}')
    assert kernel.parse_counters(text) == {"loss_up": 7}


def test_the_kernel_spec_takes_only_what_the_plan_gives_the_kernel() -> None:
    profile = load_profile("vpn-overseas")
    spec = KernelSpec.from_plan(profile, run_plan(profile, "http://h", NO_NETEM))
    assert (spec.loss_up, spec.loss_down, spec.mtu) == (0.5, 0.5, 1420)
    assert (spec.bandwidth_up_kbit, spec.bandwidth_down_kbit) == (10000, 20000)
    assert spec.parameters == {"up.loss_percent", "down.loss_percent", "up.bandwidth_kbit",
                               "down.bandwidth_kbit", "link.mtu"}
    assert not KernelSpec.from_plan(profile, run_plan(profile, "http://h")).active
    wifi = load_profile("lossy-wifi")
    assert KernelSpec.from_plan(wifi, run_plan(wifi, "http://h", ALL)).netem_up
    assert not KernelSpec.from_plan(wifi, run_plan(wifi, "http://h", NO_NETEM)).netem_up
    office = load_profile("office-firewall")
    spec = KernelSpec.from_plan(office, run_plan(office, "http://h:443", NO_NETEM))
    assert (spec.allowed_ports, spec.idle_timeout_s, spec.idle_action) == ((443,), 60, "silent")


def test_the_proxy_leaves_what_the_kernel_applies() -> None:
    profile = load_profile("cross-border")
    plan = run_plan(profile, "http://h", NO_NETEM)
    spec = KernelSpec.from_plan(profile, plan)
    assert {"middlebox.forged_rst_after_s", "middlebox.reconnect_block_s",
            "up.bandwidth_kbit"} <= spec.parameters
    kinds = {type(f) for f in proxy_faults(profile, seed=1, kernel=spec.parameters)()}
    assert kinds == {Latency}
    alone = {type(f) for f in proxy_faults(profile, seed=1)()}
    assert alone == {Latency, Bandwidth, ResetPeer}
    # conntrack counts whole seconds and cannot send a FIN: such idle timeouts stay in the
    # proxy, and the plan says why.
    for idle, action in ((0.5, "silent"), (60.0, "fin")):
        odd = Profile(name="odd", idle_timeout_s=idle, idle_timeout_action=action)
        item = {i.parameter: i for i in emulation_plan(odd, ALL)}["middlebox.idle_timeout_s"]
        assert item.layer == "proxy" and "(" in item.why
        spec = KernelSpec.from_plan(odd, run_plan(odd, "http://h", ALL))
        assert {type(f) for f in proxy_faults(odd, kernel=spec.parameters)()} == {IdleTimeout}


def test_without_the_kernel_each_kernel_parameter_says_why_it_is_skipped() -> None:
    profile = Profile(name="t", up=Direction(loss_percent=1, bandwidth_kbit=500), mtu=1400,
                      mss_clamp=1360, pmtu_blackhole=True, allowed_ports=(443,))
    kernel_items = ("up.loss_percent", "link.mtu", "link.mss_clamp", "link.pmtu_blackhole",
                    "link.allowed_ports")
    not_root = {i.parameter: i for i in run_plan(profile, "http://h", PROXY_ONLY)}
    off = {i.parameter: i for i in run_plan(profile, "http://h", PROXY_ONLY,
                                            kernel_off="switched off (CHATPROBE_KERNEL=off)")}
    for parameter in kernel_items:
        assert not not_root[parameter].emulated and "needs root" in not_root[parameter].why
        assert off[parameter].why == "skipped: switched off (CHATPROBE_KERNEL=off)"
    assert off["up.bandwidth_kbit"].emulated and "CHATPROBE_KERNEL" in off[
        "up.bandwidth_kbit"].why
    applied = {i.parameter: i for i in run_plan(profile, "http://h:8080", NO_NETEM)}
    assert all(applied[p].emulated for p in kernel_items)
    assert "port 8080 is not among them" in applied["link.allowed_ports"].why
    assert "not among" not in {i.parameter: i for i in run_plan(
        profile, "https://h", NO_NETEM)}["link.allowed_ports"].why


def test_the_switch_turns_the_kernel_layer_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernel.ENV_SWITCH, "off")
    caps, reason = kernel.state()
    assert caps == kernel.NOTHING and reason is not None and kernel.ENV_SWITCH in reason
    monkeypatch.setenv(kernel.ENV_SWITCH, "auto")
    assert kernel.state()[1] is None
