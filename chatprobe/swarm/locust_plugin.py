"""Locust glue: chatprobe's options, the fake-customer user, the promotion shape, and the event
wiring that carries batches from workers to the master's collector.

Imported by loadtests/locustfile.py; works headless (`chatprobe swarm`), with `--processes`
or separate master/worker hosts, and with Locust's web UI. Delivery latency per message kind
lands in Locust's statistics as request type "deliver"; late and lost messages are failures.
chatprobe's own exact numbers (HdrHistograms, ledger) are written by the master at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import os
import random
import secrets
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import gevent
import psutil
from locust import LoadTestShape, User, argument_parser, events
from locust.env import Environment
from locust.runners import LocalRunner, MasterRunner, WorkerRunner

from chatprobe.children import die_with_parent_now
from chatprobe.config import (
    ADMIN_TOKEN_ENV,
    load_target,
    positive_float,
    with_inherited_tls_name,
    with_overrides,
)
from chatprobe.diagnosis import Cause, Diagnosis
from chatprobe.errors import HarnessError, TargetError
from chatprobe.ledger import MessageRecord, Outcome
from chatprobe.paths import write_json
from chatprobe.stamp import StampCodec
from chatprobe.swarm.collector import Collector
from chatprobe.swarm.engine import (
    Planned,
    WorkerEngine,
    agents_of_worker,
    clock_domain,
    now_us,
)
from chatprobe.swarm.fastref import ENGINES, CompiledWorkerEngine, choose_engine
from chatprobe.swarm.runner import STAMP_KEY_ENV
from chatprobe.swarm.scripts import Script, load_script
from chatprobe.swarm.shapes import Shape, load_shape
from chatprobe.verdict import RunSummary, render_table

log = logging.getLogger("chatprobe.swarm")
PLAN_AHEAD_US = 1_000_000  # rounds starting up to this far ahead go to the chat loop at once
PLAN_AHEAD_ROUNDS = 50  # ... but no more (tiny think times: one burst, not thousands)
GC_YOUNG_THRESHOLD = 50_000  # Python's default is 700 allocations
BATCH_MESSAGE = "chatprobe_batch"
DONE_MESSAGE = "chatprobe_done"
CLOCK_PING = "chatprobe_clock_ping"  # master -> worker, then back: NTP-style offsets
CLOCK_PONG = "chatprobe_clock_pong"
CLOCK_ROUNDS = 20  # the collector fixes an offset after CLOCK_SAMPLES; spares for slow starts
CLOCK_PING_INTERVAL_S = 0.05
FLUSH_S = 0.5
EVENTS_KEPT = 500
# Locust rebuilds its whole argument parser once per option on every spawn message, which
# blocks a worker for 50-180 ms at each shape step and makes its users miss their plan; the
# result never changes within a process.
argument_parser.default_args_dict = functools.cache(argument_parser.default_args_dict)


class DeliveryLate(Exception):
    """Delivered, but after the SLA."""


class DeliveryLost(Exception):
    """Not delivered by the deadline."""


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser  # Locust's own parser: it knows include_in_web_ui, argument groups don't
    group.add_argument("--cp-config", default="", help="target config file "
                       "(default fixtures/targets/reference.yaml)", include_in_web_ui=False)
    group.add_argument("--cp-shape", default="midnight-spike", help="promotion shape name/file")
    group.add_argument("--cp-duration", type=float, default=0.0,
                       help="fit the shape into this many seconds (0: as written)")
    group.add_argument("--cp-script", default="shopper", help="conversation script")
    group.add_argument("--cp-think-scale", type=positive_float, default=1.0,
                       help="multiply every think time (shorter = more messages/s)")
    group.add_argument("--cp-reconnect-share", type=float, default=-1.0,
                       help="share of customers whose connection drops once mid-conversation "
                       "(default: the script's reconnect_share)")
    group.add_argument("--cp-json", default="", help="write chatprobe's summary JSON here",
                       include_in_web_ui=False)
    # Default from the environment: `chatprobe swarm` passes the token there, off the
    # command line.
    group.add_argument("--cp-admin-token", default=os.environ.get(ADMIN_TOKEN_ENV, ""),
                       include_in_web_ui=False)
    group.add_argument("--cp-engine", default="auto", choices=ENGINES, include_in_web_ui=False,
                       help="the chat loop: compiled (C, reference protocol over ws://), "
                       "python (every adapter), or auto (compiled where it can)")
    group.add_argument("--cp-agent-target", default="", include_in_web_ui=False,
                       help="URL the probe agents connect to (default: --host)")
    group.add_argument("--cp-raw-latencies", default="", include_in_web_ui=False,
                       help="write every latency sample (µs, one per line) here")
    group.add_argument("--cp-quiet", action="store_true", include_in_web_ui=False,
                       help="do not print chatprobe's summary at the end")
    group.add_argument("--cp-sla-ms", type=float, default=0.0)
    group.add_argument("--cp-deadline-ms", type=float, default=0.0)
    group.add_argument("--cp-p99-warning-ms", type=float, default=0.0,
                       help="a p99 latency above this (ms) makes the run a WARNING")
    # Generated on the master and passed to workers with the spawn message; the key can be
    # chosen through the environment (never on a command line, where ps shows it).
    group.add_argument("--cp-run", default="", include_in_web_ui=False)
    # Set by the master at the start, for the workers to share out the probe agents: the
    # indexes of the workers the run starts with, comma-separated.
    group.add_argument("--cp-agent-workers", default="", include_in_web_ui=False)
    group.add_argument("--cp-secret", default="", include_in_web_ui=False,
                       env_var=STAMP_KEY_ENV)


Engine = WorkerEngine | CompiledWorkerEngine  # the worker's chat loop, either kind


@dataclasses.dataclass
class SwarmState:
    engine: Engine | None = None
    collector: Collector | None = None
    script: Script | None = None
    done_workers: set[str] = dataclasses.field(default_factory=set)
    expected_workers: int = 0
    process: psutil.Process | None = None
    failure_reported: bool = False
    greenlets: list[gevent.Greenlet] = dataclasses.field(default_factory=list)
    summary_written: bool = False
    events: list[str] = dataclasses.field(default_factory=list)


STATE = SwarmState()


def _opts(environment: Environment) -> Any:
    """Locust's parsed options (with chatprobe's --cp-* ones)."""
    options = environment.parsed_options
    if options is None:
        raise HarnessError("chatprobe's locustfile needs Locust's command-line options")
    return options


def _target(environment: Environment) -> tuple[str, Any]:
    options = _opts(environment)
    config = with_inherited_tls_name(
        load_target(Path(options.cp_config) if options.cp_config else None))
    host = environment.host or options.host
    if not host:
        raise HarnessError("no target: pass --host URL (or --target to chatprobe swarm)")
    for flag in ("sla_ms", "deadline_ms", "p99_warning_ms"):
        if getattr(options, f"cp_{flag}") < 0:  # 0: not given, the config's value stands
            raise HarnessError(f"--cp-{flag.replace('_', '-')} must be positive")
    return host, with_overrides(config, options.cp_admin_token, options.cp_sla_ms,
                                options.cp_deadline_ms, options.cp_p99_warning_ms)


def _codec(environment: Environment) -> StampCodec:
    options = _opts(environment)
    return StampCodec(run=options.cp_run, secret=bytes.fromhex(options.cp_secret))


@events.init.add_listener
def _workers_die_with_their_master(environment: Environment, **_: Any) -> None:
    # A worker forked by --processes outlives a master that dies while it waits for its
    # workers (Locust exits there on Ctrl-C without stopping them), and would run on until
    # its heartbeat times out; `chatprobe swarm` must leave no process behind.
    options = environment.parsed_options
    if isinstance(environment.runner, WorkerRunner) and options is not None and getattr(
            options, "processes", None):
        die_with_parent_now(signal.SIGKILL)


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    if environment.parsed_options is None:
        return
    options = _opts(environment)
    if not isinstance(environment.runner, WorkerRunner):
        options.cp_run = options.cp_run or secrets.token_hex(4)
        options.cp_secret = options.cp_secret or secrets.token_bytes(16).hex()
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        runner.register_message(BATCH_MESSAGE, _on_batch)
        runner.register_message(DONE_MESSAGE, _on_done)
        runner.register_message(CLOCK_PONG, _on_clock_pong)
    elif isinstance(runner, WorkerRunner):
        runner.register_message(CLOCK_PING, _on_clock_ping)


def _on_clock_ping(environment: Environment, msg: Any, **_: Any) -> None:
    runner = environment.runner
    assert isinstance(runner, WorkerRunner)
    runner.send_message(CLOCK_PONG, {"sent_us": msg.data["sent_us"], "worker_us": now_us(),
                                     "worker": f"w{runner.worker_index}",
                                     "clock": clock_domain()})


def _on_clock_pong(environment: Environment, msg: Any, **_: Any) -> None:
    received = now_us()
    if STATE.collector is not None:
        data = msg.data
        STATE.collector.clock_sample(str(data["worker"]), str(data["clock"]),
                                     int(data["sent_us"]), int(data["worker_us"]), received)


def _sync_clocks(environment: Environment) -> None:
    """Round trips to every worker until each clock offset is fixed (a few at the start)."""
    runner = environment.runner
    assert isinstance(runner, MasterRunner)
    for _ in range(CLOCK_ROUNDS):
        if STATE.collector is None:
            return
        for client_id in list(runner.clients):
            runner.send_message(CLOCK_PING, {"sent_us": now_us()}, client_id=client_id)
        gevent.sleep(CLOCK_PING_INTERVAL_S)


def _on_batch(environment: Environment, msg: Any, **_: Any) -> None:
    if STATE.collector is not None:
        STATE.collector.ingest(msg.data)


def _remember_events(events: Iterable[str]) -> None:
    """Connection events for the summary: the recent ones, bounded for long runs."""
    STATE.events.extend(events)
    del STATE.events[:-EVENTS_KEPT]


def _on_done(environment: Environment, msg: Any, **_: Any) -> None:
    STATE.done_workers.add(str(msg.data["worker"]))
    _remember_events(msg.data.get("events", []))
    if len(STATE.done_workers) >= STATE.expected_workers:
        # Every worker's last batch is in: nothing more can change the counts.
        _write_summary(environment)


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_: Any) -> None:
    # Headless shape runs end with quit: the master's test_stop fires before the workers
    # hear of it, and their final batches arrive just before this point.
    if isinstance(environment.runner, MasterRunner) and not STATE.summary_written:
        missing = STATE.expected_workers - len(STATE.done_workers)
        if missing > 0:
            log.error("chatprobe: %d worker(s) sent no final batch; their last messages "
                      "may be counted as lost", missing)
        _write_summary(environment)


def _report_outcome(environment: Environment, deadline_ms: float) -> Any:
    fire = environment.events.request.fire

    def report(record: MessageRecord) -> None:
        name = record.kind or "message"
        if record.outcome is Outcome.LOST:
            # At least the deadline: a lost message must not pull Locust's percentiles down.
            fire(request_type="deliver", name=name, response_time=deadline_ms,
                 response_length=0, exception=DeliveryLost("not delivered by the deadline"))
            return
        latency_ms = (record.latency_us or 0) / 1000
        exception = DeliveryLate("delivered after the SLA") if (
            record.outcome is Outcome.LATE) else None
        fire(request_type="deliver", name=name, response_time=latency_ms, response_length=0,
             exception=exception)

    return report


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    # Everything loaded so far lives for the whole run: keep it out of the collector's scans,
    # and collect the young generation less often. Full collections over the ledger's
    # in-flight records otherwise stall the chat loop for tens of milliseconds.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)
    host, config = _target(environment)
    codec = _codec(environment)
    STATE.done_workers.clear()
    STATE.summary_written = False
    if not isinstance(runner, WorkerRunner):
        STATE.collector = Collector(codec, int(config.sla_ms * 1000),
                                    int(config.deadline_ms * 1000), now_us(),
                                    on_outcome=_report_outcome(environment, config.deadline_ms),
                                    keep_raw=bool(_opts(environment).cp_raw_latencies),
                                    clock=clock_domain() if isinstance(runner, MasterRunner)
                                    else None)
        STATE.greenlets.append(gevent.spawn(_tick_collector, environment))
    if isinstance(runner, MasterRunner):
        # The workers the run starts with; missing ones (no heartbeat) are not counted:
        # their final batch would be waited for until quitting.
        clients = runner.clients
        starting = [*clients.ready, *clients.spawning, *clients.running]
        STATE.expected_workers = len(starting)
        # Sent with the spawn messages, which follow this event: each worker takes its
        # share of the probe agents (agents_of_worker).
        _opts(environment).cp_agent_workers = ",".join(
            str(runner.get_worker_index(node.id)) for node in starting)
        STATE.greenlets.append(gevent.spawn(_sync_clocks, environment))
        return
    if STATE.engine is not None:
        return  # test_start fired again for the same run (Locust restarts spawning)
    worker_index = runner.worker_index if isinstance(runner, WorkerRunner) else 0
    STATE.script = load_script(_opts(environment).cp_script)
    STATE.failure_reported = False
    # Empty unless a master named the workers it started with.
    workers = [int(index) for index in _opts(environment).cp_agent_workers.split(",")
               if index.isascii() and index.isdecimal()]
    agent_url = _opts(environment).cp_agent_target or None
    agents = agents_of_worker(config.agents, worker_index, workers)

    def build(engine_class: type[Engine]) -> Engine:
        return engine_class(host, config, codec, f"w{worker_index}", script=STATE.script,
                            agent_url=agent_url, agents=agents)

    engine: Engine
    try:
        engine = build(choose_engine(_opts(environment).cp_engine, host, config, agent_url,
                                     STATE.script))
    except (HarnessError, TargetError) as exc:
        # This worker cannot run its engine (--cp-engine compiled where it is not built, a
        # host that does not resolve): its failure, one line on the master, instead of a
        # traceback in this event and a run that waits for a worker with no engine.
        engine = build(WorkerEngine)
        engine.failure = str(exc)
        engine.failure_cause = exc.cause.value if isinstance(exc, TargetError) else None
    else:
        engine.start(gevent.sleep)
    STATE.engine = engine
    STATE.greenlets.append(gevent.spawn(_flush_forever, environment))


def _tick_collector(environment: Environment) -> None:
    while True:
        gevent.sleep(FLUSH_S)
        collector = STATE.collector
        if collector is None:
            return
        runner = environment.runner
        collector.sample_users(now_us(), runner.user_count if runner else 0)
        collector.expire(now_us())


def _flush(environment: Environment) -> None:
    engine = STATE.engine
    if engine is None:
        return
    if STATE.process is None:
        STATE.process = psutil.Process(os.getpid())  # this process, after Locust's fork
        STATE.process.cpu_percent()
    batch = engine.take_batch(STATE.process.cpu_percent())
    if engine.failure and not STATE.failure_reported:
        STATE.failure_reported = True
        batch["failure"] = engine.failure
        batch["failure_cause"] = engine.failure_cause
    _remember_events(engine.out.events.popleft() for _ in range(len(engine.out.events)))
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        runner.send_message(BATCH_MESSAGE, batch)
    elif STATE.collector is not None:
        STATE.collector.ingest(batch)


def _flush_forever(environment: Environment) -> None:
    while True:
        gevent.sleep(FLUSH_S)
        _flush(environment)


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if STATE.engine is not None:
        _flush(environment)
        if isinstance(runner, WorkerRunner):
            runner.send_message(DONE_MESSAGE, {"worker": STATE.engine.worker,
                                               "events": STATE.events[-50:]})
        STATE.engine.stop()
        STATE.engine = None
    if isinstance(runner, LocalRunner):
        _write_summary(environment)
    if isinstance(runner, WorkerRunner | LocalRunner):
        for greenlet in STATE.greenlets:
            greenlet.kill(block=False)
        STATE.greenlets.clear()


def _write_summary(environment: Environment) -> None:
    collector = STATE.collector
    if collector is None or STATE.summary_written:
        return
    STATE.summary_written = True
    host, config = _target(environment)
    ledger = collector.ledger
    summary = RunSummary(ledger.codec.run, host, ledger.counts, ledger.latency, config.sla_ms,
                         config.deadline_ms, config.p99_warning_ms)
    for worker, what, cause in collector.failures:
        if cause is not None:  # the target refused or failed: CRITICAL with its diagnosis
            summary.fatal = Diagnosis(Cause(cause), f"{worker}: {what}")
        else:  # chatprobe could not set itself up: UNKNOWN
            summary.harness_error = f"{worker}: {what}"
    if ledger.counts.sent == 0 and summary.fatal is None and summary.harness_error is None:
        summary.harness_error = "the swarm sent no message (no user ran its script)"
    doc = collector.finish(summary)
    doc["shape"] = _opts(environment).cp_shape
    doc["connection_events"] = STATE.events[-50:]
    for greenlet in STATE.greenlets:
        greenlet.kill(block=False)
    STATE.greenlets.clear()
    if not _opts(environment).cp_quiet:
        print(render_table(doc), file=sys.stderr, flush=True)
    raw_path = _opts(environment).cp_raw_latencies
    if raw_path and collector.raw_latencies_us is not None:
        Path(raw_path).write_text("".join(f"{v}\n" for v in collector.raw_latencies_us))
    path = _opts(environment).cp_json
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(path), doc)  # whole: the runner reads it even after a kill
    STATE.collector = None


class ChatCustomer(User):
    """A fake customer: one connection for its life, a conversation per round of the
    script, each message on a planned (open-model) time that the chat loop keeps.

    Latency counts from each planned time, so a generator that falls behind cannot hide it:
    late sends are counted and can mark the run invalid.
    """

    abstract = True
    _counter: ClassVar[int] = 0

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.rng = random.Random()
        self.customer = ""
        self.round = 0
        self.plan_end_us = 0

    def on_start(self) -> None:
        ChatCustomer._counter += 1
        self.customer = f"c{ChatCustomer._counter}"  # one connection for the user's life
        self.round = 0
        self.plan_end_us = 0

    def on_stop(self) -> None:
        # The shape took this customer away (maybe mid-script): it closes and leaves.
        if STATE.engine is not None:
            STATE.engine.leave(self.customer)

    def run_script(self) -> None:
        engine, script = STATE.engine, STATE.script
        if engine is None or script is None or engine.failure or not engine.ready:
            gevent.sleep(0.05)  # the probe agents are still logging in (or failed)
            return
        customer = self.customer
        # Open model: a round starts when the previous one was planned to end, however late
        # this greenlet runs, so a generator that falls behind shows as late sends.
        intended = self.plan_end_us or now_us()
        # Rounds up to PLAN_AHEAD_US ahead go over together: each wake-up of this greenlet
        # takes the interpreter lock from the chat loop's thread, so fewer is faster.
        horizon = now_us() + PLAN_AHEAD_US
        for _ in range(PLAN_AHEAD_ROUNDS):
            start = intended
            # A new conversation each round, as a returning customer would start.
            self.round += 1
            plan, drop_after = self._plan_round(script, start)
            if plan[-1][0] <= start:
                # Think times scaled to nothing (the web UI takes any number): rounds would
                # follow each other without pause, as fast as the loop could send them.
                engine.failure = engine.failure or (
                    f"the script's think times scaled by {_opts(self.environment).cp_think_scale}"
                    " add up to 0 s: give --cp-think-scale a positive value")
                return
            engine.play_round(customer, f"{customer}-{self.round}", plan, drop_after, start)
            intended = plan[-1][0]
            if intended >= horizon:
                break
        self.plan_end_us = intended
        # The chat loop paces the rounds; this greenlet wakes to hand over the next ones
        # while half the horizon is still queued, so a late wake-up is not a late round.
        wait_s = (intended - PLAN_AHEAD_US // 2 - now_us()) / 1e6
        if wait_s > 0:
            gevent.sleep(wait_s)

    def _plan_round(self, script: Script, start_us: int) -> tuple[list[Planned], int]:
        """One round's messages (planned time, kind, body) from ``start_us``, and the index of
        the message after which the connection drops (a mobile user) or -1."""
        options = _opts(self.environment)
        share = script.reconnect_share if options.cp_reconnect_share < 0 else (
            options.cp_reconnect_share)
        drop_after = self.rng.randrange(len(script.steps)) if self.rng.random() < share else -1
        return script.plan(self.rng, start_us, options.cp_think_scale), drop_after


class PromotionShape(LoadTestShape):
    """The shape file named by --cp-shape (fitted to --cp-duration), then a drain with no
    users for one deadline so messages still in flight can arrive before the run ends."""

    shape: Shape | None = None
    drain_s = 0.0

    def tick(self) -> tuple[int, float] | None:
        if self.shape is None:
            options = _opts(self.runner.environment) if self.runner else None
            if options is None:
                return None
            self.shape = load_shape(options.cp_shape).fitted(options.cp_duration or None)
            _, config = _target(self.runner.environment)  # type: ignore[union-attr]
            self.drain_s = config.deadline_ms / 1000 + 2 * FLUSH_S + 1
        elapsed = self.get_run_time()
        current = self.shape.at(elapsed)
        if current is not None:
            return current
        if elapsed < self.shape.total_s + self.drain_s:
            return 0, 100.0
        return None


__all__ = ["ChatCustomer", "LocalRunner", "PromotionShape"]
