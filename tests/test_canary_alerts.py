"""Canary alerting (issue 6, item 5): the pure paging decision (N failures -> one alert, no
repeats, one recovery, no page when only the canary's host is broken, flapping), the config
section, the payload formats, and a real aiohttp webhook receiver on loopback that sees
exactly one alert and one recovery in every format."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import queue
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from chatprobe.canary.alerts import (
    ALERT,
    FORMATS,
    RECOVERY,
    Alert,
    AlertConfig,
    CheckAlertState,
    decide,
    deliver,
    parse_alert_config,
    payload,
    send,
    signed_url,
    state_from_json,
    state_to_json,
)
from chatprobe.canary.model import CanaryRun, CheckResult
from chatprobe.errors import HarnessError
from chatprobe.verdict import Status
from tests.conftest import scaled
from tests.servers import free_port

T0 = 1_700_000_000.0
CHECK = "shop-a/agent1/web/receive"


def result(status: Status = Status.OK, agent: str = "agent1", kind: str = "receive",
           profile: str = "", started: float = 0.0) -> CheckResult:
    failing = status not in (Status.OK, Status.WARNING)
    return CheckResult(
        "shop-a", agent, "web", kind, status,
        cause="permission.receive_off" if failing else None,
        detail="agent1 received nothing within 2 s" if failing else "",
        latency_ms=None if failing else 120.0, profile=profile, started=started)


def run(n: int, *results: CheckResult, host_broken: bool = False) -> CanaryRun:
    return CanaryRun(f"run-{n}", T0 + 60 * n, list(results), duration_s=2.0,
                     host_broken=host_broken)


def fail(n: int) -> CanaryRun:
    return run(n, result(Status.CRITICAL, started=T0 + 60 * n))


def ok(n: int) -> CanaryRun:
    return run(n, result(started=T0 + 60 * n))


class Pager:
    """decide() run after run, with the state through a JSON round trip each time as the
    canary's SQLite store keeps it."""

    def __init__(self, after_failures: int = 3) -> None:
        self.after = after_failures
        self.saved: str = json.dumps(state_to_json({}))
        self.n = 0

    def step(self, canary_run: CanaryRun) -> list[Alert]:
        self.n += 1
        state = state_from_json(json.loads(self.saved))
        new, alerts = decide(state, canary_run, self.after, canary_run.started + 2)
        self.saved = json.dumps(state_to_json(new))
        return alerts

    @property
    def state(self) -> dict[str, CheckAlertState]:
        return state_from_json(json.loads(self.saved))


def events(alerts: list[Alert]) -> list[tuple[str, str]]:
    return [(a.event, a.check) for a in alerts]


# -- the decision --------------------------------------------------------------------------


def test_one_alert_after_n_failures_no_repeats_one_recovery() -> None:
    pager = Pager(after_failures=3)
    assert pager.step(fail(1)) == []
    assert pager.step(fail(2)) == []
    alerts = pager.step(fail(3))
    assert events(alerts) == [(ALERT, CHECK)]
    alert = alerts[0]
    assert alert.failures == 3 and alert.first_failure == T0 + 60
    assert alert.run == "run-3" and alert.status == "CRITICAL"
    assert alert.cause == "permission.receive_off"
    assert (alert.target, alert.agent, alert.channel, alert.kind) == (
        "shop-a", "agent1", "web", "receive")
    for n in range(4, 10):  # the failure persists: silence
        assert pager.step(fail(n)) == []
    assert pager.state[CHECK].failures == 9 and pager.state[CHECK].alerted
    recoveries = pager.step(ok(10))
    assert events(recoveries) == [(RECOVERY, CHECK)]
    assert recoveries[0].failures == 9 and recoveries[0].first_failure == T0 + 60
    assert recoveries[0].status == "OK" and recoveries[0].cause == "permission.receive_off"
    assert pager.step(ok(11)) == []
    assert pager.state == {}  # a passing check leaves nothing behind


