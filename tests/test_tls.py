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
