"""The kernel layer of network profiles (edge): network namespaces, veth links, nftables and
tc, on Linux as root. See docs/kernel.md.

One emulated path per side (customers, agents), four hops in a row::

    host (clients) --- a (access router) === b (border router) --- s (edge)
      cp-PID-K           cp-PID-K-a            cp-PID-K-b            cp-PID-K-s

The fault proxy's listening socket is made inside ``s`` on the target's own port (so port
rules see the port a real client dials); a socket keeps the namespace it was made in, and the
proxy's connections to the real target leave from the host namespace to loopback. Clients in
the host connect to ``s``'s address, so everything the kernel does on the way applies to
client <-> proxy traffic. Router ``a`` holds the profile's nftables table (loss per
direction, port rules, conntrack idle timeout, forged resets, MSS clamping) and the qdiscs
of its two links (tbf; netem for bursty loss where the kernel has it). The ``a === b`` link
has the profile's MTU while both endpoints keep 1500: they learn the path MTU from ICMP as on
the Internet, unless the profile drops that ICMP (a PMTU blackhole). A smaller MTU on an
endpoint's own interface would not do: its TCP would simply announce a smaller MSS.

Addresses come from 198.18.0.0/15 (RFC 2544, set aside for network benchmarks), one /24 per
path. Every name starts with ``cp-<pid>-`` so a later run can remove what a crashed run left
(:func:`cleanup_leftovers`); nft tables and qdiscs live inside our namespaces and go with
them. The host keeps only the veth end and a route to the /24, both removed with the veth.

The decisions (layout, ip batches, nft ruleset text, tc commands) are pure functions; the
rest runs them.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import functools
import ipaddress
import itertools
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from chatprobe.errors import HarnessError
from chatprobe.profiles import KERNEL_NETEM, Capabilities, PlanItem, Profile

T = TypeVar("T")

PREFIX = "cp-"
POOL = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544: for network test equipment
BLOCKS = POOL.num_addresses // 256
TABLE = "chatprobe"
ENV_SWITCH = "CHATPROBE_KERNEL"  # "off" keeps the kernel out even as root
COMMAND_TIMEOUT_S = 20.0
BUFFER_MS = 250  # tbf queue: this long at the profile's rate, then tail drop (assumed)
BURST_PACKETS = 3.0  # mean length of a loss burst for netem's Gilbert-Elliott model (assumed)
FORGOTTEN_FLOW_S = 60  # how long a reset flow's later packets are answered with a RST
CLONE_NEWNET = 0x40000000

# Device names inside the namespaces (the host end is named after the path).
A_HOST, A_BORDER, B_ACCESS, B_EDGE, S_BORDER = (
    "to-host", "to-border", "to-access", "to-edge", "to-border")

_NAME = re.compile(r"^cp-(?P<pid>\d+)-(?P<rest>[0-9a-z]+(?:-[a-z]+)?)$")


class KernelError(HarnessError):
    """Building or reading the kernel layer failed (one line for the user)."""


# ------------------------------------------------------------------------------ pure parts


@dataclass(frozen=True)
class Layout:
    """Names and addresses of one path: process ``pid``'s ``index``-th, in /24 ``block``."""

    pid: int
    index: int
    block: int

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.pid}-{self.index}"

    @property
    def host_link(self) -> str:
        return self.name  # at most 15 characters: pid <= 7 digits, index < 10000

    @property
    def access(self) -> str:
        return f"{self.name}-a"

    @property
    def border(self) -> str:
        return f"{self.name}-b"

    @property
    def edge(self) -> str:
        return f"{self.name}-s"

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return self.access, self.border, self.edge

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network((int(POOL.network_address) + 256 * self.block, 24))

    def address(self, last: int) -> str:
        return str(self.subnet.network_address + last)

    # Three /30 links: host-a (.1, .2), a-b (.5, .6), b-s (.9, .10).
    @property
    def host_address(self) -> str:
        return self.address(1)

    @property
    def edge_address(self) -> str:
        return self.address(10)


