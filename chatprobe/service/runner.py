"""Starting and stopping the reference service: `chatprobe serve` and in-process embedding."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from chatprobe.config import read_document
from chatprobe.errors import HarnessError
from chatprobe.paths import fixtures_dir, state_dir
from chatprobe.service.app import ChatService, build_app
from chatprobe.service.model import ModelError, Shop, shops_from_document
from chatprobe.service.store import Store


class _ClientGone(logging.Filter):
    """aiohttp logs a traceback when a client vanished while its answer was being written
    (a customer's network dropped): ordinary for a chat service under load, so one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ConnectionError):
            record.msg, record.args, record.exc_info = (
                f"client went away mid-request ({type(exc).__name__})", (), None)
        return True


logging.getLogger("aiohttp.server").addFilter(_ClientGone())


class ServiceConfigError(ValueError):
    """The service cannot start with the given options (one line for the user)."""


def default_config_path() -> Path:
    return fixtures_dir() / "shops" / "demo.yaml"


def default_db_path() -> Path:
    return state_dir() / "reference-service.sqlite3"


def load_shops(path: Path) -> dict[str, Shop]:
    try:
        document = read_document(path)
    except HarnessError as exc:
        raise ServiceConfigError(str(exc)) from None
    try:
        return shops_from_document(document)
    except ModelError as exc:
        raise ServiceConfigError(f"config {path}: {exc}") from None


@dataclass
class RunningService:
    runner: web.AppRunner
    service: ChatService
    base_url: str
    admin_token: str

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_service(host: str = "127.0.0.1", port: int = 8765,
                        config: Path | None = None, db: Path | str | None = None,
                        admin_token: str | None = None,
                        tls: tuple[Path, Path] | None = None) -> RunningService:
    """Start the service on the running loop; port 0 picks a free port. ``tls``: the
    certificate chain and key files to serve https:// and wss:// with."""
    context = None
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(str(tls[0]), str(tls[1]))
        except (OSError, ssl.SSLError) as exc:
            raise ServiceConfigError(f"cannot use the TLS certificate {tls[0]} and key "
                                     f"{tls[1]}: {exc}") from None
    shops = load_shops(config or default_config_path())
    db_path = str(db) if db is not None else str(default_db_path())
    if db_path != ":memory:":
        try:
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServiceConfigError(f"cannot create the folder for --db {db_path}: "
                                     f"{exc.strerror}") from None
    try:
        store = Store(db_path)
    except Exception as exc:  # sqlite3 raises several kinds for a bad path or file
        raise ServiceConfigError(f"cannot open database {db_path}: {exc}") from None
    token = admin_token or secrets.token_urlsafe(18)
    service = ChatService(shops, store, token)
    runner = web.AppRunner(build_app(service), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=context)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ServiceConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound_port = sockets[0].getsockname()[1] if sockets else port
    shown_host = f"[{host}]" if ":" in host else host
    scheme = "https" if context is not None else "http"
    return RunningService(runner, service, f"{scheme}://{shown_host}:{bound_port}", token)


def serve(host: str, port: int, config: Path | None, db: str | None,
          admin_token: str | None, tls: tuple[Path, Path] | None = None) -> int:
    """Run until SIGINT/SIGTERM. Prints the base URL (and a generated admin token)."""

    async def main() -> None:
        running = await start_service(host, port, config, db, admin_token, tls)
        print(f"chatprobe reference service listening on {running.base_url}", flush=True)
        print(f"  websocket: {running.base_url.replace('http', 'ws', 1)}/ws", flush=True)
        if admin_token is None:
            print(f"  admin token (generated): {running.admin_token}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await running.stop()

    try:
        asyncio.run(main())
    except ServiceConfigError as exc:
        print(f"chatprobe serve: {exc}", file=sys.stderr)
        return 3
    return 0
