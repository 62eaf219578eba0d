"""Long-polling transport of the reference service, for clients whose WebSocket upgrade a
proxy strips or refuses (docs/protocol.md, section 1.1). The frames are the WebSocket ones;
only their carrier changes, so a session behaves the same over either.

    POST /lp            -> {"channel": ID}                 open a channel
    POST /lp/ID         body: JSON list of frame texts     client -> server, in order
    GET  /lp/ID?wait=S  -> JSON list of frame texts        server -> client, waits up to S s
    DELETE /lp/ID                                          close
A channel nobody polls for ``IDLE_CLOSE_S`` is closed, like a dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from chatprobe.service.app import ChatService

IDLE_CLOSE_S = 30.0
CLOSED_GRACE_S = 10.0  # a closed channel's last frames wait this long to be fetched
MAX_WAIT_S = 30.0
MAX_BATCH = 500  # frames per request, either way
CHANNELS_KEY = web.AppKey("longpoll_channels", dict)


class LongPollChannel:
    """The service's side of one long-polling client: the Channel a Session writes to."""

    def __init__(self) -> None:
        self.id = secrets.token_urlsafe(16)
        self.inbound: asyncio.Queue[str | None] = asyncio.Queue()
        self.outbound: list[str] = []
        self._ready = asyncio.Event()
        self._closed = False
        self.last_poll = asyncio.get_running_loop().time()

    @property
    def closed(self) -> bool:
        return self._closed

    async def send_str(self, data: str) -> None:
        if self._closed:
            raise ConnectionError("long-poll channel closed")
        self.outbound.append(data)
        self._ready.set()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.inbound.put_nowait(None)
            self._ready.set()

    async def messages(self) -> AsyncIterator[str]:
        while (text := await self.inbound.get()) is not None:
            yield text

    async def take(self, wait_s: float) -> list[str]:
        """Frames for the client: what is queued, or the first to come within ``wait_s``."""
        self.last_poll = asyncio.get_running_loop().time()
        if not self.outbound and not self._closed:
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._ready.wait()
        self.last_poll = asyncio.get_running_loop().time()
        taken, self.outbound = self.outbound[:MAX_BATCH], self.outbound[MAX_BATCH:]
        return taken


def _channel(request: web.Request) -> LongPollChannel:
    channel: LongPollChannel | None = request.app[CHANNELS_KEY].get(request.match_info["id"])
    if channel is None:
        raise web.HTTPGone(text="no such long-poll channel (closed or expired)")
    return channel


def routes(service: ChatService, serve_channel: object) -> list[web.RouteDef]:
    """The long-poll endpoints; ``serve_channel`` is app.serve_channel (no import cycle)."""
    async def open_channel(request: web.Request) -> web.Response:
        channels: dict[str, LongPollChannel] = request.app[CHANNELS_KEY]
        channel = LongPollChannel()
        channels[channel.id] = channel

        async def run() -> None:
            try:
                await serve_channel(service, channel, channel.messages())  # type: ignore[operator]
            finally:
                # The last frames (a login refusal, "session ended") are still to be fetched:
                # the channel answers 410 only once they are, or after a grace period.
                if channel.outbound:
                    asyncio.get_running_loop().call_later(
                        CLOSED_GRACE_S, lambda: channels.pop(channel.id, None))
                else:
                    channels.pop(channel.id, None)

        task = asyncio.get_running_loop().create_task(run())
        service.background.add(task)
        task.add_done_callback(service.background.discard)
        return web.json_response({"channel": channel.id})

    async def post_frames(request: web.Request) -> web.Response:
        channel = _channel(request)
        try:
            frames = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise web.HTTPBadRequest(text="body must be a JSON list of frame texts") from None
        if not isinstance(frames, list) or len(frames) > MAX_BATCH or not all(
                isinstance(f, str) for f in frames):
            raise web.HTTPBadRequest(text=f"body must be a JSON list of at most {MAX_BATCH} "
                                          "frame texts")
        for text in frames:
            channel.inbound.put_nowait(text)
        return web.json_response({"accepted": len(frames)})

    async def poll(request: web.Request) -> web.Response:
        channel = _channel(request)
        try:
            wait_s = min(MAX_WAIT_S, max(0.0, float(request.query.get("wait", "20"))))
        except ValueError:
            raise web.HTTPBadRequest(text="wait must be a number of seconds") from None
        frames = await channel.take(wait_s)
        if not frames and channel.closed:
            request.app[CHANNELS_KEY].pop(channel.id, None)
            raise web.HTTPGone(text="long-poll channel closed")
        return web.Response(body=orjson.dumps(frames), content_type="application/json")

    async def close_channel(request: web.Request) -> web.Response:
        await _channel(request).close()
        return web.json_response({"closed": True})

    return [web.post("/lp", open_channel), web.post("/lp/{id}", post_frames),
            web.get("/lp/{id}", poll), web.delete("/lp/{id}", close_channel)]


async def expire_idle(app: web.Application) -> None:
    """Close channels nobody polls any more (the client went away without saying so)."""
    channels: dict[str, LongPollChannel] = app[CHANNELS_KEY]
    now = asyncio.get_running_loop().time()
    for channel in list(channels.values()):
        if now - channel.last_poll > IDLE_CLOSE_S:
            await channel.close()