@dataclass(frozen=True)
class KernelSpec:
    """What the kernel layer applies for one profile (only what the run plan gave it)."""

    loss_up: float = 0.0  # percent
    loss_down: float = 0.0
    netem_up: bool = False  # the loss is bursty, by netem's Gilbert-Elliott model
    netem_down: bool = False
    bandwidth_up_kbit: float | None = None
    bandwidth_down_kbit: float | None = None
    mtu: int = 1500
    mss_clamp: int | None = None
    pmtu_blackhole: bool = False
    allowed_ports: tuple[int, ...] | None = None
    idle_timeout_s: int | None = None
    idle_action: str = "silent"
    forged_rst_after_s: float | None = None
    reconnect_block_s: float | None = None
    parameters: frozenset[str] = field(default_factory=frozenset)

    @property
    def active(self) -> bool:
        return bool(self.parameters)

    @classmethod
    def from_plan(cls, profile: Profile, plan: list[PlanItem]) -> KernelSpec:
        """The kernel part of ``profile``: the plan's items that a kernel layer emulates."""
        mine = {item.parameter: item for item in plan
                if item.emulated and item.layer.startswith("kernel")}
        values: dict[str, Any] = {}
        for direction in ("up", "down"):
            link = getattr(profile, direction)
            loss = mine.get(f"{direction}.loss_percent")
            if loss is not None:
                values[f"loss_{direction}"] = link.loss_percent
                values[f"netem_{direction}"] = loss.layer == KERNEL_NETEM
            if f"{direction}.bandwidth_kbit" in mine:
                values[f"bandwidth_{direction}_kbit"] = link.bandwidth_kbit
        if "link.mtu" in mine:
            values["mtu"] = profile.mtu
        if "link.mss_clamp" in mine:
            values["mss_clamp"] = profile.mss_clamp
        if "link.pmtu_blackhole" in mine:
            values["pmtu_blackhole"] = profile.pmtu_blackhole
        if "link.allowed_ports" in mine:
            values["allowed_ports"] = profile.allowed_ports
        if "middlebox.idle_timeout_s" in mine and profile.idle_timeout_s is not None:
            values["idle_timeout_s"] = int(profile.idle_timeout_s)
            values["idle_action"] = profile.idle_timeout_action
        if "middlebox.forged_rst_after_s" in mine:
            values["forged_rst_after_s"] = profile.forged_rst_after_s
            if "middlebox.reconnect_block_s" in mine:
                values["reconnect_block_s"] = profile.reconnect_block_s
        return cls(**values, parameters=frozenset(mine))


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _per_10k(percent: float) -> int:
    return round(percent * 100)  # numgen draws 0..9999: 0.01 % steps


def access_ruleset(spec: KernelSpec) -> str:
    """The nftables table of router ``a`` (loaded with ``nft -f``). Rules run in order:
    loss first (a dropped packet meets nothing else, as on a lossy wire), then what a
    middlebox decides about flows, then MSS clamping of what passes."""
    counters = ["loss_up", "loss_down", "port_refused", "idle_forgotten", "forged_rst",
                "reset_after_forged", "reconnect_refused", "frag_needed_dropped"]
    lines = [f"table inet {TABLE} {{"]
    lines += [f"  counter {name} {{}}" for name in counters]
    rst = spec.forged_rst_after_s is not None
    if spec.idle_timeout_s is not None:
        lines += ["  ct timeout idle {", "    protocol tcp;", "    l3proto ip;",
                  f"    policy = {{ established: {spec.idle_timeout_s} }}", "  }"]
    if rst:
        lines += ["  set young { typeof ct id; flags timeout; }",
                  "  set doomed { typeof ct id; flags timeout; }",
                  "  set blocked { type ipv4_addr . inet_service; flags timeout; }"]
    if spec.idle_timeout_s is not None:
        # Conntrack timeouts take effect only when set at filter priority (measured: not at
        # raw priority).
        lines += ["  chain conntrack {",
                  "    type filter hook prerouting priority filter; policy accept;",
                  '    ct state new ct timeout set "idle"', "  }"]
    lines += ["  chain through {", "    type filter hook forward priority filter; policy accept;"]
    rules: list[str] = []
    if spec.loss_up and not spec.netem_up:
        rules.append(f'iifname "{A_HOST}" numgen random mod 10000 < {_per_10k(spec.loss_up)} '
                     'counter name "loss_up" drop')
    if spec.loss_down and not spec.netem_down:
        rules.append(f'iifname "{A_BORDER}" numgen random mod 10000 < '
                     f'{_per_10k(spec.loss_down)} counter name "loss_down" drop')
    if spec.pmtu_blackhole:
        rules += _frag_needed_drops()
    if spec.idle_timeout_s is not None:
        # Conntrack forgot an idle flow: its next packet is "new" without a SYN (loose
        # pickup), and a firewall that no longer knows the flow drops it (or resets).
        verdict = "reject with tcp reset" if spec.idle_action == "rst" else "drop"
        rules.append('ct state new tcp flags & (syn | ack) != syn counter name '
                     f'"idle_forgotten" {verdict}')
    if spec.allowed_ports is not None:
        ports = ", ".join(str(p) for p in spec.allowed_ports)
        rules.append(f'iifname "{A_HOST}" ct state new tcp dport != {{ {ports} }} '
                     'counter name "port_refused" reject with tcp reset')
        rules.append(f'iifname "{A_HOST}" ct state new udp dport != {{ {ports} }} '
                     'counter name "port_refused" reject')
    if spec.forged_rst_after_s is not None:
        rules += _forged_rst_rules(spec.forged_rst_after_s, spec.reconnect_block_s)
    if spec.mss_clamp is not None:
        rules.append(f"tcp flags syn tcp option maxseg size > {spec.mss_clamp} "
                     f"tcp option maxseg size set {spec.mss_clamp}")
    lines += [f"    {rule}" for rule in rules]
    lines.append("  }")
    if spec.pmtu_blackhole:
        lines += _local_out_chain()
    lines.append("}")
    return "\n".join(lines) + "\n"


