"""The swarm's Locust side, in a child process of its own: importing Locust monkey-patches the
standard library with gevent, which the rest of the suite (asyncio on real threads) must not
inherit."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import scaled

PACING = textwrap.dedent("""
    import argparse
    from locust.env import Environment
    from chatprobe.swarm import locust_plugin as plugin
    from chatprobe.swarm.engine import now_us
    from chatprobe.swarm.scripts import load_script

    class Recorder:
        "Takes the rounds a user hands over, as the chat loop would."
        failure = None
        ready = True

        def __init__(self):
            self.rounds = []

        def play_round(self, customer, name, plan, drop_after, start_us):
            self.rounds.append((start_us, plan))

    class Customer(plugin.ChatCustomer):
        pass

    waits = []
    plugin.gevent.sleep = waits.append  # the wait is what is checked, not slept
    plugin.STATE.engine = engine = Recorder()
    plugin.STATE.script = load_script("shopper")
    environment = Environment(user_classes=[Customer], parsed_options=argparse.Namespace(
        cp_think_scale=0.01, cp_reconnect_share=-1.0))
    user = Customer(environment)
    user.on_start()
    for call in range(3):
        asked_at = now_us()
        handed = len(engine.rounds)
        user.run_script()
        queued_until = engine.rounds[-1][1][-1][0]
        wakes_at = asked_at + waits[-1] * 1e6
        # A greenlet starved of the interpreter lock wakes late: the rounds must not wait for
        # it, so half the horizon is still queued when it is due to wake.
        assert queued_until - wakes_at >= plugin.PLAN_AHEAD_US // 2 - 20_000, (
            call, queued_until - wakes_at)
        assert queued_until - asked_at >= plugin.PLAN_AHEAD_US - 20_000
        if call:  # each round starts where the one before was planned to end
            previous = engine.rounds[handed - 1][1][-1][0]
            assert engine.rounds[handed][0] == previous, (call, engine.rounds[handed][0])
    print("ok", len(engine.rounds))
""")


def test_a_user_wakes_to_hand_over_rounds_while_half_its_horizon_is_still_queued() -> None:
    done = subprocess.run([sys.executable, "-c", PACING], capture_output=True, text=True,
                          timeout=scaled(60))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok ")
