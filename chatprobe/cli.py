"""The `chatprobe` command: serve, probe, swarm, demo, profiles, canary, history.

Every user error ends in one line on stderr and exit 3 (the harness could not run); a broken
target ends in the summary (or one line) and exit 2. No traceback reaches the user.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

from chatprobe import __version__
from chatprobe.config import (
    ADMIN_TOKEN_ENV,
    TargetConfig,
    load_target,
    positive_float,
    with_overrides,
)
from chatprobe.errors import HarnessError
from chatprobe.paths import run_temp_dir, write_json
from chatprobe.verdict import RunSummary, Status, document_status, render_table

EXIT_UNKNOWN = 3
T = TypeVar("T")
_HOST = re.compile(r"^(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|[0-9A-Fa-f:.]+)$")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Bad arguments mean the probe could not run: UNKNOWN (3), one line.
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_UNKNOWN)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 0-65535")
    return value


def check_target_url(url: str) -> str:
    """One-line HarnessError for a URL that cannot name a chat target."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise HarnessError(f"malformed target URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https", "ws", "wss"):
        raise HarnessError(f"malformed target URL {url!r}: scheme must be http, https, ws or "
                           "wss")
    if not parts.hostname:
        raise HarnessError(f"malformed target URL {url!r}: no host")
    if not _HOST.match(parts.hostname):
        raise HarnessError(f"malformed target URL {url!r}: bad host {parts.hostname!r}")
    if port == 0:
        raise HarnessError(f"malformed target URL {url!r}: port 0")
    return url


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="chatprobe", description=(
        "Proves customer-service chat delivers: stamped messages from fake customers, "
        "receipt confirmed by probe agents, loss and latency measured honestly."))
    parser.add_argument("--version", action="version", version=f"chatprobe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the reference customer-service chat service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8765, help="0 picks a free port")
    serve.add_argument("--admin-token", default=os.environ.get(ADMIN_TOKEN_ENV),
                       help=f"admin API token (default: ${ADMIN_TOKEN_ENV}, else generated and "
                       "printed; on the command line it is visible to ps)")
    serve.add_argument("--config", type=Path, help="shops/agents YAML or JSON "
                       "(default: fixtures/shops/demo.yaml)")
    serve.add_argument("--db", help="SQLite file (default: ~/.local/state/chatprobe/"
                       "reference-service.sqlite3; ':memory:' for none)")
    serve.add_argument("--tls-cert", type=Path, metavar="FILE",
                       help="serve https:// and wss:// with this certificate chain (PEM)")
    serve.add_argument("--tls-key", type=Path, metavar="FILE", help="its private key (PEM)")

    probe = sub.add_parser("probe", help="send stamped messages and confirm their receipt")
    _probe_arguments(probe, target_required=True)

    swarm = sub.add_parser("swarm", help="peak-promotion load: a Locust swarm of customers")
    swarm.add_argument("--target", required=True, metavar="URL")
    _swarm_arguments(swarm)

    profiles = sub.add_parser("profiles", help="list network profiles, or show one")
    profiles.add_argument("action", nargs="?", choices=["list", "show", "cleanup"],
                          default="list", help="cleanup: remove network namespaces that "
                          "crashed runs left (root)")
    profiles.add_argument("name", nargs="?", help="profile name or YAML file (for show)")

    demo = sub.add_parser("demo", help="start the reference service, run a short swarm and "
                          "build the report")
    _swarm_arguments(demo)
    demo.add_argument("--no-report", action="store_true",
                      help="skip the HTML report (it needs Node.js 20 and npm)")
    demo.set_defaults(duration=30.0, think_scale=0.2)

    canary = sub.add_parser("canary", help="one bounded canary run, for cron (exit 0/1/2/3 "
                            "and one status line)")
    canary.add_argument("--config", type=Path, required=True, metavar="FILE",
                        help="canary config (see fixtures/canary-demo.yaml)")
    canary.add_argument("--json", type=Path, metavar="PATH", help="write the run as JSON")

    history = sub.add_parser("history", help="canary availability and latency per target "
                             "over the last hour, day and week, and recent failures")
    where = history.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, metavar="FILE", help="canary config")
    where.add_argument("--db", type=Path, metavar="PATH", help="the history store itself")
    history.add_argument("--stale-after", type=positive_float, metavar="SECONDS",
                         help="no run for this long means the canary stopped (default: "
                         "the config's stale_after_s, 180)")
    history.add_argument("--failures", type=_positive_int, default=10,
                         help="how many recent failures to list")

    from chatprobe.report.command import add_report_parser

    add_report_parser(sub)
    return parser