def _frag_needed_drops() -> list[str]:
    return ['icmp type destination-unreachable icmp code frag-needed counter name '
            '"frag_needed_dropped" drop',
            'icmpv6 type packet-too-big counter name "frag_needed_dropped" drop']


def _local_out_chain() -> list[str]:
    # A router's own "fragmentation needed" leaves through output, not forward.
    return ["  chain local_out {",
            "    type filter hook output priority filter; policy accept;",
            *(f"    {rule}" for rule in _frag_needed_drops()), "  }"]


def _forged_rst_rules(after_s: float, block_s: float | None) -> list[str]:
    """A flow older than ``after_s``: its next packet (either way) becomes a RST to its
    receiver, and the sender's next packet (a retransmission: its data was never acked) is
    answered with a RST, so both ends are reset, as a censor's forged RSTs do. Then new
    connections to the same server are refused for ``block_s``."""
    rules = []
    if block_s is not None:
        rules.append("ct state new tcp flags syn ip daddr . tcp dport @blocked "
                     'counter name "reconnect_refused" reject with tcp reset')
    if after_s > 0:
        rules.append(f"ct state new tcp flags syn add @young {{ ct id timeout {_ms(after_s)} }}")
    rules.append('ct state established tcp flags ! rst ct id @doomed counter name '
                 '"reset_after_forged" reject with tcp reset')
    young = " ct id != @young" if after_s > 0 else ""
    block = ("" if block_s is None else " add @blocked { ct original ip daddr . ct original "
             f"proto-dst timeout {_ms(block_s)} }}")
    rules.append(f"ct state established tcp flags ! syn,rst{young}{block} add @doomed "
                 f"{{ ct id timeout {FORGOTTEN_FLOW_S}s }} counter name \"forged_rst\" "
                 "tcp flags set rst | ack")
    return rules


def border_ruleset(spec: KernelSpec) -> str | None:
    """Router ``b``'s table: only the PMTU blackhole (it is where the downlink's too-big
    packets meet the narrow link)."""
    if not spec.pmtu_blackhole:
        return None
    return "\n".join([f"table inet {TABLE} {{", "  counter frag_needed_dropped {}",
                      "  chain through {",
                      "    type filter hook forward priority filter; policy accept;",
                      *(f"    {rule}" for rule in _frag_needed_drops()), "  }",
                      *_local_out_chain(), "}"]) + "\n"


def _tbf(kbit: float, mtu: int) -> list[str]:
    rate_bytes = kbit * 1000 / 8
    # The bucket holds at least two full frames, else tbf never sends one.
    burst = max(2 * (mtu + 14), math.ceil(rate_bytes / 100))
    return ["tbf", "rate", f"{kbit:g}kbit", "burst", str(burst), "latency", f"{BUFFER_MS}ms"]


