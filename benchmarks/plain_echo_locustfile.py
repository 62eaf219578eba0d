"""The baseline for bench_swarm.py: a locustfile of the kind a user writes by hand.

Each user holds a websocket-client connection to an echo server, sends a message and waits
for it to come back, and reports each round trip to Locust. It measures no loss, matches
nothing across users and has no plan: it is the cheapest honest thing Locust can do.
"""

from __future__ import annotations

import time

import websocket
from locust import User, task


class EchoUser(User):
    def on_start(self) -> None:
        assert self.host, "pass --host ws://127.0.0.1:PORT/"
        self.ws = websocket.create_connection(self.host, skip_utf8_validation=True)

    def on_stop(self) -> None:
        self.ws.close()

    @task
    def round_trip(self) -> None:
        started = time.perf_counter()
        self.ws.send("hello, is the down jacket in stock in size XL?")
        self.ws.recv()
        self.environment.events.request.fire(
            request_type="ws", name="echo", response_time=(time.perf_counter() - started) * 1000,
            response_length=0, exception=None)