def _swarm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", default="midnight-spike",
                        help="promotion shape: a name in fixtures/shapes/ or a YAML file")
    parser.add_argument("--workers", type=_positive_int, default=1,
                        help="Locust worker processes (1: a single local process)")
    parser.add_argument("--duration", type=positive_float, metavar="SECONDS",
                        help="fit the shape into this many seconds")
    parser.add_argument("--script", default="shopper", help="conversation script")
    parser.add_argument("--think-scale", type=positive_float, default=1.0,
                        help="multiply every think time (smaller: more messages/s)")
    parser.add_argument("--config", type=Path, metavar="FILE", help="target config")
    parser.add_argument("--admin-token", default=os.environ.get(ADMIN_TOKEN_ENV),
                        help=f"back-office token (default: ${ADMIN_TOKEN_ENV}; on the command "
                        "line it is visible to ps)")
    parser.add_argument("--sla-ms", type=positive_float)
    parser.add_argument("--deadline-ms", type=positive_float)
    _p99_argument(parser)
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the summary as JSON")
    parser.add_argument("--alluredir", type=Path, metavar="DIR", help="write Allure results")
    parser.add_argument("--csv", metavar="PREFIX", help="also write Locust's CSV files")
    parser.add_argument("--engine", choices=("auto", "compiled", "python"), default="auto",
                        help="the workers' chat loop: compiled (C; the reference protocol over "
                        "ws://), python (every protocol), auto (compiled where it can; the "
                        "default)")
    _profile_arguments(parser)


def _profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", action="append", default=[], metavar="NAME",
                        help="the customers' network profile (fixtures/profiles/ or a YAML "
                        "file); repeat or comma-separate to compare several in one run")
    parser.add_argument("--agent-profile", metavar="NAME",
                        help="the agents' network profile (default: clean)")


def _p99_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--p99-warning-ms", type=positive_float, metavar="MS",
                        help="WARNING when the p99 latency is above this (default: the target "
                        "config's p99_warning_ms, else none)")


def _probe_arguments(parser: argparse.ArgumentParser, target_required: bool) -> None:
    if target_required:
        parser.add_argument("--target", required=True, metavar="URL",
                            help="base URL of the chat service, e.g. http://127.0.0.1:8765")
    parser.add_argument("--messages", type=_positive_int, default=200, metavar="N")
    parser.add_argument("--customers", type=_positive_int, default=10, metavar="K")
    parser.add_argument("--rate", type=positive_float, default=500.0, metavar="MSG_PER_S",
                        help="planned send rate; latency counts from each planned time")
    parser.add_argument("--config", type=Path, metavar="FILE", help="target config "
                        "(default: fixtures/targets/reference.yaml)")
    parser.add_argument("--admin-token", default=os.environ.get(ADMIN_TOKEN_ENV),
                        help=f"back-office token for message traces (default: "
                        f"${ADMIN_TOKEN_ENV}; on the command line it is visible to ps)")
    parser.add_argument("--sla-ms", type=positive_float, help="late after this (default 3000)")
    parser.add_argument("--deadline-ms", type=positive_float,
                        help="lost after this (default 10000)")
    _p99_argument(parser)
    parser.add_argument("--run-id", help="stamp run id (default: random)")
    _profile_arguments(parser)
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the summary as JSON")
    parser.add_argument("--alluredir", type=Path, metavar="DIR", help="write Allure results")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _target_config(args: argparse.Namespace) -> TargetConfig:
    config = with_overrides(load_target(args.config), args.admin_token, args.sla_ms,
                            args.deadline_ms, args.p99_warning_ms)
    if config.deadline_ms < config.sla_ms:
        raise HarnessError("--deadline-ms must be at least --sla-ms")
    return config


def _check_output_paths(args: argparse.Namespace) -> None:
    if args.json is not None and args.json.is_dir():
        raise HarnessError(f"--json {args.json} is a directory")
    if args.alluredir is not None and args.alluredir.exists() and not args.alluredir.is_dir():
        raise HarnessError(f"--alluredir {args.alluredir} is not a directory")


def _report(args: argparse.Namespace, summary: RunSummary, started_s: float) -> int:
    return _report_doc(args, summary.to_json(), started_s)


