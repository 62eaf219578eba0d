"""Builds chatprobe's HTML report with Allure 3 (npm package ``allure``, no Java): one
self-contained ``index.html`` that opens from ``file://``.

Allure 3 is pinned in ``reports/package.json`` + ``package-lock.json`` and installed on first
use with ``npm ci`` into ``reports/node_modules``; later builds are offline. The allurerc is
generated per build in a temporary folder (never in the results), carries chatprobe's
categories (Allure 3 ignores ``categories.json``) and a bounded JSONL history for trends.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from chatprobe import __version__
from chatprobe.errors import HarnessError
from chatprobe.paths import project_root, run_temp_dir
from chatprobe.report.categories import allure_categories

ALLURE_VERSION = "3.18.0"  # the exact version in reports/package.json (a test checks)
# Runs kept in the history file (Allure's historyLimit). Every kept run is also embedded in
# each report, so this bounds both the JSONL file and the report's size: about 1 KB per result
# per run (name, status, message, trace, labels). A cron canary writing 1,440 runs a day keeps
# its last 100 reports' worth; raise it with --history-limit for longer memory.
DEFAULT_HISTORY_LIMIT = 100
# The trend charts (status and duration dynamics, transitions, ...) show this many runs;
# Allure's default is 10, too short for a canary. The per-test History tab shows every kept run.
TREND_POINTS = 30
MARKER = ".chatprobe-report"  # marks an output folder as ours, so a rebuild may replace it
NODE_MAJOR = 20
NPM_TIMEOUT_S = 600.0
ALLURE_TIMEOUT_S = 600.0
# Allure 3's history charts (@allurereport/charts-api ChartType values) that take a limit.
_HISTORY_CHARTS = ("statusDynamics", "statusTransitions", "testBaseGrowthDynamics",
                   "durationDynamics", "statusAgePyramid")
# The awesome plugin's page template always includes Google Analytics (analyticsEnable is
# hard-coded true in 3.18): an incident report opened from disk must not call out, so it goes.
_ANALYTICS = re.compile(
    r'<script async src="https://www\.googletagmanager\.com/gtag/js[^"]*"></script>\s*'
    r"<script>(?:(?!</script>).)*?gtag\((?:(?!</script>).)*?</script>", re.DOTALL)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NPM_PREFIX = re.compile(r"^npm (?:error|ERR!)\s*")


def reports_dir() -> Path:
    """The checkout's reports/ folder (package.json, lock file, node_modules)."""
    return project_root() / "reports"


def default_history_path(output: Path) -> Path:
    """The history file of an output folder: next to it, named after it, so two report
    folders side by side (say canary and swarm) keep separate trends."""
    return output.parent / f"{output.name}-history.jsonl"


def build_report(results: Path, output: Path, *, history: Path | None = None,
                 history_limit: int = DEFAULT_HISTORY_LIMIT, name: str = "chatprobe",
                 variables: Mapping[str, str] | None = None) -> Path:
    """Build the single-file report of ``results`` into ``output`` (replacing an earlier
    chatprobe report there) and return its ``index.html``.

    ``history`` (default: :func:`default_history_path`) gains one line per build and keeps
    the last ``history_limit``. ``variables`` are shown on the overview page; do not put
    secrets there. Raises HarnessError (one line) for bad input or a failed build.
    """
    results = results.expanduser().absolute()
    output = output.expanduser().absolute()
    history = (history.expanduser().absolute() if history is not None
               else default_history_path(output))
    _check_inputs(results, output, history, history_limit)
    allure = ensure_allure()
    shown = {"chatprobe": __version__, **(variables or {})}
    try:
        return _build(allure, results, output, history, history_limit, name, shown)
    except OSError as exc:  # a full disk, a read-only folder: the user's to fix, in one line
        raise HarnessError(f"cannot build the report in {output}: {exc}") from None


