"""``chatprobe report``: build the single-file HTML report from Allure results and say where
it is. Defaults live in the checkout: results ``reports/allure-results``, output
``reports/output``, history next to the output (``reports/output-history.jsonl``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from chatprobe.paths import project_root
from chatprobe.report.build import (
    DEFAULT_HISTORY_LIMIT,
    TREND_POINTS,
    build_report,
    default_history_path,
)


def _history_limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def add_report_parser(subparsers: argparse._SubParsersAction[Any]) -> argparse.ArgumentParser:
    """Add ``report`` to the ``chatprobe`` sub-commands and return its parser."""
    report: argparse.ArgumentParser = subparsers.add_parser(
        "report", help="build the Allure HTML report (one file that opens from disk)")
    report.add_argument("--results", type=Path, metavar="DIR",
                        help="Allure results (default: reports/allure-results in the checkout)")
    report.add_argument("--output", type=Path, metavar="DIR",
                        help="report folder, replaced on each build (default: reports/output)")
    report.add_argument("--history", type=Path, metavar="FILE",
                        help="trend history, one JSON line per build (default: "
                        "OUTPUT-history.jsonl next to the output folder)")
    report.add_argument("--history-limit", type=_history_limit, default=DEFAULT_HISTORY_LIMIT,
                        metavar="N", help="builds kept in the history (default: "
                        f"{DEFAULT_HISTORY_LIMIT}; the trend charts show the last {TREND_POINTS})")
    report.add_argument("--name", default="chatprobe", help="report title")
    return report


def cmd_report(args: argparse.Namespace) -> int:
    """Build the report; print ``chatprobe report: file:///.../index.html``. HarnessError
    (one line, exit 3 in the CLI) for bad input or a failed build."""
    reports = project_root() / "reports"
    results: Path = args.results if args.results is not None else reports / "allure-results"
    output: Path = args.output if args.output is not None else reports / "output"
    history: Path = (args.history if args.history is not None
                     else default_history_path(output.expanduser().absolute()))
    index = build_report(results, output, history=history, history_limit=args.history_limit,
                         name=args.name)
    print(f"chatprobe report: {index.as_uri()}")
    return 0
