"""Network profiles: the shipped YAML files, their validation, spec parsing and the emulation
plan (pure; no network, no root needed)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from chatprobe.errors import HarnessError
from chatprobe.profiles import (
    Capabilities,
    Direction,
    PlanItem,
    Profile,
    available_profiles,
    describe,
    emulation_plan,
    load_profile,
    load_profiles,
    parse_profile,
    profiles_dir,
)

SHIPPED = ("clean", "office-firewall", "corporate-proxy", "vpn-overseas", "mobile-3g",
           "lossy-wifi", "cross-border", "very-bad")
ALL_CAPS = Capabilities(root=True, netns=True, nftables=True, tbf=True, netem=True)
NO_ROOT = Capabilities(root=False, netns=False, nftables=True, tbf=True, netem=True)
NO_NETEM = Capabilities(root=True, netns=True, nftables=True, tbf=True, netem=False)


def by_parameter(plan: list[PlanItem]) -> dict[str, PlanItem]:
    items = {item.parameter: item for item in plan}
    assert len(items) == len(plan), "a parameter appears twice in the plan"
    return items


# ------------------------------------------------------------------------- shipped profiles


def test_every_design_profile_ships() -> None:
    assert set(SHIPPED) <= set(available_profiles())
    assert available_profiles() == sorted(available_profiles())


@pytest.mark.parametrize("name", available_profiles())
def test_every_shipped_profile_loads_and_describes_itself(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.description and profile.description.endswith(".")
    assert 0 <= profile.toxicity <= 1
    if name != "clean":
        assert profile.sources, f"{name} names no source for its numbers"
        assert not profile.is_clean
    lines = describe(profile)
    assert lines[0].startswith(f"{name}: ")
    assert all("\n" not in line for line in lines)
    for source in profile.sources:
        assert f"    - {source}" in lines


def test_vpn_overseas_matches_the_design_table() -> None:
    p = load_profile("vpn-overseas")
    # 200 ms (±10) RTT split evenly; 20/10 Mbit down/up; 0.5 % loss; WireGuard MTU 1420;
    # stall every 120 s (rekey), up to one 5 s handshake retry.
    assert p.up == Direction(latency_ms=100, jitter_ms=5, bandwidth_kbit=10_000,
                             loss_percent=0.5)
    assert p.down == Direction(latency_ms=100, jitter_ms=5, bandwidth_kbit=20_000,
                               loss_percent=0.5)
    assert (p.mtu, p.mss_clamp, p.pmtu_blackhole) == (1420, None, False)
    assert (p.stall_every_s, p.stall_s) == (120, 5)
    assert p.upgrade == "pass" and p.idle_timeout_s is None and p.forged_rst_after_s is None
    assert "wg-quick default MTU 1420" in p.sources


def test_mobile_3g_matches_the_design_table() -> None:
    p = load_profile("mobile-3g")
    expected = Direction(latency_ms=150, jitter_ms=25, bandwidth_kbit=700, loss_percent=1.5)
    assert p.up == expected
    assert p.down == expected
    assert p.mtu == 1500
    assert 1 <= p.stall_s <= 3  # the 1-3 s handover outage
    assert "Lighthouse mobileRegular3G (300 ms, 700 kbit)" in p.sources


def test_cross_border_matches_the_design_table() -> None:
    p = load_profile("cross-border")
    assert p.up == Direction(latency_ms=125, jitter_ms=15, bandwidth_kbit=5000, loss_percent=1)
    assert p.down == Direction(latency_ms=125, jitter_ms=15, bandwidth_kbit=1000,
                               loss_percent=8)
    assert p.forged_rst_after_s is not None
    assert p.reconnect_block_s == 90
    assert p.mtu == 1500
    assert any(s.startswith("Zhu et al., SIGMETRICS 2020") for s in p.sources)


def test_other_profiles_match_the_design_table() -> None:
    office = load_profile("office-firewall")
    assert office.up == office.down == Direction(20, 2.5, 10_000)
    assert office.allowed_ports == (443,)
    assert (office.idle_timeout_s, office.idle_timeout_action) == (60, "silent")
    proxy = load_profile("corporate-proxy")
    assert proxy.upgrade in ("strip", "refuse") and proxy.upgrade_toxicity == 1.0
    assert proxy.idle_timeout_s == 60
    wifi = load_profile("lossy-wifi")
    assert wifi.up == wifi.down == Direction(20, 10, 30_000, 2, loss_bursty=True)
    very_bad = load_profile("very-bad")
    assert very_bad.up == very_bad.down == Direction(500, 0, 1000, 10)
    assert load_profile("clean") == Profile(name="clean", description=load_profile(
        "clean").description)


def test_assumed_numbers_are_marked_in_the_files() -> None:
    text = (profiles_dir() / "vpn-overseas.yaml").read_text(encoding="utf-8")
    assumed = [line.split(":")[0].strip() for line in text.splitlines() if "# assumed" in line]
    assert assumed.count("latency_ms") == 2 and assumed.count("bandwidth_kbit") == 2
    assert assumed.count("loss_percent") == 2 and assumed.count("jitter_ms") == 2


def test_a_profile_by_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("name: my-office\nup: {latency_ms: 7}\nlink: {mss_clamp: 1360}\n",
                    encoding="utf-8")
    profile = load_profile(str(path))
    assert profile.name == "my-office"
    assert profile.up == Direction(latency_ms=7)
    assert profile.down == Direction()
    assert profile.mss_clamp == 1360


# ---------------------------------------------------------------------------- bad documents

GOOD = {"name": "x", "up": {"latency_ms": 10}, "down": {"latency_ms": 10}}


def with_(section: str | None, key: str, value: object) -> dict[str, object]:
    document: dict[str, object] = {k: dict(v) if isinstance(v, dict) else v
                                   for k, v in GOOD.items()}
    if section is None:
        document[key] = value
    else:
        part = document.setdefault(section, {})
        assert isinstance(part, dict)
        part[key] = value
    return document


@pytest.mark.parametrize(("document", "key"), [
    (with_(None, "colour", "red"), "colour"),
    (with_("up", "latancy_ms", 5), "up.latancy_ms"),
    (with_("middlebox", "idle_timeout", 60), "middlebox.idle_timeout"),
    (with_("up", "latency_ms", -1), "up.latency_ms"),
    (with_("down", "latency_ms", 60_001), "down.latency_ms"),
    (with_("down", "latency_ms", "100ms"), "down.latency_ms"),
    (with_("up", "loss_percent", 150), "up.loss_percent"),
    (with_("down", "bandwidth_kbit", 0), "down.bandwidth_kbit"),
    (with_("down", "loss_bursty", "yes"), "down.loss_bursty"),
    (with_("middlebox", "idle_timeout_action", "drop"), "middlebox.idle_timeout_action"),
    (with_("middlebox", "upgrade", "block"), "middlebox.upgrade"),
    (with_("link", "mtu", 100), "link.mtu"),
    (with_("link", "mtu", 1500.5), "link.mtu"),
    (with_("link", "allowed_ports", [443, 70000]), "link.allowed_ports"),
    (with_("link", "allowed_ports", []), "link.allowed_ports"),
    (with_("link", "mss_clamp", 1500), "link.mss_clamp"),
    (with_(None, "toxicity", 2), "toxicity"),
    (with_("middlebox", "upgrade_toxicity", -0.1), "middlebox.upgrade_toxicity"),
    (with_("middlebox", "stall_s", 3), "middlebox.stall_s"),
    (with_("middlebox", "reconnect_block_s", 90), "middlebox.reconnect_block_s"),
    (with_(None, "up", [1, 2]), "up"),
    (with_(None, "name", "two words"), "name"),
    (with_(None, "sources", "just one"), "sources"),
])
def test_mistakes_are_one_line_naming_file_and_key(tmp_path: Path, document: dict[str, object],
                                                    key: str) -> None:
    source = str(tmp_path / "x.yaml")
    with pytest.raises(HarnessError) as caught:
        parse_profile(document, source)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{source}: ")
    assert key in message


def test_a_bad_file_on_disk_names_itself(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nup:\n  latency_ms: -5\n", encoding="utf-8")
    with pytest.raises(HarnessError, match=r"broken\.yaml: up\.latency_ms must be a number "
                                           r"between 0 and 60000"):
        load_profile(str(path))


def test_the_good_document_is_valid() -> None:
    profile = parse_profile(GOOD, "good.yaml")
    assert profile.up.latency_ms == 10
    assert profile.toxicity == 1.0


def test_a_missing_name_or_non_mapping_is_rejected() -> None:
    with pytest.raises(HarnessError, match=r"x\.yaml: name"):
        parse_profile({"up": {"latency_ms": 1}}, "x.yaml")
    with pytest.raises(HarnessError, match=r"x\.yaml: a network profile must be a mapping"):
        parse_profile(["name", "x"], "x.yaml")


# ------------------------------------------------------------------------- names and specs


def test_repeated_and_comma_separated_specs() -> None:
    names = [p.name for p in load_profiles(["clean,vpn-overseas", "mobile-3g"])]
    assert names == ["clean", "vpn-overseas", "mobile-3g"]
    assert [p.name for p in load_profiles([" very-bad , lte "])] == ["very-bad", "lte"]
    assert load_profiles([]) == []


def test_duplicates_are_rejected_also_by_path() -> None:
    with pytest.raises(HarnessError, match="'clean' is given twice"):
        load_profiles(["clean,mobile-3g", "clean"])
    with pytest.raises(HarnessError, match="'clean' is given twice"):
        load_profiles(["clean", str(profiles_dir() / "clean.yaml")])


def test_an_empty_name_in_a_spec_is_rejected() -> None:
    with pytest.raises(HarnessError, match="empty network profile name"):
        load_profiles(["clean,,mobile-3g"])


def test_an_unknown_name_lists_the_available_ones() -> None:
    with pytest.raises(HarnessError) as caught:
        load_profile("moon-base")
    message = str(caught.value)
    assert "'moon-base'" in message
    for name in SHIPPED:
        assert name in message
    assert "\n" not in message


def test_a_file_whose_name_differs_from_its_file_name(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "alpha.yaml").write_text("name: beta\n", encoding="utf-8")
    monkeypatch.setattr("chatprobe.profiles.fixtures_dir", lambda: tmp_path)
    assert available_profiles() == ["alpha"]
    with pytest.raises(HarnessError, match="name 'beta' does not match the file name 'alpha'"):
        load_profile("alpha")


# --------------------------------------------------------------------------- emulation plan


def non_default_parameters(profile: Profile) -> set[str]:
    names = set()
    for direction in ("up", "down"):
        value = getattr(profile, direction)
        for field in dataclasses.fields(Direction):
            if getattr(value, field.name) != field.default:
                names.add(f"{direction}.{field.name}")
    link = {"mtu", "mss_clamp", "pmtu_blackhole", "allowed_ports"}
    for field in dataclasses.fields(Profile):
        if field.name in ("name", "description", "sources", "toxicity", "up", "down"):
            continue
        if getattr(profile, field.name) != field.default:
            section = "link" if field.name in link else "middlebox"
            names.add(f"{section}.{field.name}")
    # bursty loss is part of the loss item
    return {n for n in names if not n.endswith(".loss_bursty")}


@pytest.mark.parametrize("name", ["very-bad", "vpn-overseas", "cross-border", "office-firewall"])
def test_with_every_capability_everything_is_emulated(name: str) -> None:
    profile = load_profile(name)
    plan = emulation_plan(profile, ALL_CAPS)
    assert set(by_parameter(plan)) == non_default_parameters(profile)
    assert [item for item in plan if not item.emulated] == []
    assert all(item.why for item in plan)


def test_very_bad_plan_uses_the_kernel_where_it_can() -> None:
    plan = by_parameter(emulation_plan(load_profile("very-bad"), ALL_CAPS))
    assert set(plan) == {"up.latency_ms", "down.latency_ms", "up.bandwidth_kbit",
                         "down.bandwidth_kbit", "up.loss_percent", "down.loss_percent"}
    assert plan["up.latency_ms"].layer == "proxy"
    assert plan["up.latency_ms"].value == "500 ms"
    assert plan["down.bandwidth_kbit"].layer == "kernel: tbf"
    assert plan["down.bandwidth_kbit"].value == "1000 kbit/s"
    assert plan["down.loss_percent"].layer == "kernel: nftables"
    assert plan["down.loss_percent"].value == "10 %"


def test_vpn_plan_puts_mtu_on_the_link() -> None:
    plan = by_parameter(emulation_plan(load_profile("vpn-overseas"), ALL_CAPS))
    assert plan["link.mtu"] == PlanItem("link.mtu", "1420", "kernel: link mtu", True,
                                        plan["link.mtu"].why)
    assert plan["middlebox.stall_every_s"].layer == "proxy"
    assert plan["middlebox.stall_s"].value == "5 s"


def test_without_root_kernel_parts_are_reported_not_emulated() -> None:
    profile = Profile(name="t", up=Direction(latency_ms=100, loss_percent=1),
                      down=Direction(latency_ms=100, bandwidth_kbit=500),
                      mtu=1400, mss_clamp=1360, allowed_ports=(443,), pmtu_blackhole=True)
    plan = by_parameter(emulation_plan(profile, NO_ROOT))
    assert set(plan) == non_default_parameters(profile)
    for parameter in ("up.loss_percent", "link.mtu", "link.mss_clamp", "link.allowed_ports",
                      "link.pmtu_blackhole"):
        item = plan[parameter]
        assert not item.emulated, parameter
        assert item.why.startswith("needs root and network namespaces"), item.why
        assert item.layer.startswith("kernel: ")
    assert plan["up.latency_ms"].emulated and plan["up.latency_ms"].layer == "proxy"
    assert plan["down.latency_ms"].emulated and plan["down.latency_ms"].layer == "proxy"
    # bandwidth falls back to the proxy, and says why
    assert plan["down.bandwidth_kbit"].emulated
    assert plan["down.bandwidth_kbit"].layer == "proxy"
    assert "needs root and network namespaces" in plan["down.bandwidth_kbit"].why


def test_missing_pieces_are_named_exactly() -> None:
    profile = Profile(name="t", up=Direction(loss_percent=1), mss_clamp=1360, mtu=1400)
    caps = Capabilities(root=True, netns=True, nftables=False, tbf=False, netem=False)
    plan = by_parameter(emulation_plan(profile, caps))
    assert not plan["up.loss_percent"].emulated
    assert plan["up.loss_percent"].why.startswith("needs nftables")
    assert plan["link.mss_clamp"].why == "needs nftables"
    assert plan["link.mtu"].emulated
    nothing = Capabilities(root=False, netns=False, nftables=False, tbf=False, netem=False)
    plan = by_parameter(emulation_plan(profile, nothing))
    assert plan["link.mss_clamp"].why == "needs root, network namespaces and nftables"
    assert plan["link.mtu"].why == "needs root and network namespaces"


def test_bursty_loss_without_netem_falls_back_with_a_note() -> None:
    profile = load_profile("lossy-wifi")
    fallback = by_parameter(emulation_plan(profile, NO_NETEM))["up.loss_percent"]
    assert fallback.emulated
    assert fallback.layer == "kernel: nftables"
    assert "netem" in fallback.why and "uniform" in fallback.why
    assert fallback.value == "2 % in bursts"
    with_netem = by_parameter(emulation_plan(profile, ALL_CAPS))["up.loss_percent"]
    assert with_netem.emulated and with_netem.layer == "kernel: netem"
    assert "uniform" not in with_netem.why


def test_proxy_behaviours_are_always_emulated() -> None:
    profile = Profile(name="t", idle_timeout_s=60, idle_timeout_action="rst", upgrade="strip",
                      upgrade_toxicity=0.1, stall_every_s=120, stall_s=5,
                      forged_rst_after_s=30, reconnect_block_s=90, toxicity=0.5)
    nothing = Capabilities(root=False, netns=False, nftables=False, tbf=False, netem=False)
    plan = emulation_plan(profile, nothing)
    assert {item.parameter for item in plan} == non_default_parameters(profile) | {"toxicity"}
    assert all(item.emulated and item.layer == "proxy" for item in plan)
    values = {item.parameter: item.value for item in plan}
    assert values["middlebox.upgrade_toxicity"] == "10 % of handshakes"
    assert values["toxicity"] == "50 % of connections"
    assert values["middlebox.idle_timeout_action"] == "rst"


def test_the_clean_profile_plans_nothing() -> None:
    assert emulation_plan(load_profile("clean"), ALL_CAPS) == []
    assert emulation_plan(Profile(name="clean"), NO_ROOT) == []
    assert Profile(name="clean").is_clean
    assert not Profile(name="x", mtu=1400).is_clean
    assert describe(Profile(name="clean"))[1] == "  nothing emulated (the control)"