def _build(allure: Path, results: Path, output: Path, history: Path, history_limit: int,
           name: str, shown: Mapping[str, str]) -> Path:
    _write_allure2_categories(results)
    output.parent.mkdir(parents=True, exist_ok=True)
    history.parent.mkdir(parents=True, exist_ok=True)
    with _locked(output.parent / f".{output.name}.lock"), \
            _locked(history.with_name(history.name + ".lock")):
        _clear_killed_build(output)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.new-", dir=output.parent))
        try:
            staging.chmod(0o755)  # mkdtemp makes it private; a report is for reading
            with run_temp_dir("allurerc") as config_dir:
                config = Path(config_dir) / "allurerc.mjs"
                config.write_text(allurerc(staging, history, history_limit, name, shown,
                                           allure.parent), encoding="utf-8")
                _run_allure(allure, config, results)
            index = staging / "index.html"
            if not index.is_file():
                raise HarnessError(f"Allure wrote no index.html for {results}")
            index.write_text(_strip_analytics(index.read_text(encoding="utf-8")),
                             encoding="utf-8")
            (staging / MARKER).write_text(json.dumps({"allure": ALLURE_VERSION}) + "\n",
                                          encoding="utf-8")
            _replace(output, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return output / "index.html"


def allurerc(output: Path, history: Path, history_limit: int, name: str,
             variables: Mapping[str, str], allure_package: Path) -> str:
    """The Allure 3 config (an ES module) for one build.

    Values go in as JSON, which is valid JavaScript. The trend charts are Allure's own
    defaults with a longer limit, imported from the pinned package so that an upgrade keeps
    its new charts.
    """
    charts_api = allure_package.parent / "@allurereport" / "charts-api" / "dist" / "index.js"
    config = {
        "name": name,
        "output": str(output),
        "historyPath": str(history),
        "historyLimit": history_limit,
        "categories": allure_categories(),
        "variables": dict(variables),
    }
    awesome = {"singleFile": True, "reportName": name}
    return (
        "// Generated by chatprobe.report.build for one build; not kept.\n"
        f"import {{ defaultChartsConfig }} from {json.dumps(charts_api.as_uri())};\n"
        f"const historyCharts = new Set({json.dumps(list(_HISTORY_CHARTS))});\n"
        f"const config = {json.dumps(config, indent=2)};\n"
        f"const awesome = {json.dumps(awesome)};\n"
        "awesome.charts = defaultChartsConfig.map((chart) =>\n"
        f"  historyCharts.has(chart.type) ? {{ ...chart, limit: {TREND_POINTS} }} : chart);\n"
        "config.plugins = { awesome: { options: awesome } };\n"
        "export default config;\n"
    )


def ensure_allure(reports: Path | None = None) -> Path:
    """The pinned Allure CLI (``node_modules/allure/cli.js``), installed with ``npm ci`` when
    missing or when the lock file changed since the last install."""
    reports = reports if reports is not None else reports_dir()
    lock_file = reports / "package-lock.json"
    if not (reports / "package.json").is_file() or not lock_file.is_file():
        raise HarnessError(f"{reports} has no package.json and package-lock.json (run from "
                           "the chatprobe checkout or set CHATPROBE_HOME to it)")
    _node()
    cli = reports / "node_modules" / "allure" / "cli.js"
    stamp = reports / "node_modules" / ".chatprobe-installed"
    want = hashlib.sha256(lock_file.read_bytes()).hexdigest()
    if cli.is_file() and _read(stamp) == want:
        return cli
    # pytest-xdist workers (or two shells) may all arrive here: one installs, the others
    # wait and find it done.
    with _locked(reports / ".npm-install.lock"):
        if cli.is_file() and _read(stamp) == want:
            return cli
        _npm_ci(reports)
        if not cli.is_file():
            raise HarnessError(f"npm ci did not install Allure into {reports / 'node_modules'}")
        stamp.write_text(want, encoding="utf-8")
    return cli


def _check_inputs(results: Path, output: Path, history: Path, history_limit: int) -> None:
    if not results.exists():
        raise HarnessError(f"no Allure results at {results} (a run writes them with "
                           "--alluredir DIR)")
    if not results.is_dir():
        raise HarnessError(f"Allure results {results} is not a directory")
    if not any(results.glob("*-result.json")):
        raise HarnessError(f"{results} holds no Allure results (no *-result.json files)")
    if "\\" in str(results):
        # Allure reads paths with Windows separators; a backslash would split the name.
        raise HarnessError(f"Allure cannot read a results path with a backslash: {results}")
    real_results, real_output = results.resolve(), output.resolve()
    if real_output == real_results or real_output.is_relative_to(real_results):
        raise HarnessError(f"the report {output} must not be inside the results {results}")
    if real_results.is_relative_to(real_output):
        raise HarnessError(f"the results {results} must not be inside the report {output}")
    if output.exists():
        if not output.is_dir():
            raise HarnessError(f"report output {output} is not a directory")
        if any(output.iterdir()) and not (output / MARKER).is_file():
            raise HarnessError(f"refusing to replace {output}: it holds files but no earlier "
                               "chatprobe report; choose a new or empty directory")
    if history.is_dir():
        raise HarnessError(f"history file {history} is a directory")
    if history_limit < 1:
        raise HarnessError(f"the history limit must be at least 1, not {history_limit}")


def _write_allure2_categories(results: Path) -> None:
    """categories.json in the results, for Allure 2 users (Allure 3 takes the allurerc's)."""
    path = results / "categories.json"
    text = json.dumps(allure_categories(), indent=2) + "\n"
    # A read-only results folder (someone else's artefact) only loses the Allure 2 extra.
    with contextlib.suppress(OSError):
        if _read(path) != text:
            path.write_text(text, encoding="utf-8")


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        raise HarnessError(f"node is not installed: chatprobe report needs Node.js "
                           f"{NODE_MAJOR}+ and npm (Debian: apt-get install nodejs npm)")
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.strip()
        major = int(version.lstrip("v").split(".")[0])
    except (OSError, subprocess.SubprocessError, ValueError):
        raise HarnessError(f"cannot tell the version of {node}") from None
    if major < NODE_MAJOR:
        raise HarnessError(f"Allure 3 needs Node.js {NODE_MAJOR}+, {node} is {version}")
    return node


def _npm_ci(reports: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise HarnessError("npm is not installed: chatprobe report installs Allure 3 with it "
                           "(Debian: apt-get install npm)")
    log = reports / ".npm-install.log"
    print(f"chatprobe: installing Allure {ALLURE_VERSION} with npm into "
          f"{reports / 'node_modules'} (first run only; log: {log})", file=sys.stderr)
    env = {**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false",
           "npm_config_audit": "false", "npm_config_progress": "false"}
    try:
        with log.open("w", encoding="utf-8") as out:
            done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                                  cwd=reports, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=NPM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise HarnessError(f"npm ci took over {NPM_TIMEOUT_S:.0f} s (registry unreachable?); "
                           f"log: {log}") from None
    except OSError as exc:
        raise HarnessError(f"cannot run npm: {exc}") from None
    if done.returncode != 0:
        raise HarnessError(f"npm ci failed (exit {done.returncode}): "
                           f"{_gist(_read(log) or '')}; log: {log}")


def _run_allure(cli: Path, config: Path, results: Path) -> None:
    # The results folder is Allure's working directory and "." its pattern: Allure treats
    # result paths as glob patterns, and a folder named like "runs[1]" must still work.
    command = [_node(), str(cli), "generate", "--config", str(config), "--cwd", str(results),
               "."]
    env = {**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "0"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env,
                              stdin=subprocess.DEVNULL, timeout=ALLURE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise HarnessError(f"allure generate took over {ALLURE_TIMEOUT_S:.0f} s") from None
    except OSError as exc:
        raise HarnessError(f"cannot run Allure: {exc}") from None
    if done.returncode != 0:
        raise HarnessError(f"allure generate failed (exit {done.returncode}): "
                           f"{_gist(done.stderr + done.stdout)}")


def _strip_analytics(html: str) -> str:
    return _ANALYTICS.sub("", html, count=1)


def _clear_killed_build(output: Path) -> None:
    """Under the lock no other build of this report runs: a staging or old folder beside it
    was left by a build that was killed. One killed between its two renames (see
    :func:`_replace`) left no report: its finished new one goes in place (the marker is
    written last), else the old one."""
    name = glob.escape(output.name)

    def left(kind: str, suffix: str) -> list[Path]:
        # Exactly the names _build and _replace make: never another report's folders.
        found = output.parent.glob(f".{name}.{kind}-{suffix}")
        return sorted(found, key=lambda path: path.stat().st_mtime)

    olds, news = left("old", "[0-9a-f]" * 8), left("new", "?" * 8)
    if not output.exists():
        finished = [folder for folder in news if (folder / MARKER).is_file()]
        if finished:
            news.remove(finished[-1])
            finished[-1].rename(output)
        elif olds:
            olds.pop().rename(output)
    for stale in [*olds, *news]:
        shutil.rmtree(stale, ignore_errors=True)


def _replace(output: Path, staging: Path) -> None:
    """Put the new report in place; the old one goes only once the new one is there."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        output.rename(old)
    try:
        staging.rename(output)
    except OSError:
        if old is not None:
            old.rename(output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) held for the block; the file itself stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _gist(text: str) -> str:
    """One line from a tool's output: its first two meaningful lines (no npm prefixes,
    colours, stack frames or error codes)."""
    lines = []
    for raw in text.splitlines():
        line = _NPM_PREFIX.sub("", _ANSI.sub("", raw).strip())
        if line and not line.startswith(("at ", "code ")):
            lines.append(line)
    gist = "; ".join(lines[:2]) or "no output"
    return gist if len(gist) <= 400 else gist[:397] + "..."