def _gemodel(percent: float) -> list[str]:
    """Simple Gilbert: every packet lost in the bad state, none in the good one; a burst
    lasts BURST_PACKETS on average and the long-run loss is ``percent``."""
    r = 1 / BURST_PACKETS
    loss = percent / 100
    p = loss * r / (1 - loss) if loss < 1 else 1.0
    return ["netem", "loss", "gemodel", f"{p * 100:.4g}%", f"{r * 100:.4g}%", "100%", "0%"]


def tc_commands(layout: Layout, spec: KernelSpec) -> list[list[str]]:
    """tc commands for router ``a``'s two egress queues: toward ``b`` (up) and toward the
    host (down). netem (bursty loss) is the root with tbf as its child, as netem's manual
    chains them."""
    commands: list[list[str]] = []
    for device, kbit, netem, loss in (
            (A_BORDER, spec.bandwidth_up_kbit, spec.netem_up, spec.loss_up),
            (A_HOST, spec.bandwidth_down_kbit, spec.netem_down, spec.loss_down)):
        mtu = spec.mtu if device == A_BORDER else 1500
        base = ["tc", "-n", layout.access, "qdisc", "add", "dev", device]
        if netem and loss:
            commands.append([*base, "root", "handle", "1:", *_gemodel(loss)])
            if kbit:
                commands.append([*base, "parent", "1:1", "handle", "10:", *_tbf(kbit, mtu)])
        elif kbit:
            commands.append([*base, "root", "handle", "1:", *_tbf(kbit, mtu)])
    return commands


def ip_batches(layout: Layout, spec: KernelSpec) -> list[tuple[str | None, list[str]]]:
    """``ip -batch`` inputs in order, each for a namespace (None: the host). Links first,
    then addresses and MTUs, then routes (a gateway must be on an up link).
    ``gso_max_segs 1`` on the senders' links: the kernel hands single packets to loss and
    shaping rules, not 64 KB super-packets that would be dropped or queued as one."""
    a, b, s, host = layout.access, layout.border, layout.edge, layout.host_link
    ad = layout.address
    return [
        (None, [f"netns add {a}", f"netns add {b}", f"netns add {s}",
                f"link add {host} gso_max_segs 1 type veth peer name {A_HOST} netns {a}"]),
        (a, [f"link add {A_BORDER} mtu {spec.mtu} type veth peer name {B_ACCESS} "
             f"mtu {spec.mtu} netns {b}"]),
        (b, [f"link add {B_EDGE} type veth peer name {S_BORDER} gso_max_segs 1 netns {s}"]),
        (None, [f"addr add {ad(1)}/30 dev {host}", f"link set {host} up"]),
        (a, ["link set lo up", f"addr add {ad(2)}/30 dev {A_HOST}",
             f"addr add {ad(5)}/30 dev {A_BORDER}", f"link set {A_HOST} up",
             f"link set {A_BORDER} up"]),
        (b, ["link set lo up", f"addr add {ad(6)}/30 dev {B_ACCESS}",
             f"addr add {ad(9)}/30 dev {B_EDGE}", f"link set {B_ACCESS} up",
             f"link set {B_EDGE} up"]),
        (s, ["link set lo up", f"addr add {ad(10)}/30 dev {S_BORDER}",
             f"link set {S_BORDER} up"]),
        (None, [f"route add {layout.subnet} via {ad(2)} dev {host}"]),
        (a, [f"route add default via {ad(1)}", f"route add {ad(8)}/30 via {ad(6)}"]),
        (b, [f"route add default via {ad(5)}"]),
        (s, [f"route add default via {ad(9)}"]),
    ]


def teardown_batch(layout: Layout) -> list[str]:
    """Deleting the host's veth end deletes its peer; the namespaces take the rest (their
    links, nft tables and qdiscs) with them."""
    return [f"link del {layout.host_link}", *(f"netns del {n}" for n in layout.namespaces)]


def owner_pid(name: str) -> int | None:
    """The pid in one of our names (``cp-<pid>-...``), or None for someone else's."""
    match = _NAME.match(name)
    return int(match["pid"]) if match else None


