"""Plots for the report (matplotlib, PNG bytes; no display, no global pyplot state).

What a person should see at a glance: when latency rose against the load on the same time
axis, when messages were lost or late, and how the latency distribution differs across
network profiles.
"""

from __future__ import annotations

import io
import math
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from chatprobe.histogram import LatencyHistogram

PERCENTILES = (50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 99.99)
DPI = 100


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _series(document: dict[str, Any], key: str) -> list[float]:
    return [float(row.get(key) or 0.0) for row in document.get("timeseries") or []]


def _latency(document: dict[str, Any], key: str) -> list[float]:
    """A latency series with gaps where nothing was delivered (not a fake drop to 0)."""
    return [float(row[key]) if row.get(key) and row.get("delivered_per_s", 1) else math.nan
            for row in document.get("timeseries") or []]


def _label(document: dict[str, Any]) -> str:
    return str(document.get("profile", "clean"))


def _finish_panel(axis: Axes, load: Axes) -> None:
    """The load axis labelled, one legend for both axes, the shared time axis named."""
    load.set_ylabel("users")
    lines, names = axis.get_legend_handles_labels()
    more, more_names = load.get_legend_handles_labels()
    axis.legend(lines + more, names + more_names, loc="upper left", fontsize="small")
    axis.set_xlabel("time since start (s)")


def latency_over_time(documents: list[dict[str, Any]]) -> bytes:
    """p50 and p99 per time bin (left axis) with the number of users (right axis), one
    panel per network profile (profiles run one after the other, each on its own clock)."""
    figure = Figure(figsize=(10, 3.2 * len(documents)))
    for index, document in enumerate(documents):
        axis = figure.add_subplot(len(documents), 1, index + 1)
        times = _series(document, "t_s")
        p99 = _latency(document, "p99_ms")
        axis.plot(times, _latency(document, "p50_ms"), label="p50", color="tab:blue")
        axis.plot(times, p99, label="p99", color="tab:red")
        sla = float(document.get("sla_ms") or 0)
        highest = max((v for v in p99 if not math.isnan(v)), default=0.0)
        title = f"latency and load over time [{_label(document)}]"
        # The SLA line only where it does not flatten the curves it is compared with.
        if sla and highest > sla / 3:
            axis.axhline(sla, color="tab:red", linestyle=":", linewidth=1,
                         label=f"SLA {sla:g} ms")
        elif sla:
            title += f" (SLA {sla:g} ms, off the scale)"
        axis.set_ylim(bottom=0)
        axis.set_ylabel("latency (ms)")
        axis.set_title(title)
        load = axis.twinx()
        load.fill_between(times, _series(document, "users"), step="post", alpha=0.15,
                          color="tab:gray", label="users")
        _finish_panel(axis, load)
    figure.tight_layout()
    return _png(figure)


def loss_over_time(documents: list[dict[str, Any]]) -> bytes:
    """Lost and late messages per time bin, with the users, one panel per profile."""
    figure = Figure(figsize=(10, 3.0 * len(documents)))
    for index, document in enumerate(documents):
        axis = figure.add_subplot(len(documents), 1, index + 1)
        times = _series(document, "t_s")
        width = (times[1] - times[0]) * 0.8 if len(times) > 1 else 1.0
        lost, late = _series(document, "lost"), _series(document, "late")
        axis.bar(times, lost, width=width, color="tab:red", label="lost", align="edge")
        axis.bar(times, late, width=width, bottom=lost, color="tab:orange", label="late",
                 align="edge")
        axis.set_ylabel("messages per bin")
        axis.set_title(f"lost and late over time [{_label(document)}] (total lost "
                       f"{document.get('lost', 0)}, late {document.get('late', 0)})")
        load = axis.twinx()
        load.plot(times, _series(document, "users"), color="tab:gray", linewidth=1,
                  label="users")
        _finish_panel(axis, load)
    figure.tight_layout()
    return _png(figure)


def latency_by_profile(documents: list[dict[str, Any]]) -> bytes:
    """The latency distribution of each profile side by side: latency at each percentile,
    from the run's exact histogram (x: how rare, on a log scale)."""
    figure = Figure(figsize=(10, 4.5))
    axis = figure.add_subplot(1, 1, 1)
    positions = [-math.log10(1 - p / 100) for p in PERCENTILES]
    for document in documents:
        encoded = document.get("latency_histogram")
        if not encoded:
            continue
        histogram = LatencyHistogram.decode(encoded)
        if histogram.count == 0:
            continue
        values = [histogram.percentile_us(p) / 1000 for p in PERCENTILES]
        axis.plot(positions, values, marker="o", label=f"{_label(document)} "
                  f"(n={histogram.count})")
    axis.set_xticks(positions, [f"p{p:g}" for p in PERCENTILES])
    axis.set_ylabel("latency (ms)")
    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(ScalarFormatter())
    axis.yaxis.set_minor_formatter(ScalarFormatter())
    axis.set_title("latency distribution per network profile")
    axis.grid(True, which="both", alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="upper left")
    figure.tight_layout()
    return _png(figure)


def swarm_plots(documents: list[dict[str, Any]]) -> dict[str, bytes]:
    """The plots attached to each swarm result, by attachment name."""
    return {"latency and load over time.png": latency_over_time(documents),
            "lost and late over time.png": loss_over_time(documents),
            "latency per network profile.png": latency_by_profile(documents)}
