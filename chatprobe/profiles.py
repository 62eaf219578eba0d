"""Network profiles as data: bad networks read from YAML files, and a plan of how to emulate
them (pure: no sockets, no subprocesses).

A profile names what sits between a chat client and the service: added one-way latency,
jitter, bandwidth and packet loss per direction (up = client -> server, down = server ->
client), the link (MTU, MSS clamping, PMTU blackhole, allowed ports) and middlebox behaviour
(idle-timeout kill, WebSocket Upgrade stripping, periodic stalls, forged resets). Users add
profiles by dropping a file into fixtures/profiles/; no code needed.

``emulation_plan`` says, for the capabilities of this machine, which layer emulates each
parameter (the userspace proxy or a kernel piece) and what cannot be emulated and why, so
nothing is dropped silently. Numbers and sources: the design note network-profiles.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatprobe.config import read_document
from chatprobe.errors import HarnessError
from chatprobe.paths import fixtures_dir

IDLE_TIMEOUT_ACTIONS = ("silent", "fin", "rst")
UPGRADE_ACTIONS = ("pass", "strip", "refuse")

MAX_LATENCY_MS = 60_000.0
MAX_BANDWIDTH_KBIT = 100_000_000.0  # 100 Gbit/s
MAX_SECONDS = 86_400.0
MIN_MTU, MAX_MTU = 576, 9000
MIN_MSS = 88  # Linux's floor

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

PROXY = "proxy"
KERNEL_NFTABLES = "kernel: nftables"
KERNEL_NETEM = "kernel: netem"
KERNEL_TBF = "kernel: tbf"
KERNEL_LINK_MTU = "kernel: link mtu"


@dataclass(frozen=True)
class Direction:
    """What one direction of the path adds: one-way delay, uniform +/- jitter, a rate limit
    (None = unlimited) and random packet loss (bursty = Gilbert-Elliott style)."""

    latency_ms: float = 0
    jitter_ms: float = 0
    bandwidth_kbit: float | None = None
    loss_percent: float = 0
    loss_bursty: bool = False

    @property
    def is_clean(self) -> bool:
        return self == Direction()


@dataclass(frozen=True)
class Profile:
    name: str
    description: str = ""
    sources: tuple[str, ...] = ()
    toxicity: float = 1.0
    up: Direction = Direction()
    down: Direction = Direction()
    mtu: int = 1500
    mss_clamp: int | None = None
    pmtu_blackhole: bool = False
    allowed_ports: tuple[int, ...] | None = None
    idle_timeout_s: float | None = None
    idle_timeout_action: str = "silent"
    upgrade: str = "pass"
    upgrade_toxicity: float = 1.0
    stall_every_s: float | None = None
    stall_s: float = 0
    forged_rst_after_s: float | None = None
    reconnect_block_s: float | None = None

    @property
    def is_clean(self) -> bool:
        """Nothing to emulate: every network parameter at its default (name, description,
        sources and toxicity do not count)."""
        return not _non_default_fields(self)


# YAML section -> keys, and the Profile field each key fills (direction keys go to Direction).
_DIRECTION_KEYS = ("latency_ms", "jitter_ms", "bandwidth_kbit", "loss_percent", "loss_bursty")
_LINK_KEYS = ("mtu", "mss_clamp", "pmtu_blackhole", "allowed_ports")
_MIDDLEBOX_KEYS = ("idle_timeout_s", "idle_timeout_action", "upgrade", "upgrade_toxicity",
                   "stall_every_s", "stall_s", "forged_rst_after_s", "reconnect_block_s")
_TOP_KEYS = ("name", "description", "sources", "toxicity", "up", "down", "link", "middlebox")
_SECTION_OF = {**{key: "link" for key in _LINK_KEYS},
               **{key: "middlebox" for key in _MIDDLEBOX_KEYS}}


def _non_default_fields(profile: Profile) -> list[str]:
    """Dotted YAML keys (``up.latency_ms``, ``link.mtu``...) whose value is not the default."""
    changed = []
    for direction in ("up", "down"):
        value: Direction = getattr(profile, direction)
        for key in _DIRECTION_KEYS:
            if getattr(value, key) != getattr(Direction(), key):
                changed.append(f"{direction}.{key}")
    default = Profile(name=profile.name)
    for key, section in _SECTION_OF.items():
        if getattr(profile, key) != getattr(default, key):
            changed.append(f"{section}.{key}")
    return changed


# ---------------------------------------------------------------------------------- parsing


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _number(value: Any, where: str, low: float, high: float, *,
            low_open: bool = False) -> float:
    bad = isinstance(value, bool) or not isinstance(value, int | float)
    if bad or not (low < value if low_open else low <= value) or not value <= high:
        if low_open:
            raise HarnessError(f"{where} must be a number above {_fmt(low)} and at most "
                               f"{_fmt(high)}")
        raise HarnessError(f"{where} must be a number between {_fmt(low)} and {_fmt(high)}")
    return float(value)


def _optional_number(value: Any, where: str, low: float, high: float, *,
                     low_open: bool = False) -> float | None:
    if value is None:
        return None
    try:
        return _number(value, where, low, high, low_open=low_open)
    except HarnessError as exc:
        raise HarnessError(f"{exc} (or null)") from None


def _whole(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise HarnessError(f"{where} must be a whole number between {low} and {high}")
    return value


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise HarnessError(f"{where} must be true or false")
    return value


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise HarnessError(f"{where} must be one of {', '.join(choices)}")
    return str(value)


def _section(document: dict[Any, Any], key: str, allowed: tuple[str, ...],
             source: str) -> dict[str, Any]:
    value = document.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HarnessError(f"{source}: {key} must be a mapping")
    unknown = sorted(f"{key}.{k}" for k in value if k not in allowed)
    if unknown:
        raise HarnessError(f"{source}: unknown key(s) {', '.join(unknown)}")
    return value


def _direction(section: dict[str, Any], where: str) -> Direction:
    bandwidth = section.get("bandwidth_kbit")
    if section.get("loss_bursty") is True and not section.get("loss_percent"):
        raise HarnessError(f"{where}.loss_bursty needs {where.split(': ')[-1]}.loss_percent "
                           "above 0")
    return Direction(
        latency_ms=_number(section.get("latency_ms", 0), f"{where}.latency_ms", 0,
                           MAX_LATENCY_MS),
        jitter_ms=_number(section.get("jitter_ms", 0), f"{where}.jitter_ms", 0,
                          MAX_LATENCY_MS),
        bandwidth_kbit=_optional_number(bandwidth, f"{where}.bandwidth_kbit", 0,
                                        MAX_BANDWIDTH_KBIT, low_open=True),
        loss_percent=_number(section.get("loss_percent", 0), f"{where}.loss_percent", 0, 100),
        loss_bursty=_flag(section.get("loss_bursty", False), f"{where}.loss_bursty"),
    )


def parse_profile(document: Any, source: str) -> Profile:
    """A Profile from a parsed YAML document; every mistake is one HarnessError line naming
    ``source`` and the key."""
    if not isinstance(document, dict):
        raise HarnessError(f"{source}: a network profile must be a mapping")
    unknown = sorted(str(key) for key in document if key not in _TOP_KEYS)
    if unknown:
        raise HarnessError(f"{source}: unknown key(s) {', '.join(unknown)}")
    name = document.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise HarnessError(f"{source}: name must be letters, digits, '-', '_' or '.' "
                           "(no spaces or commas)")
    description = document.get("description", "")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise HarnessError(f"{source}: description must be a string")
    sources = document.get("sources", [])
    if sources is None:
        sources = []
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise HarnessError(f"{source}: sources must be a list of strings")
    up = _direction(_section(document, "up", _DIRECTION_KEYS, source), f"{source}: up")
    down = _direction(_section(document, "down", _DIRECTION_KEYS, source), f"{source}: down")
    link = _section(document, "link", _LINK_KEYS, source)
    box = _section(document, "middlebox", _MIDDLEBOX_KEYS, source)
    at = f"{source}: "

    mtu = _whole(link.get("mtu", 1500), f"{at}link.mtu", MIN_MTU, MAX_MTU)
    mss = link.get("mss_clamp")
    if mss is not None:
        mss = _whole(mss, f"{at}link.mss_clamp", MIN_MSS, mtu - 40)
    ports_raw = link.get("allowed_ports")
    ports: tuple[int, ...] | None = None
    if ports_raw is not None:
        if not isinstance(ports_raw, list) or not ports_raw:
            raise HarnessError(f"{at}link.allowed_ports must be a non-empty list of ports "
                               "(or null for all)")
        ports = tuple(sorted({_whole(p, f"{at}link.allowed_ports", 1, 65535)
                              for p in ports_raw}))

    idle = _optional_number(box.get("idle_timeout_s"), f"{at}middlebox.idle_timeout_s", 0,
                            MAX_SECONDS, low_open=True)
    action = _choice(box.get("idle_timeout_action", "silent"),
                     f"{at}middlebox.idle_timeout_action", IDLE_TIMEOUT_ACTIONS)
    if action != "silent" and idle is None:
        raise HarnessError(f"{at}middlebox.idle_timeout_action needs "
                           "middlebox.idle_timeout_s")
    upgrade = _choice(box.get("upgrade", "pass"), f"{at}middlebox.upgrade", UPGRADE_ACTIONS)
    upgrade_toxicity = _number(box.get("upgrade_toxicity", 1.0),
                               f"{at}middlebox.upgrade_toxicity", 0, 1)
    if upgrade == "pass" and upgrade_toxicity != 1.0:
        raise HarnessError(f"{at}middlebox.upgrade_toxicity needs middlebox.upgrade "
                           "strip or refuse")
    stall_every = _optional_number(box.get("stall_every_s"), f"{at}middlebox.stall_every_s",
                                   0, MAX_SECONDS, low_open=True)
    stall = _number(box.get("stall_s", 0), f"{at}middlebox.stall_s", 0, MAX_SECONDS)
    if stall_every is None and stall > 0:
        raise HarnessError(f"{at}middlebox.stall_s needs middlebox.stall_every_s")
    if stall_every is not None and not 0 < stall < stall_every:
        raise HarnessError(f"{at}middlebox.stall_s must be above 0 and below "
                           f"middlebox.stall_every_s ({_fmt(stall_every)})")
    forged = _optional_number(box.get("forged_rst_after_s"),
                              f"{at}middlebox.forged_rst_after_s", 0, MAX_SECONDS)
    block = _optional_number(box.get("reconnect_block_s"), f"{at}middlebox.reconnect_block_s",
                             0, MAX_SECONDS, low_open=True)
    if block is not None and forged is None:
        raise HarnessError(f"{at}middlebox.reconnect_block_s needs "
                           "middlebox.forged_rst_after_s")

    return Profile(
        name=name,
        description=" ".join(description.split()),
        sources=tuple(sources),
        toxicity=_number(document.get("toxicity", 1.0), f"{at}toxicity", 0, 1),
        up=up,
        down=down,
        mtu=mtu,
        mss_clamp=mss,
        pmtu_blackhole=_flag(link.get("pmtu_blackhole", False), f"{at}link.pmtu_blackhole"),
        allowed_ports=ports,
        idle_timeout_s=idle,
        idle_timeout_action=action,
        upgrade=upgrade,
        upgrade_toxicity=upgrade_toxicity,
        stall_every_s=stall_every,
        stall_s=stall,
        forged_rst_after_s=forged,
        reconnect_block_s=block,
    )


# ---------------------------------------------------------------------------------- loading


def profiles_dir() -> Path:
    return fixtures_dir() / "profiles"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


def _is_path(name_or_path: str) -> bool:
    return ("/" in name_or_path or "\\" in name_or_path
            or name_or_path.endswith((".yaml", ".yml", ".json")))


def load_profile(name_or_path: str) -> Profile:
    """A profile by name (fixtures/profiles/NAME.yaml) or by file path."""
    if _is_path(name_or_path):
        path = Path(name_or_path)
        return parse_profile(read_document(path, "network profile"), str(path))
    path = profiles_dir() / f"{name_or_path}.yaml"
    known = ", ".join(available_profiles()) or "none"
    document = read_document(path, "network profile",
                             f"no network profile {name_or_path!r} (known: {known})")
    profile = parse_profile(document, str(path))
    if profile.name != name_or_path:
        raise HarnessError(f"{path}: name {profile.name!r} does not match the file name "
                           f"{name_or_path!r}")
    return profile


def load_profiles(spec: list[str]) -> list[Profile]:
    """Profiles from repeated and/or comma-separated names or paths, in order:
    ``["clean,vpn-overseas", "mobile-3g"]``. The same profile twice is an error."""
    profiles: list[Profile] = []
    for item in spec:
        for piece in item.split(","):
            name = piece.strip()
            if not name:
                raise HarnessError(f"empty network profile name in {item!r}")
            profile = load_profile(name)
            if any(p.name == profile.name for p in profiles):
                raise HarnessError(f"network profile {profile.name!r} is given twice")
            profiles.append(profile)
    return profiles


# ---------------------------------------------------------------------------- emulation plan


@dataclass(frozen=True)
class Capabilities:
    """What this machine offers for emulation (detected elsewhere)."""

    root: bool
    netns: bool
    nftables: bool
    tbf: bool
    netem: bool


@dataclass(frozen=True)
class PlanItem:
    parameter: str  # dotted YAML key, e.g. "up.latency_ms"
    value: str  # human-readable, e.g. "100 ms"
    layer: str  # "proxy", "kernel: nftables", "kernel: netem", "kernel: tbf", ...
    emulated: bool
    why: str


_CAPABILITY_NAMES = (("root", "root"), ("netns", "network namespaces"),
                     ("nftables", "nftables"), ("tbf", "tc tbf"), ("netem", "tc netem"))


def _missing(caps: Capabilities, *needs: str) -> list[str]:
    return [label for attr, label in _CAPABILITY_NAMES if attr in needs
            and not getattr(caps, attr)]


def _needs(missing: list[str]) -> str:
    if len(missing) == 1:
        return f"needs {missing[0]}"
    return f"needs {', '.join(missing[:-1])} and {missing[-1]}"


def _value(profile: Profile, parameter: str) -> str:
    section, key = parameter.split(".")
    holder: Any = getattr(profile, section) if section in ("up", "down") else profile
    value = getattr(holder, key)
    if value is None:
        return "unlimited" if key == "bandwidth_kbit" else "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    if isinstance(value, str):
        return value
    if key.endswith("_ms"):
        return f"{_fmt(value)} ms"
    if key.endswith("_s"):
        return f"{_fmt(value)} s"
    if key == "bandwidth_kbit":
        return f"{_fmt(value)} kbit/s"
    if key == "loss_percent":
        return f"{_fmt(value)} %"
    if key == "upgrade_toxicity":
        return f"{_fmt(value * 100)} % of handshakes"
    return _fmt(value)


_PROXY_WHY = {
    "latency_ms": "the proxy holds each chunk this long",
    "jitter_ms": "the proxy adds uniform +/- jitter to each chunk's delay",
    "idle_timeout_s": "the proxy kills flows idle this long",
    "idle_timeout_action": "the proxy kills idle flows this way (silent: stops forwarding, "
                           "fin: closes, rst: resets)",
    "upgrade": "the proxy handles the WebSocket Upgrade request this way",
    "upgrade_toxicity": "the proxy decides this once per handshake",
    "stall_every_s": "the proxy stops forwarding periodically",
    "stall_s": "each proxy stall lasts this long",
    "forged_rst_after_s": "the proxy resets both its connections (client and server side) "
                          "this long into a connection; a real middlebox forges RST packets",
    "reconnect_block_s": "after the reset the proxy refuses new connections to the same "
                         "server this long",
}

_KERNEL_WHY = {
    "mtu": "the MTU of the emulated link inside the namespaces",
    "mss_clamp": "nftables rewrites the TCP MSS option of SYN packets",
    "pmtu_blackhole": "nftables drops ICMP 'fragmentation needed' (and IPv6 'packet too big')",
    "allowed_ports": "nftables refuses (TCP reset) connections to any other destination port",
    "idle_timeout_s": "conntrack forgets flows idle this long (nftables timeout policy)",
    "idle_timeout_action": "nftables treats packets of a forgotten flow this way (silent: "
                           "drops them, rst: answers with a TCP reset)",
    "forged_rst_after_s": "nftables turns a flow's next packet this long into the connection "
                          "into a RST to its receiver, and resets the sender's next one",
    "reconnect_block_s": "after a forged reset nftables refuses new connections to the same "
                         "server this long",
}

# Middlebox behaviours the kernel does better than the proxy where it can: a real firewall
# does not acknowledge what it drops (the proxy reads and discards), and a forged RST
# arrives as a packet.
_KERNEL_MIDDLEBOX = ("idle_timeout_s", "idle_timeout_action", "forged_rst_after_s",
                     "reconnect_block_s")


def _middlebox_item(profile: Profile, parameter: str, key: str, value: str,
                    caps: Capabilities) -> PlanItem:
    kernel = key in _KERNEL_MIDDLEBOX and not _missing(caps, "root", "netns", "nftables")
    if kernel and key.startswith("idle_timeout"):
        idle = profile.idle_timeout_s or 0
        if profile.idle_timeout_action == "fin":
            return PlanItem(parameter, value, PROXY, True, _PROXY_WHY[key]
                            + " (nftables cannot close a flow with a FIN)")
        if not float(idle).is_integer():
            return PlanItem(parameter, value, PROXY, True, _PROXY_WHY[key]
                            + " (conntrack timeouts are whole seconds)")
    if kernel:
        return PlanItem(parameter, value, KERNEL_NFTABLES, True, _KERNEL_WHY[key])
    return PlanItem(parameter, value, PROXY, True, _PROXY_WHY[key])


def _loss_item(profile: Profile, direction: str, caps: Capabilities) -> PlanItem:
    d: Direction = getattr(profile, direction)
    parameter = f"{direction}.loss_percent"
    value = f"{_fmt(d.loss_percent)} %" + (" in bursts" if d.loss_bursty else "")
    base = _missing(caps, "root", "netns")
    if not base and caps.netem and (d.loss_bursty or not caps.nftables):
        how = "in bursts (Gilbert-Elliott)" if d.loss_bursty else "at random"
        return PlanItem(parameter, value, KERNEL_NETEM, True, f"netem drops packets {how}")
    if not base and caps.nftables:
        if d.loss_bursty:
            return PlanItem(parameter, value, KERNEL_NFTABLES, True,
                            "bursty loss needs tc netem (not available): falls back to "
                            "uniform random loss at the same average rate")
        return PlanItem(parameter, value, KERNEL_NFTABLES, True,
                        "nftables drops packets at random")
    if not (caps.nftables or caps.netem):
        base.append("tc netem (or nftables for uniform loss)" if d.loss_bursty else "nftables")
    layer = KERNEL_NETEM if d.loss_bursty else KERNEL_NFTABLES
    return PlanItem(parameter, value, layer, False,
                    _needs(base) + "; a userspace proxy terminates TCP and cannot drop packets")


def _bandwidth_item(profile: Profile, direction: str, caps: Capabilities) -> PlanItem:
    parameter = f"{direction}.bandwidth_kbit"
    value = _value(profile, parameter)
    missing = _missing(caps, "root", "netns", "tbf")
    if not missing:
        return PlanItem(parameter, value, KERNEL_TBF, True,
                        "tbf shapes the link with a real queue")
    return PlanItem(parameter, value, PROXY, True,
                    f"the proxy paces bytes (kernel tbf {_needs(missing)}; no real queueing)")


def emulation_plan(profile: Profile, caps: Capabilities) -> list[PlanItem]:
    """Every non-default parameter of ``profile`` with the layer that emulates it here and
    whether it can; what cannot be emulated says what is missing. A clean profile: []."""
    parameters = _non_default_fields(profile)
    plan: list[PlanItem] = []
    for parameter in parameters:
        section, key = parameter.split(".")
        value = _value(profile, parameter)
        if key == "loss_bursty":
            direction: Direction = getattr(profile, section)
            if direction.loss_percent == 0:
                plan.append(PlanItem(parameter, value, PROXY, True,
                                     "nothing to do: loss_percent is 0"))
            continue  # otherwise part of the loss_percent item
        if key == "loss_percent":
            plan.append(_loss_item(profile, section, caps))
        elif key == "bandwidth_kbit":
            plan.append(_bandwidth_item(profile, section, caps))
        elif key in _PROXY_WHY:
            plan.append(_middlebox_item(profile, parameter, key, value, caps))
        else:
            needs = ("root", "netns") if key == "mtu" else ("root", "netns", "nftables")
            layer = KERNEL_LINK_MTU if key == "mtu" else KERNEL_NFTABLES
            missing = _missing(caps, *needs)
            why = _needs(missing) if missing else _KERNEL_WHY[key]
            plan.append(PlanItem(parameter, value, layer, not missing, why))
    if plan and profile.toxicity != 1.0:
        kernel = any(item.layer != PROXY for item in plan)
        why = "the proxy decides once per connection whether the profile applies" + (
            "; kernel parts apply to all traffic" if kernel else "")
        plan.insert(0, PlanItem("toxicity", f"{_fmt(profile.toxicity * 100)} % of connections",
                                PROXY, True, why))
    return plan


# -------------------------------------------------------------------------------- describing


def _describe_direction(d: Direction) -> str:
    if d.is_clean:
        return "nothing added"
    parts = []
    if d.latency_ms or d.jitter_ms:
        jitter = f" ±{_fmt(d.jitter_ms)}" if d.jitter_ms else ""
        parts.append(f"latency {_fmt(d.latency_ms)}{jitter} ms")
    parts.append("bandwidth " + ("unlimited" if d.bandwidth_kbit is None
                                 else f"{_fmt(d.bandwidth_kbit)} kbit/s"))
    if d.loss_percent:
        parts.append(f"loss {_fmt(d.loss_percent)} %" + (" in bursts" if d.loss_bursty else ""))
    return ", ".join(parts)


def describe(profile: Profile) -> list[str]:
    """Human lines for ``chatprobe profiles show NAME``."""
    lines = [profile.name + (f": {profile.description}" if profile.description else "")]
    if profile.is_clean:
        lines.append("  nothing emulated (the control)")
    else:
        lines.append(f"  up   (client -> server): {_describe_direction(profile.up)}")
        lines.append(f"  down (server -> client): {_describe_direction(profile.down)}")
        link = [f"MTU {profile.mtu}"]
        if profile.mss_clamp is not None:
            link.append(f"MSS clamped to {profile.mss_clamp}")
        if profile.pmtu_blackhole:
            link.append("PMTU blackhole (ICMP 'fragmentation needed' dropped)")
        if profile.allowed_ports is not None:
            link.append("only ports " + ", ".join(str(p) for p in profile.allowed_ports)
                        + " pass")
        lines.append("  link: " + ", ".join(link))
        box = []
        if profile.idle_timeout_s is not None:
            how = {"silent": "silently dropped", "fin": "closed (FIN)",
                   "rst": "reset (RST)"}[profile.idle_timeout_action]
            box.append(f"flows idle {_fmt(profile.idle_timeout_s)} s are {how}")
        if profile.upgrade != "pass":
            what = "stripped" if profile.upgrade == "strip" else "refused"
            share = ("" if profile.upgrade_toxicity == 1.0
                     else f" on {_fmt(profile.upgrade_toxicity * 100)} % of handshakes")
            box.append(f"WebSocket Upgrade {what}{share}")
        if profile.stall_every_s is not None:
            box.append(f"{_fmt(profile.stall_s)} s stall every {_fmt(profile.stall_every_s)} s")
        if profile.forged_rst_after_s is not None:
            box.append(f"forged RST to both ends {_fmt(profile.forged_rst_after_s)} s into "
                       "a connection")
        if profile.reconnect_block_s is not None:
            box.append(f"then reconnects blocked for {_fmt(profile.reconnect_block_s)} s")
        lines.append("  middlebox: " + ("; ".join(box) if box else "none"))
        if profile.toxicity != 1.0:
            lines.append(f"  applies to {_fmt(profile.toxicity * 100)} % of connections "
                         "(decided once per connection)")
    if profile.sources:
        lines.append("  sources:")
        lines.extend(f"    - {s}" for s in profile.sources)
    return lines

