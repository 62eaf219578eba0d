"""TLS (issue 8 item 1): the reference service over https/wss with certificates the test
makes (never committed), the probe verifying them against a CA bundle, and the three
certificate failures an operator fixes differently, each with its own diagnosis."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import ROOT, ServiceProcess, scaled

NOW = dt.datetime.now(dt.UTC)


@dataclass
class Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca(common: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(common)).issuer_name(_name(common))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    return Authority(key, cert)


def make_server(folder: Path, name: str, ca: Authority, *, host: str = "127.0.0.1",
                expired: bool = False, days_left: int = 30) -> tuple[Path, Path]:
    """A server certificate for ``host`` signed by ``ca``; its chain and key as files."""
    key = ec.generate_private_key(ec.SECP256R1())
    alt: x509.GeneralName = (x509.IPAddress(ipaddress.ip_address(host)) if host[0].isdigit()
                             else x509.DNSName(host))
    before, after = ((NOW - dt.timedelta(days=30), NOW - dt.timedelta(days=1)) if expired
                     else (NOW - dt.timedelta(days=1), NOW + dt.timedelta(days=days_left)))
    cert = (x509.CertificateBuilder().subject_name(_name(host)).issuer_name(ca.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(before).not_valid_after(after)
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    chain, key_file = folder / f"{name}.pem", folder / f"{name}.key"
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return chain, key_file


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    folder = tmp_path_factory.mktemp("tls")
    ours, theirs = make_ca("chatprobe test CA"), make_ca("somebody else's CA")
    files: dict[str, Path] = {}
    (folder / "ca.pem").write_bytes(ours.cert.public_bytes(serialization.Encoding.PEM))
    files["ca"] = folder / "ca.pem"
    for name, authority, kwargs in (("good", ours, {}), ("expired", ours, {"expired": True}),
                                    ("wrong-host", ours, {"host": "chat.other.example"}),
                                    ("unknown-ca", theirs, {}),
                                    ("localhost", ours, {"host": "localhost"}),
                                    ("expiring", ours, {"days_left": 5})):
        files[f"{name}.pem"], files[f"{name}.key"] = make_server(folder, name, authority,
                                                                 **kwargs)
    yield files


def target_config(folder: Path, ca: Path) -> Path:
    path = folder / "target.yaml"
    text = (ROOT / "fixtures" / "targets" / "reference.yaml").read_text(encoding="utf-8")
    path.write_text(text + f"ca_bundle: {ca}\n", encoding="utf-8")
    return path


def probe(base_url: str, config: Path, json_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatprobe.cli", "probe", "--target",
                           base_url, "--config", str(config), "--messages", "20",
                           "--customers", "2", "--json", str(json_path), "--quiet"],
                          capture_output=True, text=True, cwd=ROOT, timeout=scaled(60),
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("certificate, cause", [
    ("good", None),
    ("unknown-ca", "tls.unknown_ca"),
    ("expired", "tls.certificate_expired"),
    ("wrong-host", "tls.wrong_host_name"),
])
def test_the_probe_verifies_the_targets_certificate_and_names_each_failure(
        certificates: dict[str, Path], tmp_path: Path, certificate: str,
        cause: str | None) -> None:
    service = ServiceProcess(tmp_path / "service.sqlite3", extra_args=(
        "--tls-cert", str(certificates[f"{certificate}.pem"]),
        "--tls-key", str(certificates[f"{certificate}.key"]))).start()
    try:
        assert service.base_url.startswith("https://127.0.0.1:")
        result = probe(service.base_url, target_config(tmp_path, certificates["ca"]),
                       tmp_path / "run.json")
    finally:
        service.stop()
    doc = json.loads((tmp_path / "run.json").read_text())
    if cause is None:
        assert result.returncode == 0, result.stdout + result.stderr
        assert doc["sent"] == doc["delivered"] == 20
        return
    assert result.returncode == 2, result.stdout + result.stderr
    assert doc["diagnoses"][0]["cause"] == cause, doc["diagnoses"]
    assert cause in result.stdout and "Traceback" not in result.stderr


def test_without_the_ca_bundle_a_private_ca_is_unknown(certificates: dict[str, Path],
                                                       tmp_path: Path) -> None:
    service = ServiceProcess(tmp_path / "service.sqlite3", extra_args=(
        "--tls-cert", str(certificates["good.pem"]),
        "--tls-key", str(certificates["good.key"]))).start()
    try:
        result = probe(service.base_url, ROOT / "fixtures" / "targets" / "reference.yaml",
                       tmp_path / "run.json")
    finally:
        service.stop()
    assert result.returncode == 2
    doc = json.loads((tmp_path / "run.json").read_text())
    assert doc["diagnoses"][0]["cause"] == "tls.unknown_ca"


@pytest.mark.parametrize("certificate, status, code", [
    ("good", "OK", 0), ("expiring", "WARNING", 1), ("expired", "CRITICAL", 2)])
def test_the_canary_warns_before_the_certificate_expires(
        certificates: dict[str, Path], tmp_path: Path, certificate: str, status: str,
        code: int) -> None:
    from tests.test_canary import canary, checks_of, write_config

    service = ServiceProcess(tmp_path / "service.sqlite3", extra_args=(
        "--tls-cert", str(certificates[f"{certificate}.pem"]),
        "--tls-key", str(certificates[f"{certificate}.key"]))).start()
    try:
        config = write_config(tmp_path, service.base_url, idle_s=0, tls_warn_days=14)
        document = yaml.safe_load(config.read_text())
        document["targets"][0]["config"] = str(target_config(tmp_path, certificates["ca"]))
        config.write_text(yaml.safe_dump(document), encoding="utf-8")
        result = canary(config, "--json", str(tmp_path / "run.json"))
    finally:
        service.stop()
    assert result.returncode == code, result.stdout + result.stderr
    found = checks_of(tmp_path / "run.json")["shop/*/*/certificate"]
    assert found["status"] == status, found
    if certificate == "expiring":
        assert "days left" in found["detail"] and "14-day warning" in found["detail"]
        assert "certificate WARNING" in result.stdout
    if certificate == "expired":
        assert found["cause"] == "tls.certificate_expired"


# -- network profiles over TLS ---------------------------------------------------------------
# The certificate names "localhost" and the target URL too, while a profile's URL names the
# proxy by address (127.0.0.1): the client must still verify (and send SNI for) "localhost".


def tls_service(tmp_path: Path, certificates: dict[str, Path],
                certificate: str = "localhost") -> ServiceProcess:
    return ServiceProcess(tmp_path / "service.sqlite3", extra_args=(
        "--tls-cert", str(certificates[f"{certificate}.pem"]),
        "--tls-key", str(certificates[f"{certificate}.key"]))).start()


def by_name(service: ServiceProcess) -> str:
    return service.base_url.replace("//127.0.0.1:", "//localhost:")


def profile_file(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\n{body}", encoding="utf-8")
    return path


def probe_behind(tmp_path: Path, certificates: dict[str, Path], profiles: str,
                 certificate: str = "localhost"
                 ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """A probe of a TLS service (its certificate ``certificate``), addressed by name, behind
    ``profiles``; its result and its JSON document."""
    json_path = tmp_path / "run.json"
    service = tls_service(tmp_path, certificates, certificate)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "chatprobe.cli", "probe", "--target", by_name(service),
             "--config", str(target_config(tmp_path, certificates["ca"])), "--messages", "20",
             "--customers", "2", "--profile", profiles, "--json", str(json_path)],
            capture_output=True, text=True, cwd=ROOT, timeout=scaled(90),
            stdin=subprocess.DEVNULL)
    finally:
        service.stop()
    return result, json.loads(json_path.read_text())


@pytest.mark.alone
def test_a_probe_over_tls_behind_a_latency_profile_verifies_and_shows_the_latency(
        certificates: dict[str, Path], tmp_path: Path) -> None:
    slow = profile_file(tmp_path, "uplink-200", "up: {latency_ms: 200}\n")
    result, doc = probe_behind(tmp_path, certificates, f"clean,{slow}")
    assert result.returncode == 0, result.stdout + result.stderr
    clean, behind = doc["profiles"]
    for run in (clean, behind):
        assert run["sent"] == run["delivered"] == 20, run["diagnoses"]
    assert behind["proxy"]["customers"]["faulted"] == behind["proxy"]["customers"][
        "connections"] >= 2
    # Every message crossed the 200 ms uplink: no less, and not much more than the clean run.
    assert behind["latency_ms"]["p50"] >= 195, behind["latency_ms"]
    assert behind["latency_ms"]["p50"] <= clean["latency_ms"]["p50"] + 200 + scaled(150), (
        clean["latency_ms"], behind["latency_ms"])


def test_a_certificate_for_another_name_is_still_refused_behind_a_profile(
        certificates: dict[str, Path], tmp_path: Path) -> None:
    slow = profile_file(tmp_path, "uplink-20", "up: {latency_ms: 20}\n")
    result, doc = probe_behind(tmp_path, certificates, str(slow), "wrong-host")
    assert result.returncode == 2, result.stdout + result.stderr
    assert doc["diagnoses"][0]["cause"] == "tls.wrong_host_name", doc["diagnoses"]
    assert "verified as localhost" in doc["diagnoses"][0]["explanation"]


def test_upgrade_faults_over_tls_are_listed_as_skipped_with_the_reason(
        certificates: dict[str, Path], tmp_path: Path) -> None:
    from chatprobe.netem.plan import TLS_SKIP

    refusing = profile_file(tmp_path, "refusing-proxy",
                            "up: {latency_ms: 20}\nmiddlebox: {upgrade: refuse}\n")
    result, doc = probe_behind(tmp_path, certificates, str(refusing))
    assert result.returncode == 0, result.stdout + result.stderr
    assert doc["sent"] == doc["delivered"] == 20
    emulation = {item["parameter"]: item for item in doc["emulation"]}
    assert not emulation["middlebox.upgrade"]["emulated"]
    assert emulation["middlebox.upgrade"]["why"] == TLS_SKIP
    assert emulation["up.latency_ms"]["emulated"]
    # The proxy did not touch a handshake it cannot read; the customers stayed on WebSocket.
    assert doc["proxy"]["customers"]["upgrades_refused"] == 0
    assert "customer fallback" not in doc["events"]
    assert f"middlebox.upgrade = refuse: NOT emulated (proxy; {TLS_SKIP})" in result.stdout


def test_long_polling_through_a_profile_over_tls_verifies_the_targets_name(
        certificates: dict[str, Path], tmp_path: Path) -> None:
    import asyncio
    import ssl

    import aiohttp

    from chatprobe.netem.session import behind
    from chatprobe.profiles import Direction, Profile
    from chatprobe.protocols.longpoll import open_long_poll

    context = ssl.create_default_context(cafile=str(certificates["ca"]))
    hello = json.dumps({"type": "hello", "role": "customer", "shop": "demo",
                        "customer": "lp-tls", "client_version": "5.0.0"})

    async def main(target: str) -> None:
        profile = Profile(name="uplink-20", up=Direction(latency_ms=20))
        async with behind(target, profile) as (url, proxy):
            assert url.startswith("https://127.0.0.1:")
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await open_long_poll(f"{url}/lp", scaled(5), context)
            socket = await open_long_poll(f"{url}/lp", scaled(5), context, "localhost")
            try:
                socket.send_now(hello)
                welcome = json.loads(await socket.recv())
                assert welcome["type"] == "welcome"
            finally:
                await socket.close()
            assert proxy is not None and proxy.stats.connections >= 2

    service = tls_service(tmp_path, certificates)
    try:
        asyncio.run(asyncio.wait_for(main(by_name(service)), timeout=scaled(30)))
    finally:
        service.stop()


def test_a_swarm_over_tls_behind_a_profile_verifies_the_targets_name(
        certificates: dict[str, Path], tmp_path: Path) -> None:
    slow = profile_file(tmp_path, "uplink-50", "up: {latency_ms: 50}\n")
    shape = tmp_path / "shape.yaml"
    shape.write_text("name: tiny\nstages:\n  - {duration: 3, users: 3, spawn_rate: 3}\n",
                     encoding="utf-8")
    service = tls_service(tmp_path, certificates)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "chatprobe.cli", "swarm", "--target", by_name(service),
             "--config", str(target_config(tmp_path, certificates["ca"])), "--shape",
             str(shape), "--think-scale", "0.1", "--profile", str(slow), "--json",
             str(tmp_path / "run.json")],
            capture_output=True, text=True, cwd=ROOT, timeout=scaled(120),
            stdin=subprocess.DEVNULL)
    finally:
        service.stop()
    doc = json.loads((tmp_path / "run.json").read_text())
    assert result.returncode in (0, 1), result.stdout + result.stderr
    assert doc["sent"] > 0 and doc["lost"] == 0 and doc["delivered"] == doc["sent"], doc
    assert doc["proxy"]["customers"]["connections"] >= 1
    assert not [d for d in doc.get("diagnoses", []) if str(d.get("cause")).startswith("tls.")]


def test_a_canary_over_tls_behind_a_profile_verifies_the_targets_name(
        certificates: dict[str, Path], tmp_path: Path) -> None:
    from tests.test_canary import canary, checks_of, write_config

    slow = profile_file(tmp_path, "uplink-20", "up: {latency_ms: 20}\n")
    service = tls_service(tmp_path, certificates)
    try:
        config = write_config(tmp_path, by_name(service), idle_s=0)
        document = yaml.safe_load(config.read_text())
        document["targets"][0]["config"] = str(target_config(tmp_path, certificates["ca"]))
        document["targets"][0]["profile"] = str(slow)
        config.write_text(yaml.safe_dump(document), encoding="utf-8")
        result = canary(config, "--json", str(tmp_path / "run.json"),
                        admin_token=service.admin_token)
    finally:
        service.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    checks = checks_of(tmp_path / "run.json")
    assert {check["status"] for check in checks.values()} == {"OK"}, checks
    assert {check["profile"] for check in checks.values() if check["kind"] == "receive"} == {
        "uplink-20"}


def test_the_tls_name_comes_from_the_config_or_a_parent_chatprobe(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from chatprobe.config import (
        TLS_SERVER_NAME_ENV,
        load_target,
        parse_target,
        with_inherited_tls_name,
    )
    from chatprobe.errors import HarnessError
    from chatprobe.netem.session import via_proxy

    agents = [{"id": "a", "token": "t"}]
    source = str(tmp_path / "target.yaml")
    named = parse_target({"agents": agents, "tls_server_name": "chat.example"}, source)
    assert named.tls_server_name == "chat.example"
    with pytest.raises(HarnessError, match="'tls_server_name' must be a host name"):
        parse_target({"agents": agents, "tls_server_name": "https://chat.example/"}, source)
    # Through a profile's proxy: the target's own host, unless the config names one itself.
    plain = parse_target({"agents": agents}, source)
    assert via_proxy(plain, "wss://chat.example:8443/ws").tls_server_name == "chat.example"
    assert via_proxy(plain, "ws://chat.example/ws").tls_server_name is None
    assert via_proxy(named, "https://10.0.0.7").tls_server_name == "chat.example"
    # `chatprobe swarm` hands the name to its Locust processes in the environment.
    path = tmp_path / "target.yaml"
    path.write_text(yaml.safe_dump({"agents": agents}), encoding="utf-8")
    monkeypatch.setenv(TLS_SERVER_NAME_ENV, "shop.example")
    assert load_target(path).tls_server_name is None  # a probe or canary ignores it
    assert with_inherited_tls_name(load_target(path)).tls_server_name == "shop.example"
    path.write_text(yaml.safe_dump({"agents": agents, "tls_server_name": "chat.example"}),
                    encoding="utf-8")
    assert with_inherited_tls_name(load_target(path)).tls_server_name == "chat.example"