def test_warning_is_not_a_failure_and_unknown_is_not_judged() -> None:
    pager = Pager(after_failures=2)
    assert pager.step(run(1, result(Status.WARNING))) == []
    assert pager.state == {}
    assert pager.step(run(2, result(Status.UNKNOWN))) == []
    assert pager.step(run(3, result(Status.UNKNOWN))) == []
    assert pager.state == {}
    # A failure streak is neither grown nor broken by a run that could not judge the check.
    assert pager.step(run(4, result(Status.CRITICAL))) == []
    assert pager.step(run(5, result(Status.UNKNOWN))) == []
    assert events(pager.step(run(6, result(Status.CRITICAL)))) == [(ALERT, CHECK)]


def test_host_broken_changes_nothing_and_pages_no_one() -> None:
    pager = Pager(after_failures=3)
    pager.step(fail(1))
    pager.step(fail(2))
    before = pager.saved
    for n in range(3, 8):  # however long the canary's own host is cut off
        assert pager.step(run(n, result(Status.CRITICAL), host_broken=True)) == []
        assert pager.saved == before
    # The streak neither grew nor reset: the next real failure is the third.
    assert events(pager.step(fail(8))) == [(ALERT, CHECK)]
    # And an open alert is neither repeated nor recovered by a host-broken run.
    assert pager.step(run(9, result(Status.OK), host_broken=True)) == []
    assert pager.state[CHECK].alerted
    assert events(pager.step(ok(10))) == [(RECOVERY, CHECK)]


def test_flapping_check_never_reaches_n_in_a_row() -> None:
    pager = Pager(after_failures=2)
    for n in range(1, 20, 2):
        assert pager.step(fail(n)) == []
        assert pager.step(ok(n + 1)) == []
    # Two in a row page; a pass recovers; two more in a row are a new incident.
    assert pager.step(fail(30)) == []
    assert events(pager.step(fail(31))) == [(ALERT, CHECK)]
    assert events(pager.step(ok(32))) == [(RECOVERY, CHECK)]
    assert pager.step(fail(33)) == []
    second = pager.step(fail(34))
    assert events(second) == [(ALERT, CHECK)] and second[0].first_failure == T0 + 60 * 33


def test_checks_missing_from_a_partial_run_keep_their_state() -> None:
    pager = Pager(after_failures=2)
    other = "shop-a/agent2/web/receive"
    pager.step(run(1, result(Status.CRITICAL), result(Status.CRITICAL, agent="agent2")))
    # Partial run: agent2's check never ran; it neither resets nor counts.
    partial = run(2, result(Status.CRITICAL))
    partial.partial = True
    assert events(pager.step(partial)) == [(ALERT, CHECK)]
    assert pager.state[other].failures == 1
    assert events(pager.step(run(3, result(Status.CRITICAL),
                                 result(Status.CRITICAL, agent="agent2")))) == [(ALERT, other)]


def test_independent_checks_and_one_per_check_id() -> None:
    pager = Pager(after_failures=1)
    alerts = pager.step(run(1, result(Status.CRITICAL, profile="clean"),
                            result(Status.CRITICAL, profile="mobile-3g"),
                            result(Status.OK, kind="reply"),
                            result(Status.CRITICAL, kind="idle")))
    # The same check under two profiles is one check: one alert, not two.
    assert sorted(events(alerts)) == [(ALERT, "shop-a/agent1/web/idle"), (ALERT, CHECK)]


def test_no_results_and_bad_after_failures() -> None:
    state = {CHECK: CheckAlertState(2, T0, False, "CRITICAL", None)}
    empty = CanaryRun("r", T0, [], harness_error="could not read config")
    assert decide(state, empty, 3, T0) == (state, [])
    with pytest.raises(ValueError):
        decide({}, empty, 0, T0)


def test_state_json_round_trip_and_corruption() -> None:
    state = {CHECK: CheckAlertState(4, T0, True, "CRITICAL", "push.disabled")}
    assert state_from_json(json.loads(json.dumps(state_to_json(state)))) == state
    assert state_from_json(None) == {}
    bad: Any
    for bad in ([], {CHECK: []}, {CHECK: {"failures": "3"}}, {CHECK: {"alerted": 1}},
                {CHECK: {"first_failure": True}}, {CHECK: {"failures": -1}}):
        with pytest.raises(HarnessError):
            state_from_json(bad)


# -- config and payloads -------------------------------------------------------------------