def _report_doc(args: argparse.Namespace, doc: dict[str, Any], started_s: float) -> int:
    """Print the summary, write --json and --alluredir, and return the exit code."""
    table = render_table(doc)
    print(table, flush=True)
    try:
        if args.json is not None:
            write_json(args.json, doc)
        if args.alluredir is not None:
            _write_allure(args, doc, table, started_s)
    except OSError as exc:
        print(f"chatprobe: cannot write results: {exc}", file=sys.stderr)
        return EXIT_UNKNOWN
    return int(document_status(doc))


def _write_allure(args: argparse.Namespace, doc: dict[str, Any], table: str,
                  started_s: float) -> None:
    """Allure results: a swarm (it has a time series) per profile x SLO, a probe per
    profile."""
    from chatprobe.report.results import SwarmSlos, write_probe_results, write_swarm_results

    config = _target_config(args)
    first = (doc.get("profiles") or [doc])[0]
    if "timeseries" in first:
        write_swarm_results(args.alluredir, doc, table, started_s,
                            SwarmSlos(p99_ms=float(first.get("p99_warning_ms")
                                                   or first["sla_ms"])), config,
                            scenario=str(first.get("shape") or args.shape))
    else:
        write_probe_results(args.alluredir, doc, table, started_s, config)


def cmd_probe(args: argparse.Namespace) -> int:
    from chatprobe.probe import ProbeOptions, print_progress, run_probe
    from chatprobe.stamp import StampError

    target = check_target_url(args.target)
    config = _target_config(args)
    _check_output_paths(args)
    options = ProbeOptions(messages=args.messages, customers=args.customers,
                           rate_per_s=args.rate, run_id=args.run_id,
                           progress=None if args.quiet else print_progress)
    started = time.time()
    if args.profile or args.agent_profile:
        return _probe_with_profiles(args, target, config, options, started)
    try:
        summary = asyncio.run(_interruptible(run_probe(target, config, options)))
    except StampError as exc:
        raise HarnessError(str(exc)) from None
    return _report(args, summary, started)


