"""A WebSocket echo server on loopback for the plain-locustfile baseline: picows and uvloop,
the same as benchmarks/relay_server.py, so the two sides of the ratio have equal servers."""

from __future__ import annotations

import sys

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server


class Echo(WSListener):
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is WSMsgType.TEXT:
            transport.send(WSMsgType.TEXT, frame.get_payload_as_bytes())
        elif frame.msg_type is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()


async def serve(port: int) -> None:
    def accept(request: WSUpgradeRequest) -> Echo:
        return Echo()

    server = await ws_create_server(accept, "127.0.0.1", port)
    await server.serve_forever()


def main() -> None:
    uvloop.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