def test_parse_alert_config() -> None:
    assert parse_alert_config(None, "c.yaml: alert") is None
    assert parse_alert_config({"webhook": "https://hooks.example/x"}, "s") == AlertConfig(
        "https://hooks.example/x", "generic", 3, 5.0, None)
    assert parse_alert_config(
        {"webhook": "https://oapi.dingtalk.com/robot/send?access_token=t", "format": "dingtalk",
         "after_failures": 1, "timeout_s": 2, "secret": "SECxyz"}, "s") == AlertConfig(
        "https://oapi.dingtalk.com/robot/send?access_token=t", "dingtalk", 1, 2.0, "SECxyz")


@pytest.mark.parametrize(("document", "field"), [
    ("https://hooks.example", "must be a mapping"),
    ({}, "'webhook'"),
    ({"webhook": "hooks.example/x?key=k3y"}, "'webhook'"),
    ({"webhook": "https://[::1?key=k3y"}, "'webhook'"),
    ({"webhook": "https://h/x?key=k3y", "format": "teams"}, "'format'"),
    ({"webhook": "https://h/x?key=k3y", "after_failures": 0}, "'after_failures'"),
    ({"webhook": "https://h/x?key=k3y", "after_failures": 2.5}, "'after_failures'"),
    ({"webhook": "https://h/x?key=k3y", "after_failures": True}, "'after_failures'"),
    ({"webhook": "https://h/x?key=k3y", "timeout_s": 100}, "'timeout_s'"),
    ({"webhook": "https://h/x?key=k3y", "secret": "SEC"}, "'secret'"),
    ({"webhook": "https://h/x?key=k3y", "format": "dingtalk", "secret": ""}, "'secret'"),
    ({"webhook": "https://h/x?key=k3y", "hook": "x"}, "unknown field(s) hook"),
])
def test_parse_alert_config_rejects(document: Any, field: str) -> None:
    with pytest.raises(HarnessError) as raised:
        parse_alert_config(document, "canary.yaml: alert")
    message = str(raised.value)
    assert message.startswith("canary.yaml: alert: ") and field in message
    assert "\n" not in message and "k3y" not in message


def sample_alert(event: str = ALERT) -> Alert:
    return Alert(event=event, check=CHECK, target="shop-a", agent="agent1", channel="web",
                 kind="receive", profile="", status="CRITICAL" if event == ALERT else "OK",
                 cause="permission.receive_off",
                 detail="agent1 received nothing within 2 s" if event == ALERT else "",
                 first_failure=T0, failures=3, run="run-3", at=T0 + 180)


def test_payload_formats() -> None:
    generic = payload(sample_alert(), "generic")
    assert {key: generic[key] for key in (
        "event", "check", "target", "agent", "channel", "kind", "status", "cause", "detail",
        "first_failure", "consecutive_failures", "run")} == {
        "event": "alert", "check": CHECK, "target": "shop-a", "agent": "agent1",
        "channel": "web", "kind": "receive", "status": "CRITICAL",
        "cause": "permission.receive_off", "detail": "agent1 received nothing within 2 s",
        "first_failure": T0, "consecutive_failures": 3, "run": "run-3"}
    assert generic["first_failure_utc"] == "2023-11-14 22:13:20 UTC"
    assert generic["cause_description"] == "agent lacks the receive-messages permission"
    text = sample_alert().text()
    assert text.startswith(f"chatprobe ALERT {CHECK}: CRITICAL for 3 consecutive run(s)")
    assert "permission.receive_off - agent lacks the receive-messages permission" in text
    for chat in ("wecom", "dingtalk"):
        assert payload(sample_alert(), chat) == {"msgtype": "text", "text": {"content": text}}
    assert payload(sample_alert(), "slack") == {"text": text}
    recovery = sample_alert(RECOVERY).text()
    assert recovery.startswith(f"chatprobe RECOVERED {CHECK}: OK again after 3 failed run(s)")
    assert "(3 min)" in recovery
    long = dataclasses.replace(sample_alert(), detail="消息" * 2000)
    assert len(long.text().encode()) <= 2000  # WeCom refuses more than 2048 bytes