async def _interruptible(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` so that SIGTERM, like Ctrl-C, cancels it (and it can still hand
    back what it measured) instead of killing the process with nothing written."""
    task = asyncio.ensure_future(coroutine)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    loop.add_signal_handler(signal.SIGINT, task.cancel)
    try:
        return await task
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)


def _probe_with_profiles(args: argparse.Namespace, target: str, config: TargetConfig,
                         options: Any, started: float) -> int:
    from chatprobe.netem.session import probe_profiles
    from chatprobe.profiles import load_profile, load_profiles

    profiles = load_profiles(args.profile or ["clean"])
    agent_profile = load_profile(args.agent_profile) if args.agent_profile else None
    # Interruptible as a plain probe: SIGTERM must also unwind through behind(), which
    # removes the proxy and the kernel layer's namespaces.
    documents = asyncio.run(_interruptible(probe_profiles(target, config, options, profiles,
                                                          agent_profile)))
    return _report_profiles(args, documents, started)


def _report_profiles(args: argparse.Namespace, documents: list[dict[str, Any]],
                     started: float) -> int:
    from chatprobe.netem.session import combine, render_emulation, render_side_by_side

    if len(documents) == 1:
        code = _report_doc(args, documents[0], started)
        print(render_emulation(documents[0]), flush=True)
        return code
    for doc in documents:
        print(f"--- profile {doc['profile']}", flush=True)
        print(render_table(doc), flush=True)
    print("", flush=True)
    print(render_side_by_side(documents), flush=True)
    combined = combine(documents)
    try:
        if args.json is not None:
            write_json(args.json, combined)
        if args.alluredir is not None:
            _write_allure(args, combined, render_side_by_side(documents), started)
    except OSError as exc:
        print(f"chatprobe: cannot write results: {exc}", file=sys.stderr)
        return EXIT_UNKNOWN
    # combine() ranks the profiles: a proven CRITICAL on one outranks an UNKNOWN on another.
    return int(combined["exit_code"])


def cmd_profiles(args: argparse.Namespace) -> int:
    from chatprobe.netem.kernel import cleanup_leftovers
    from chatprobe.netem.session import plan_here
    from chatprobe.profiles import available_profiles, describe, load_profile

    if args.action == "cleanup":
        if os.geteuid() != 0:
            raise HarnessError("profiles cleanup removes network namespaces: run it as root "
                               "(without root, chatprobe creates none)")
        removed = cleanup_leftovers()
        print("removed: " + (", ".join(removed) if removed else "nothing"))
        return 0
    if args.action == "list":
        if args.name:
            raise HarnessError("'profiles list' takes no name; use 'profiles show NAME'")
        for name in available_profiles():
            profile = load_profile(name)
            print(f"{name:<18}{profile.description.splitlines()[0] if profile.description else ''}")
        return 0
    if not args.name:
        raise HarnessError("'profiles show' needs a profile name")
    profile = load_profile(args.name)
    for line in describe(profile):
        print(line)
    print("on this machine:")
    plan = plan_here(profile, "ws://")
    for item in plan:
        state = "emulated" if item.emulated else "NOT emulated"
        print(f"  {item.parameter} = {item.value}: {state} ({item.layer}; {item.why})")
    if not plan:
        print("  nothing to emulate")
    return 0


def cmd_swarm(args: argparse.Namespace) -> int:
    from chatprobe.protocols.base import adapter_for
    from chatprobe.swarm.runner import SwarmOptions, run_swarm

    target = check_target_url(args.target)
    config = _target_config(args)  # validate now: one clear line instead of a Locust traceback
    adapter_for(config.protocol)(target, config)  # an adapter's own config checks, too
    _check_engine(args, target, config)
    _check_output_paths(args)
    started = time.time()
    # SIGTERM unwinds like Ctrl-C (proxies and kernel paths are removed on the way out)
    # instead of ending chatprobe where it stands; while Locust runs, run_swarm turns
    # either signal into a partial summary.
    with _sigterm_as_ctrl_c():
        if args.profile or args.agent_profile:
            return _swarm_with_profiles(args, target, started)
        doc = run_swarm(SwarmOptions.from_args(target, args))
        return _report_doc(args, doc, started)


def _check_engine(args: argparse.Namespace, target: str, config: TargetConfig) -> None:
    """--engine compiled where it cannot run: why, in one line, before anything starts."""
    from chatprobe.swarm.fastref import choose_engine
    from chatprobe.swarm.scripts import load_script

    if args.engine == "compiled":
        choose_engine(args.engine, target, config, script=load_script(args.script))


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _swarm_with_profiles(args: argparse.Namespace, target: str, started: float) -> int:
    from chatprobe.netem.session import ProxyThread, annotate, tls_server_name
    from chatprobe.profiles import load_profile, load_profiles
    from chatprobe.swarm.runner import SwarmOptions, run_swarm

    profiles = load_profiles(args.profile or ["clean"])
    agent_profile = load_profile(args.agent_profile) if args.agent_profile else None
    documents = []
    for profile in profiles:
        customers, agents = ProxyThread(target, profile), ProxyThread(target, agent_profile)
        with customers as customer_url, agents as agent_url:
            print(f"chatprobe swarm: profile {profile.name}"
                  + (f", agents {agent_profile.name}" if agent_profile else ""), flush=True)
            options = SwarmOptions.from_args(customer_url, args)
            options.agent_target = agent_url if agent_url != customer_url else None
            options.tls_server_name = tls_server_name(target)
            doc = run_swarm(options)
        documents.append(annotate(doc, target, profile, agent_profile,
                                  {"customers": customers.proxy, "agents": agents.proxy}))
        if doc.get("partial"):
            break  # stopped by a signal: the profiles after this one do not run
    return _report_profiles(args, documents, started)


def cmd_demo(args: argparse.Namespace) -> int:
    from chatprobe.swarm.runner import SwarmOptions, run_swarm

    config = _target_config(args)
    _check_engine(args, "http://127.0.0.1:1", config)  # the service it starts: not up yet
    _check_output_paths(args)
    if args.profile or args.agent_profile:
        raise HarnessError("the demo runs on a clean network; for profiles use "
                           "'chatprobe swarm --target URL --profile NAME'")
    started = time.time()
    with run_temp_dir("demo") as folder:
        service = ServiceSubprocess(Path(folder) / "demo.sqlite3")
        print(f"chatprobe demo: reference service on {service.base_url}; swarm with shape "
              f"{args.shape} for {args.duration:g} s (+ drain)", flush=True)
        try:
            options = SwarmOptions.from_args(service.base_url, args)
            options.admin_token = options.admin_token or service.admin_token
            doc = run_swarm(options)
        finally:
            service.stop()
        if args.no_report:
            return _report_doc(args, doc, started)
        # The main job ends with the report: this run's results (a fresh folder unless
        # --alluredir names one) into reports/output, its trend across demo runs kept.
        if args.alluredir is None:
            args.alluredir = Path(folder) / "allure-results"
        code = _report_doc(args, doc, started)
        _demo_report(args.alluredir)
    return code


def _demo_report(results: Path) -> None:
    from chatprobe.paths import project_root
    from chatprobe.report.build import build_report, default_history_path

    output = project_root() / "reports" / "output"
    try:
        index = build_report(results, output, history=default_history_path(output),
                             name="chatprobe demo")
    except HarnessError as exc:
        # The run's verdict stands without its report; say why there is none.
        print(f"chatprobe demo: no report: {exc}", file=sys.stderr, flush=True)
        return
    print(f"chatprobe report: {index.as_uri()}", flush=True)


class ServiceSubprocess:
    """`chatprobe serve` on a free port, for demo: a real server in its own process."""

    def __init__(self, db: Path) -> None:
        import secrets
        import subprocess

        self.admin_token = secrets.token_urlsafe(12)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatprobe.cli", "serve", "--port", "0", "--db", str(db)],
            stdout=subprocess.PIPE, text=True,
            env={**os.environ, ADMIN_TOKEN_ENV: self.admin_token})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on " not in line:
            self.stop()
            raise HarnessError("the reference service did not start")
        self.base_url = line.rsplit(" ", 1)[1].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def cmd_canary(args: argparse.Namespace) -> int:
    from chatprobe.canary.config import load_canary
    from chatprobe.canary.runner import run_canary

    try:
        config = load_canary(args.config)
        run, problems = run_canary(config, args.json)
    except HarnessError as exc:
        # Cron and Nagios read one line: the harness could not run, which is UNKNOWN.
        print(f"CHATPROBE CANARY UNKNOWN - {exc}")
        return int(Status.UNKNOWN)
    print(run.status_line())
    for problem in problems:
        print(f"chatprobe canary: {problem}", file=sys.stderr)
    return int(run.status)


def cmd_history(args: argparse.Namespace) -> int:
    from chatprobe.canary.history import HistoryStore, render_history

    stale_after = args.stale_after
    if args.config is not None:
        from chatprobe.canary.config import load_canary

        config = load_canary(args.config)
        path = config.history
        stale_after = stale_after or config.stale_after_s
    else:
        path = args.db
    if not path.exists():
        raise HarnessError(f"no canary history at {path} (has the canary run yet?)")
    # Read-only: a report never creates or changes the canary's store (or its owner).
    store = HistoryStore(path, read_only=True)
    try:
        text, stale = render_history(store, time.time(), stale_after or 180.0, args.failures)
    finally:
        store.close()
    print(text)
    # A stopped canary is itself an alarm: exit 2 lets a second monitor catch it.
    return int(Status.CRITICAL if stale else Status.OK)


def cmd_report(args: argparse.Namespace) -> int:
    from chatprobe.report.command import cmd_report as build

    return build(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from chatprobe.service.runner import serve

    if (args.tls_cert is None) != (args.tls_key is None):
        raise HarnessError("--tls-cert and --tls-key go together")
    tls = (args.tls_cert, args.tls_key) if args.tls_cert is not None else None
    return serve(args.host, args.port, args.config, args.db, args.admin_token, tls)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"serve": cmd_serve, "probe": cmd_probe, "swarm": cmd_swarm, "demo": cmd_demo,
                "profiles": cmd_profiles, "canary": cmd_canary, "history": cmd_history,
                "report": cmd_report}
    try:
        return handlers[args.command](args)
    except HarnessError as exc:
        print(f"chatprobe: {exc}", file=sys.stderr)
        return EXIT_UNKNOWN
    except (KeyboardInterrupt, asyncio.CancelledError):
        # A signal before the run measured anything (a probe cancelled while it logged in
        # or built its network path): nothing to write, UNKNOWN.
        print("chatprobe: interrupted", file=sys.stderr)
        return EXIT_UNKNOWN
    except Exception as exc:  # a harness bug must still be UNKNOWN, in one line
        if os.environ.get("CHATPROBE_DEBUG"):
            raise
        print(f"chatprobe: internal error: {type(exc).__name__}: {exc} "
              "(CHATPROBE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_UNKNOWN


if __name__ == "__main__":
    raise SystemExit(main())