def stale(names: Iterable[str], alive: Callable[[int], bool], own_pid: int,
          own_active: frozenset[str]) -> list[str]:
    """Our names whose process is gone, and our own pid's names that are not in use (a
    process with this pid crashed before us)."""
    result = []
    for name in names:
        pid = owner_pid(name)
        if pid is None:
            continue
        if pid == own_pid:
            if name not in own_active:
                result.append(name)
        elif not alive(pid):
            result.append(name)
    return result


def used_blocks(ip_output: str) -> set[int]:
    """/24 blocks of the pool that any address or route in ``ip`` output already touches."""
    used: set[int] = set()
    for match in re.finditer(r"\b(\d{1,3}(?:\.\d{1,3}){3})(?:/(\d{1,2}))?\b", ip_output):
        try:
            network = ipaddress.IPv4Network(f"{match[1]}/{match[2] or 32}", strict=False)
        except ValueError:
            continue
        if not network.overlaps(POOL):
            continue
        low = max(int(network.network_address), int(POOL.network_address))
        high = min(int(network.broadcast_address), int(POOL.broadcast_address))
        first, last = ((low - int(POOL.network_address)) // 256,
                       (high - int(POOL.network_address)) // 256)
        used.update(range(first, last + 1))
    return used


def parse_counters(nft_json: str) -> dict[str, int]:
    """Packets per named counter from ``nft -j list counters``."""
    out: dict[str, int] = {}
    for entry in json.loads(nft_json).get("nftables", []):
        counter = entry.get("counter")
        if isinstance(counter, dict) and "name" in counter:
            out[str(counter["name"])] = int(counter.get("packets", 0))
    return out


# -------------------------------------------------------------------------------- commands


def _run(args: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(args, input=stdin, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelError(f"kernel layer: {' '.join(args)}: {exc}") from None
    if done.returncode != 0:
        message = " ".join((done.stderr or done.stdout).split())[:300]
        raise KernelError(f"kernel layer: {' '.join(args[:6])} failed: {message}")
    return done.stdout


def _batch(namespace: str | None, lines: list[str], force: bool = False) -> None:
    args = ["ip", *(["-n", namespace] if namespace else []), *(["-force"] if force else []),
            "-batch", "-"]
    _run(args, "\n".join(lines) + "\n")


def _nft(namespace: str, args: list[str], stdin: str | None = None) -> str:
    return _run(["ip", "netns", "exec", namespace, "nft", *args], stdin)


_libc: Any = None


def _setns(fd: int) -> None:
    native = getattr(os, "setns", None)  # Python 3.12+
    if native is not None:
        native(fd, CLONE_NEWNET)
        return
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def in_namespace(name: str, work: Callable[[], T]) -> T:
    """Run ``work`` in network namespace ``name`` on a short-lived thread of its own (setns
    changes only the calling thread; a socket made there keeps that namespace)."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            # The thread ends here: no need to switch back, nothing else runs on it.
            result.append(work())
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    thread = threading.Thread(target=run, name=f"chatprobe-netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _write_sysctl(path: str, value: str) -> None:
    Path("/proc/sys", path).write_text(value)


# ---------------------------------------------------------------------------- capabilities


def disabled_reason() -> str | None:
    """Why the kernel layer is switched off by the user, if it is."""
    if os.environ.get(ENV_SWITCH, "").strip().lower() in ("off", "0", "no", "false"):
        return f"the kernel layer is switched off ({ENV_SWITCH}=off)"
    return None


NOTHING = Capabilities(root=False, netns=False, nftables=False, tbf=False, netem=False)


_DETECT_LOCK = threading.Lock()


def detect() -> Capabilities:
    """What this machine offers, tried for real in a throwaway namespace (once per
    process; threads wait for the first): root, ``ip netns``, tc tbf, tc netem, and
    nftables with every feature the rulesets use."""
    with _DETECT_LOCK:
        return _detect()


@functools.cache
def _detect() -> Capabilities:
    if not sys.platform.startswith("linux"):
        return NOTHING
    if os.geteuid() != 0:
        # Nothing can be tried without root: the tools that are installed count as there,
        # so the plan says "needs root" rather than a list of what may not be missing.
        return Capabilities(root=False, netns=shutil.which("ip") is not None,
                            nftables=shutil.which("nft") is not None,
                            tbf=shutil.which("tc") is not None, netem=False)
    if shutil.which("ip") is None:
        return Capabilities(root=True, netns=False, nftables=False, tbf=False, netem=False)
    cleanup_leftovers()
    name = f"{PREFIX}{os.getpid()}-probe"
    with contextlib.suppress(KernelError):  # left by a crashed process that had our pid
        _run(["ip", "netns", "del", name])
    try:
        _run(["ip", "netns", "add", name])
    except KernelError:
        return Capabilities(root=True, netns=False, nftables=False, tbf=False, netem=False)
    try:
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        tc = shutil.which("tc") is not None
        tbf = tc and _works(["tc", "-n", name, "qdisc", "add", "dev", "lo", "root", "handle",
                             "1:", *_tbf(1000, 1500)])
        if tbf:
            _works(["tc", "-n", name, "qdisc", "del", "dev", "lo", "root"])
        netem = tc and _works(["tc", "-n", name, "qdisc", "add", "dev", "lo", "root",
                               "netem", "loss", "1%"])
        probe = KernelSpec(loss_up=1, idle_timeout_s=60, forged_rst_after_s=1,
                           reconnect_block_s=1, mss_clamp=1360, pmtu_blackhole=True,
                           allowed_ports=(443,))
        nftables = shutil.which("nft") is not None and _works(
            ["ip", "netns", "exec", name, "nft", "-f", "-"], access_ruleset(probe))
        return Capabilities(root=True, netns=True, nftables=nftables, tbf=tbf, netem=netem)
    finally:
        with contextlib.suppress(KernelError):
            _run(["ip", "netns", "del", name])


def _works(args: list[str], stdin: str | None = None) -> bool:
    try:
        _run(args, stdin)
    except KernelError:
        return False
    return True


def state() -> tuple[Capabilities, str | None]:
    """The capabilities a run uses, and why the kernel layer is off if the user said so."""
    reason = disabled_reason()
    if reason is not None:
        return NOTHING, reason
    return detect(), None


# --------------------------------------------------------------------------------- cleanup

_ACTIVE: dict[str, KernelPath] = {}  # our paths in use, by name
_ACTIVE_LOCK = threading.Lock()
_COUNTER = itertools.count()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def existing_names() -> tuple[list[str], list[str]]:
    """Names of namespaces and host links that look like ours."""
    namespaces = [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines()
                  if line.strip()]
    links = []
    for line in _run(["ip", "-o", "link", "show"]).splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            links.append(parts[1].strip().split("@")[0])
    return ([n for n in namespaces if owner_pid(n) is not None],
            [n for n in links if owner_pid(n) is not None])


def cleanup_leftovers() -> list[str]:
    """Remove namespaces and host links that runs which are gone left behind (a crash,
    SIGKILL); returns their names. Paths of live processes are left alone."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return []
    namespaces, links = existing_names()
    with _ACTIVE_LOCK:
        active = frozenset(n for path in _ACTIVE.values() for n in path.names)
    pid = os.getpid()
    doomed_links = stale(links, pid_alive, pid, active)
    doomed_namespaces = stale(namespaces, pid_alive, pid, active)
    # A probe namespace of this process is in use while detect() runs.
    doomed_namespaces = [n for n in doomed_namespaces if n != f"{PREFIX}{pid}-probe"]
    lines = [f"link del {n}" for n in doomed_links] + [
        f"netns del {n}" for n in doomed_namespaces]
    if lines:
        _batch(None, lines, force=True)
    return doomed_links + doomed_namespaces


def _cleanup_own() -> None:
    """At interpreter exit: paths whose owner did not close them (a daemon thread)."""
    with _ACTIVE_LOCK:
        paths = list(_ACTIVE.values())
    for path in paths:
        with contextlib.suppress(Exception):
            path.close()


atexit.register(_cleanup_own)


@contextlib.contextmanager
def _allocation_lock() -> Iterator[None]:
    """Two chatprobe processes must not pick the same /24 (pytest workers, a swarm and a
    probe at once)."""
    folder = Path("/run/lock") if Path("/run/lock").is_dir() else Path(tempfile.gettempdir())
    with (folder / "chatprobe-kernel.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------ path


class KernelPath:
    """One emulated path: ``open`` builds it, ``close`` removes it (also after a failed
    ``open``; ``close`` waits for an ``open`` still running on another thread)."""

    def __init__(self, spec: KernelSpec) -> None:
        self.spec = spec
        self.layout: Layout | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def names(self) -> list[str]:
        if self.layout is None:
            return []
        return [self.layout.host_link, *self.layout.namespaces]

    @property
    def address(self) -> str:
        """Where clients connect: the edge namespace's address."""
        if self.layout is None:
            raise KernelError("kernel path is not open")
        return self.layout.edge_address

    def open(self) -> KernelPath:
        with self._lock:
            if self._closed:
                raise KernelError("kernel path was closed before it was built")
            cleanup_leftovers()
            index = next(_COUNTER)
            if index >= 10000:
                raise KernelError("kernel layer: too many paths in one process")
            with _allocation_lock():
                used = used_blocks(_run(["ip", "-4", "-o", "addr", "show"])
                                   + _run(["ip", "-4", "route", "show", "table", "all"]))
                start = (os.getpid() * 7 + index) % BLOCKS
                block = next((b % BLOCKS for b in range(start, start + BLOCKS)
                              if b % BLOCKS not in used), None)
                if block is None:
                    raise KernelError(f"kernel layer: no free /24 left in {POOL}")
                self.layout = Layout(os.getpid(), index, block)
                with _ACTIVE_LOCK:
                    _ACTIVE[self.layout.name] = self
                try:
                    self._build(self.layout)
                except KernelError as exc:
                    self._teardown()
                    raise KernelError(f"{exc} ({ENV_SWITCH}=off runs with the proxy "
                                      "alone)") from None
                except BaseException:
                    self._teardown()
                    raise
        return self

    def _build(self, layout: Layout) -> None:
        spec = self.spec
        for namespace, lines in ip_batches(layout, spec):
            _batch(namespace, lines)
        with contextlib.suppress(OSError):  # quiet links: no IPv6 chatter in the counters
            _write_sysctl(f"net/ipv6/conf/{layout.host_link}/disable_ipv6", "1")
        for namespace in layout.namespaces:
            forward = "1" if namespace != layout.edge else "0"

            def configure(forward: str = forward) -> None:
                _write_sysctl("net/ipv4/ip_forward", forward)
                with contextlib.suppress(OSError):
                    _write_sysctl("net/ipv6/conf/all/disable_ipv6", "1")

            in_namespace(namespace, configure)
        _nft(layout.access, ["-f", "-"], access_ruleset(spec))
        border = border_ruleset(spec)
        if border is not None:
            _nft(layout.border, ["-f", "-"], border)
        for command in tc_commands(layout, spec):
            _run(command)

    def listen(self, port: int) -> socket.socket:
        """A listening TCP socket on ``port`` inside the edge namespace (non-blocking)."""
        address = self.address
        edge = self.layout.edge if self.layout else ""

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((address, port))
                sock.listen(1024)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            return sock

        return in_namespace(edge, make)

    def counters(self) -> dict[str, int]:
        """What the kernel did: packets per nft counter (both routers), and packets each
        tbf queue dropped. Zero counters are left out."""
        if self.layout is None or self._closed:
            return {}
        totals: dict[str, int] = {}
        sources = [self.layout.access] + ([self.layout.border] if self.spec.pmtu_blackhole
                                          else [])
        for namespace in sources:
            for name, packets in parse_counters(_nft(namespace, ["-j", "list", "counters"])
                                                ).items():
                totals[name] = totals.get(name, 0) + packets
        shaped = (self.spec.bandwidth_up_kbit or self.spec.netem_up,
                  self.spec.bandwidth_down_kbit or self.spec.netem_down)
        for device, label, queue in ((A_BORDER, "queue_dropped_up", shaped[0]),
                                     (A_HOST, "queue_dropped_down", shaped[1])):
            if not queue:
                continue
            qdiscs = json.loads(_run(["tc", "-n", self.layout.access, "-s", "-j", "qdisc",
                                      "show", "dev", device]) or "[]")
            totals[label] = sum(int(q.get("drops", 0)) for q in qdiscs
                                if q.get("kind") in ("tbf", "netem"))
        return {name: value for name, value in totals.items() if value}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._teardown()

    def _teardown(self) -> None:
        if self.layout is None:
            return
        with contextlib.suppress(KernelError):
            _batch(None, teardown_batch(self.layout), force=True)
        with _ACTIVE_LOCK:
            _ACTIVE.pop(self.layout.name, None)

    def __enter__(self) -> KernelPath:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