# -- a real webhook receiver ---------------------------------------------------------------


@dataclass
class Receiver:
    """An aiohttp webhook on loopback in its own thread; what it received goes to a queue."""

    mode: str = "ok"  # ok | refuse (WeCom/DingTalk errcode) | hang
    secret: str | None = None
    received: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    url: str = ""
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _release: asyncio.Event | None = None

    async def handle(self, request: web.Request) -> web.Response:
        assert self._release is not None
        body = await request.json()
        query = dict(request.query)
        self.received.put({"path": request.path, "query": query, "body": body,
                           "content_type": request.headers.get("Content-Type", "")})
        if self.mode == "hang":
            await self._release.wait()
        if self.secret is not None:
            # Verify the signature as DingTalk does.
            wanted = base64.b64encode(hmac.new(
                self.secret.encode(), f"{query.get('timestamp')}\n{self.secret}".encode(),
                hashlib.sha256).digest()).decode()
            if query.get("sign") != wanted:
                return web.json_response({"errcode": 310000, "errmsg": "sign not match"})
        if self.mode == "refuse":
            return web.json_response({"errcode": 93000, "errmsg": "invalid webhook url"})
        return web.json_response({"errcode": 0, "errmsg": "ok"})

    def start(self) -> Receiver:
        loop = asyncio.new_event_loop()
        self._loop = loop
        threading.Thread(target=loop.run_forever, daemon=True).start()

        async def begin() -> str:
            self._release = asyncio.Event()
            app = web.Application()
            app.router.add_post("/hook", self.handle)
            self._runner = web.AppRunner(app, shutdown_timeout=scaled(2))
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            host, port = self._runner.addresses[0][:2]
            return f"http://{host}:{port}/hook?key=robot-k3y"

        self.url = asyncio.run_coroutine_threadsafe(begin(), loop).result(scaled(10))
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        async def end() -> None:
            assert self._release is not None and self._runner is not None
            self._release.set()
            await self._runner.cleanup()

        try:
            asyncio.run_coroutine_threadsafe(end(), loop).result(scaled(10))
        finally:
            loop.call_soon_threadsafe(loop.stop)

    def take(self) -> dict[str, Any]:
        return self.received.get(timeout=scaled(5))

    def drain(self) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        while not self.received.empty():
            got.append(self.received.get_nowait())
        return got


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver().start()
    try:
        yield hook
    finally:
        hook.stop()


def content(format: str, body: dict[str, Any]) -> str:
    if format == "generic":
        text: str = body["text"]
        return text
    if format == "slack":
        assert set(body) == {"text"}
        slack_text: str = body["text"]
        return slack_text
    assert body["msgtype"] == "text" and set(body) == {"msgtype", "text"}
    chat_text: str = body["text"]["content"]
    return chat_text


@pytest.mark.parametrize("format", FORMATS)
def test_webhook_sees_one_alert_and_one_recovery(receiver: Receiver, format: str) -> None:
    if format == "dingtalk":
        receiver.secret = "SEC-test-secret"
    config = AlertConfig(receiver.url, format, after_failures=3, timeout_s=scaled(5),
                         secret=receiver.secret)
    state: dict[str, CheckAlertState] = {}
    for n in range(1, 8):  # 7 failing runs: the alert goes out after the third
        state, alerts = decide(state, fail(n), config.after_failures, T0 + 60 * n)
        state, problems = deliver(state, alerts, config)
        assert problems == []
        if n == 3:
            got = receiver.take()
            assert got["path"] == "/hook" and got["query"]["key"] == "robot-k3y"
            assert got["content_type"].startswith("application/json")
            assert content(format, got["body"]).startswith(f"chatprobe ALERT {CHECK}")
            if format == "generic":
                assert got["body"]["event"] == "alert" and got["body"]["run"] == "run-3"
                assert got["body"]["consecutive_failures"] == 3
    for n in range(8, 11):  # then passing runs: one recovery
        state, alerts = decide(state, ok(n), config.after_failures, T0 + 60 * n)
        state, problems = deliver(state, alerts, config)
        assert problems == []
        if n == 8:
            got = receiver.take()
            assert content(format, got["body"]).startswith(f"chatprobe RECOVERED {CHECK}")
    # Every send returned after the webhook answered, so nothing else can still be on its
    # way: exactly one alert and one recovery were received.
    assert receiver.drain() == []
    assert state == {}


