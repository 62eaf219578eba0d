"""The XMPP adapter against real Prosody on loopback (issue 3): same probe, no core changes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from chatprobe.config import AgentCredential
from chatprobe.errors import TargetError
from chatprobe.probe import ProbeHooks, ProbeOptions, run_probe
from chatprobe.protocols.xmpp import parse_frame
from chatprobe.swarm.runner import SwarmOptions, run_swarm
from chatprobe.verdict import RunSummary, Status
from tests.conftest import ROOT, scaled
from tests.servers import EjabberdServer, ProsodyServer
from tests.test_cli import chatprobe

XmppServer = ProsodyServer | EjabberdServer


@pytest.fixture
def prosody(tmp_path: Path) -> Iterator[ProsodyServer]:
    server = ProsodyServer(tmp_path / "prosody").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["prosody", "ejabberd"])
def xmpp_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[XmppServer]:
    """Two independent servers of one protocol: the same probe must pass on both."""
    server: XmppServer = (ProsodyServer(tmp_path / "prosody") if request.param == "prosody"
                          else EjabberdServer())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def probe(server: XmppServer, messages: int, customers: int, rate: float = 1000.0,
          hooks: ProbeHooks | None = None, **changes: object) -> RunSummary:
    options = ProbeOptions(messages=messages, customers=customers, rate_per_s=rate)
    return asyncio.run(asyncio.wait_for(
        run_probe(server.url, server.target_config(**changes), options, hooks),
        timeout=scaled(120)))


def test_2000_stamped_messages_through_prosody_all_delivered(prosody: ProsodyServer,
                                                             tmp_path: Path) -> None:
    # The shipped target config, pointed at this test's server: what a user would run.
    config = yaml.safe_load((ROOT / "fixtures" / "targets" / "prosody.yaml").read_text())
    assert config["agents"] == [{"id": a.id, "token": a.token} for a in prosody.agents]
    config_path = tmp_path / "prosody.yaml"
    config_path.write_text(yaml.safe_dump(config))
    result = chatprobe("probe", "--target", prosody.url, "--config", str(config_path),
                       "--messages", "2000", "--customers", "20", "--rate", "1000",
                       "--json", str(tmp_path / "out.json"), "--quiet")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "p50" in result.stdout and "p99" in result.stdout
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["sent"] == doc["delivered"] == 2000, doc
    for key in ("late", "lost", "duplicate", "reordered", "misrouted", "forged"):
        assert doc[key] == 0, key
    assert doc["latency_ms"]["count"] == 2000 and doc["latency_ms"]["p99"] > 0


def test_killing_the_server_mid_run_reports_transport_loss_exit_2(
        xmpp_server: XmppServer) -> None:
    async def kill_server(sent: int) -> None:
        if sent == 100:
            await asyncio.to_thread(xmpp_server.kill)

    summary = probe(xmpp_server, 400, 10, rate=400.0, hooks=ProbeHooks(after_send=kill_server))
    counts = summary.counts
    assert counts.sent == counts.delivered + counts.late + counts.lost  # nothing silently missing
    assert counts.lost >= 300  # everything sent after the kill
    lost_causes = {d.cause.value for outcome, d in summary.diagnoses if outcome == "lost"}
    assert lost_causes <= {"transport.unreachable", "transport.disconnected"}, lost_causes
    assert summary.status() is Status.CRITICAL  # exit 2


def test_same_probe_passes_on_both_servers(xmpp_server: XmppServer) -> None:
    summary = probe(xmpp_server, 1000, 20)
    assert summary.counts.delivered == 1000, summary.to_json()
    assert summary.status() is Status.OK


def test_wrong_password_is_an_auth_diagnosis(xmpp_server: XmppServer) -> None:
    summary = probe(xmpp_server, 10, 1, agents=(AgentCredential("agent1", "wrong"),))
    assert summary.fatal is not None and summary.fatal.cause.value == "auth.rejected"
    assert "not-authorized" in summary.fatal.detail


def test_garbage_is_a_protocol_error() -> None:
    with pytest.raises(TargetError) as caught:
        parse_frame("<message><body>unclosed")
    assert caught.value.cause.value == "protocol.invalid_frames"


def test_two_worker_swarm_against_prosody_reconciles(prosody: ProsodyServer,
                                                      tmp_path: Path) -> None:
    config = prosody.target_config()
    config_path = tmp_path / "prosody.yaml"
    config_path.write_text(yaml.safe_dump({
        "protocol": config.protocol, "shop": config.shop,
        "agents": [{"id": a.id, "token": a.token} for a in config.agents],
        "sla_ms": 2000, "deadline_ms": 3000, "extra": config.extra}))
    shape = tmp_path / "shape.yaml"
    shape.write_text("stages:\n  - {duration: 6, users: 10, spawn_rate: 10}\n")
    # No mobile drops here: XMPP without stream resumption bounces an answer that reaches a
    # dropped session, which is a real loss, but not what this test is about.
    doc = run_swarm(SwarmOptions(target=prosody.url, shape=str(shape), workers=2,
                                 think_scale=0.1, config=config_path,
                                 extra_locust_args=("--cp-reconnect-share", "0")),
                    timeout_s=scaled(240))
    assert doc["sent"] > 100
    assert doc["sent"] == doc["delivered"] + doc["late"] + doc["lost"]
    assert doc["delivered"] == doc["sent"], doc["connection_events"]
    assert set(doc["generator"]) == {"w0", "w1"}


def test_network_profiles_apply_to_xmpp_targets_too(prosody: ProsodyServer,
                                                    tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "fixtures" / "targets" / "prosody.yaml").read_text())
    config_path = tmp_path / "prosody.yaml"
    config_path.write_text(yaml.safe_dump(config))
    uplink = tmp_path / "uplink-80.yaml"
    uplink.write_text("name: uplink-80\nup: {latency_ms: 80}\n")
    result = chatprobe("probe", "--target", prosody.url, "--config", str(config_path),
                       "--messages", "200", "--customers", "5", "--profile", str(uplink),
                       "--json", str(tmp_path / "out.json"), "--quiet")
    assert result.returncode == 0, (result.stdout, result.stderr)
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["sent"] == doc["delivered"] == 200 and doc["profile"] == "uplink-80"
    assert doc["latency_ms"]["p50"] >= 80
    assert doc["proxy"]["customers"]["connections"] >= 5
