"""Peak-promotion swarm: fake customers following a conversation script on a promotion shape.

Headless: `chatprobe swarm --target URL --shape midnight-spike [--workers N]`.
With the web UI: `locust -f loadtests/locustfile.py --host http://127.0.0.1:8765`.
Options of chatprobe's own start with --cp- (`locust -f loadtests/locustfile.py --help`).
"""

from __future__ import annotations

from locust import task

from chatprobe.swarm.locust_plugin import ChatCustomer, PromotionShape


class Shopper(ChatCustomer):
    """One customer conversation at a time, as scripted in --cp-script."""

    @task
    def converse(self) -> None:
        self.run_script()


__all__ = ["PromotionShape", "Shopper"]