def test_refused_message_is_a_problem_and_stays_pending(receiver: Receiver) -> None:
    receiver.mode = "refuse"
    config = AlertConfig(receiver.url, "wecom", after_failures=1, timeout_s=scaled(5))
    state, alerts = decide({}, fail(1), 1, T0)
    state, problems = deliver(state, alerts, config)
    assert len(problems) == 1 and "errcode 93000 invalid webhook url" in problems[0]
    assert "robot-k3y" not in problems[0]  # the robot's key is a secret
    receiver.take()
    # WeCom accepts again: the next run sends the alert that did not get through, once.
    receiver.mode = "ok"
    state, alerts = decide(state, fail(2), 1, T0 + 60)
    assert events(alerts) == [(ALERT, CHECK)] and alerts[0].first_failure == T0 + 60
    state, problems = deliver(state, alerts, config)
    assert problems == [] and receiver.take()["body"]["text"]["content"].startswith(
        "chatprobe ALERT")
    state, alerts = decide(state, fail(3), 1, T0 + 120)
    assert alerts == []


def test_unreachable_webhook_delays_the_page_and_the_recovery() -> None:
    down = AlertConfig(f"http://127.0.0.1:{free_port()}/hook?key=robot-k3y", "generic", 2,
                       timeout_s=scaled(2))
    state, _ = decide({}, fail(1), 2, T0)
    state, alerts = decide(state, fail(2), 2, T0 + 60)
    assert len(alerts) == 1
    state, problems = deliver(state, alerts, down)
    assert len(problems) == 1 and problems[0].startswith(
        f"alert webhook {down.webhook.split('?')[0]}: alert for {CHECK} not sent: ")
    assert send(alerts, down) == problems  # send() is the same without the state
    hook = Receiver().start()
    try:
        up = AlertConfig(hook.url, "generic", 2, timeout_s=scaled(5))
        state, alerts = decide(state, fail(3), 2, T0 + 120)
        assert events(alerts) == [(ALERT, CHECK)]
        state, problems = deliver(state, alerts, up)
        assert problems == [] and hook.take()["body"]["event"] == "alert"
        # The recovery fails to go out: it is sent by the next passing run instead.
        state, alerts = decide(state, ok(4), 2, T0 + 180)
        state, problems = deliver(state, alerts, down)
        assert len(problems) == 1 and "recovery" in problems[0]
        state, alerts = decide(state, ok(5), 2, T0 + 240)
        assert events(alerts) == [(RECOVERY, CHECK)]
        state, problems = deliver(state, alerts, up)
        assert problems == [] and hook.take()["body"]["event"] == "recovery"
        assert state == {} and hook.drain() == []
    finally:
        hook.stop()


def test_hanging_webhook_costs_one_timeout_not_one_per_alert(receiver: Receiver) -> None:
    receiver.mode = "hang"
    config = AlertConfig(receiver.url, "slack", 1, timeout_s=0.5)
    _, alerts = decide({}, run(1, result(Status.CRITICAL), result(Status.CRITICAL, "agent2"),
                               result(Status.CRITICAL, "agent3")), 1, T0)
    assert len(alerts) == 3
    began = time.monotonic()
    problems = send(alerts, config)
    elapsed = time.monotonic() - began
    assert len(problems) == 3 and "timed out" in problems[0], problems
    assert all("webhook unreachable" in p for p in problems[1:])
    assert elapsed < scaled(10), elapsed
    receiver.take()  # the first alert reached the hanging handler; the others were not tried
    assert receiver.drain() == []


def test_signature_is_what_dingtalk_checks() -> None:
    url = signed_url("https://oapi.dingtalk.com/robot/send?access_token=t", "SECabc",
                     1_700_000_000_000)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    expected = base64.b64encode(hmac.new(b"SECabc", b"1700000000000\nSECabc",
                                         hashlib.sha256).digest()).decode()
    assert query == {"access_token": ["t"], "timestamp": ["1700000000000"], "sign": [expected]}
