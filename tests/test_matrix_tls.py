"""The Matrix adapter over https: the target config's CA bundle is used, verification is
on, and each certificate failure gets its own TLS diagnosis (issue 8 item 1).

A Synapse with TLS is heavy to set up here, so the homeserver is a small aiohttp https
server on loopback that answers the login as a homeserver answers wrong credentials; the
TLS part, which is what is tested, is real."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from pathlib import Path

import pytest
from aiohttp import web

from chatprobe.config import AgentCredential, load_target
from chatprobe.diagnosis import Cause
from chatprobe.errors import TargetError
from chatprobe.protocols.matrix import MatrixAdapter
from tests.conftest import ROOT, scaled
from tests.test_tls import certificates  # noqa: F401 - the module's test certificates


async def login_refused(request: web.Request) -> web.Response:
    return web.json_response({"errcode": "M_FORBIDDEN", "error": "Invalid password"},
                             status=403)


async def login_through_tls(certificate: Path, key: Path, ca_bundle: Path | None,
                            server_name: str | None = None) -> Cause:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, key)
    app = web.Application()
    app.router.add_post("/_matrix/client/v3/login", login_refused)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    config = dataclasses.replace(load_target(ROOT / "fixtures" / "targets" / "synapse.yaml"),
                                 ca_bundle=str(ca_bundle) if ca_bundle else None,
                                 tls_server_name=server_name,
                                 connect_timeout_s=scaled(10))
    adapter = MatrixAdapter(f"https://127.0.0.1:{port}", config)
    try:
        await adapter.login_agent(AgentCredential("agent1", "wrong"),
                                  lambda text, server_id: None, lambda kind, detail: None)
    except TargetError as exc:
        return exc.cause
    finally:
        await adapter.close()
        await runner.cleanup()
    raise AssertionError("a login with a wrong password succeeded")


@pytest.mark.parametrize("certificate, with_ca, cause", [
    ("good", True, Cause.AUTH_REJECTED),  # through verified TLS to the homeserver's answer
    ("good", False, Cause.TLS_UNKNOWN_CA),  # a private CA the system does not know
    ("unknown-ca", True, Cause.TLS_UNKNOWN_CA),
    ("expired", True, Cause.TLS_EXPIRED),
    ("wrong-host", True, Cause.TLS_HOST_NAME),
])
def test_the_matrix_adapter_verifies_the_homeservers_certificate(
        certificates: dict[str, Path], certificate: str,  # noqa: F811
        with_ca: bool, cause: Cause) -> None:
    found = asyncio.run(login_through_tls(certificates[f"{certificate}.pem"],
                                          certificates[f"{certificate}.key"],
                                          certificates["ca"] if with_ca else None))
    assert found is cause


def test_the_matrix_adapter_verifies_the_name_the_config_gives(
        certificates: dict[str, Path]) -> None:  # noqa: F811
    # The URL names the homeserver by address; its certificate names chat.other.example.
    pair = certificates["wrong-host.pem"], certificates["wrong-host.key"]
    assert asyncio.run(login_through_tls(*pair, certificates["ca"],
                                         "chat.other.example")) is Cause.AUTH_REJECTED
    assert asyncio.run(login_through_tls(*pair, certificates["ca"],
                                         "chat.example")) is Cause.TLS_HOST_NAME
