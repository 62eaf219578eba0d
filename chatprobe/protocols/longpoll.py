"""The client side of the reference service's long-polling transport (docs/protocol.md,
section 1.1): the same face as :class:`chatprobe.protocols.websocket.WebSocket`, so a
``ReconnectingLink`` falls back to it when a proxy strips or refuses the WebSocket upgrade.

One task posts what the client sends (in order, batched while a post is in flight); one
task long-polls for what the server sends. Any HTTP failure ends the channel, as a dropped
socket ends a WebSocket, and the link reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import aiohttp
import orjson
from websockets.exceptions import ConnectionClosedError

from chatprobe.protocols.websocket import Inbox

Message = str | bytes
POLL_WAIT_S = 20.0
MAX_BATCH = 500  # frames per POST: the service's limit


class LongPollSocket(Inbox):
    def __init__(self, http: aiohttp.ClientSession, channel_url: str,
                 request_timeout_s: float, server_hostname: str | None = None) -> None:
        super().__init__()
        self.http = http
        self.channel_url = channel_url
        self.request_timeout_s = request_timeout_s
        self.server_hostname = server_hostname
        loop = asyncio.get_running_loop()
        self.closed = loop.create_future()
        self._outgoing: list[str] = []
        self._has_outgoing = asyncio.Event()
        self._delivered = asyncio.Event()  # set while everything written has been posted
        self._delivered.set()
        self._background: asyncio.Task[None] | None = None
        self._tasks = [loop.create_task(self._poll_forever()),
                       loop.create_task(self._post_forever())]

    # -- the WebSocket face ------------------------------------------------------------

    def send_now(self, message: str) -> None:
        if self.closed.done():
            raise ConnectionClosedError(None, None)
        self._outgoing.append(message)
        self._delivered.clear()
        self._has_outgoing.set()

    async def send(self, message: str) -> None:
        self.send_now(message)

    def abort(self) -> None:
        """Stop at once; the server still hears of it (a WebSocket peer sees the reset)."""
        notify = not self.closed.done()
        self._end()

        async def hang_up() -> None:
            if notify:
                await self._delete()
            await self.http.close()

        self._background = asyncio.get_running_loop().create_task(hang_up())

    async def _delete(self) -> None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            async with asyncio.timeout(self.request_timeout_s), \
                    self.http.delete(self.channel_url, server_hostname=self.server_hostname):
                pass

    async def close(self) -> None:
        """Deliver what was written, then close the channel (as a WebSocket close does)."""
        if not self.closed.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.request_timeout_s):
                    await self._delivered.wait()  # also set when the channel ends
            if not self.closed.done():
                await self._delete()
        self._end()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.http.close()

    # -- the machinery -----------------------------------------------------------------

    def _end(self) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._delivered.set()  # nothing more will be posted: nobody waits for it
        self._wake()

    async def _poll_forever(self) -> None:
        # Any failure, garbage included, ends the channel like a dropped socket: never a
        # task dying quietly while the link waits for a close that never comes.
        try:
            while True:
                async with asyncio.timeout(POLL_WAIT_S + self.request_timeout_s):
                    async with self.http.get(self.channel_url,
                                             params={"wait": str(POLL_WAIT_S)},
                                             server_hostname=self.server_hostname) as response:
                        if response.status != 200:
                            return
                        frames = orjson.loads(await response.read())
                if not isinstance(frames, list):
                    return
                for text in frames:
                    if isinstance(text, str):
                        self._deliver(text)
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, OSError):
            pass
        finally:
            self._end()

    async def _post_forever(self) -> None:
        try:
            while True:
                await self._has_outgoing.wait()
                self._has_outgoing.clear()
                while self._outgoing:
                    # In order, at most what the server takes in one request.
                    batch = self._outgoing[:MAX_BATCH]
                    del self._outgoing[:MAX_BATCH]
                    async with asyncio.timeout(self.request_timeout_s):
                        async with self.http.post(self.channel_url, data=orjson.dumps(batch),
                                                  server_hostname=self.server_hostname
                                                  ) as response:
                            if response.status != 200:
                                return
                self._delivered.set()
        except (aiohttp.ClientError, TimeoutError, OSError):
            pass
        finally:
            self._end()


async def open_long_poll(base_url: str, timeout_s: float, tls: ssl.SSLContext | None = None,
                         server_hostname: str | None = None) -> LongPollSocket:
    """Open a channel at ``base_url`` (e.g. http://host:port/lp). Raises aiohttp.ClientError,
    OSError or TimeoutError; an HTTP error status raises aiohttp.ClientResponseError.
    ``tls``: the context for an https:// URL (the target config's CA bundle).
    ``server_hostname``: for https://, the name the certificate is verified against and
    sent as SNI when the URL's host is not the target's (a fault proxy between)."""
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                 connector=aiohttp.TCPConnector(ssl=tls or True))
    try:
        async with asyncio.timeout(timeout_s):
            async with http.post(base_url, server_hostname=server_hostname) as response:
                response.raise_for_status()
                reply = await response.json()
        channel = reply["channel"]
    except BaseException:
        await http.close()
        raise
    return LongPollSocket(http, f"{base_url}/{channel}", timeout_s, server_hostname)
