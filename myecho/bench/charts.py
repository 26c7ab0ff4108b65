"""PNG charts of a run, one per table, for a reader who looks once.

Each bar is the table's figure (a median); its whisker reaches the p99 where
the run has one (single connection, round-trip latency), else the slowest
and fastest of the repeated runs. A figure that is only a lower bound (the
ramp reached its limit: "≥") is hatched and says "≥". A bar that is missing
says why: "fails" (the scenario lost connections or echoes) or "not
measured". Log axes are ticked by decades, in words: 10 µs, 1 ms, 1k.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from myecho.bench.report import fmt_time
from myecho.bench.scenarios import ModelResult, MultiResult
from myecho.bench.stats import Summary

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from myecho.bench.report import Report


@dataclass
class Bar:
    """One bar: its height, its whisker, and what to say about it."""

    value: float | None
    high: float | None = None  # the whisker's top (p99, or the slowest run)
    low: float | None = None  # the whisker's bottom (the fastest run), else the bar's top
    lower_bound: bool = False  # "≥": the true figure is higher
    missing: str = "not measured"  # said where value is None
    label: str = ""  # said above the bar


Series = list[tuple[str, list[Bar]]]


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def fmt_count(value: float) -> str:
    """1, 10, 100, 1k, 10k, 1M: a tick's count in words."""
    for suffix, size in (("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def fmt_seconds_tick(value: float) -> str:
    return fmt_time(value) if value > 0 else "0"


@dataclass
class Axis:
    """How a panel's y axis reads: its label, log or linear, its ticks' words."""

    label: str
    log: bool
    tick: Callable[[float], str]


TIME = Axis("seconds (log scale)", True, fmt_seconds_tick)


def summary_bar(summary: Summary | None) -> Bar:
    """A median with its p99 as the whisker."""
    if summary is None:
        return Bar(None)
    return Bar(summary.median, high=summary.p99)


def runs_bar(value: float | None, runs: Sequence[float], complete: bool = True) -> Bar:
    """A median of runs, with the fastest and slowest run as the whisker."""
    if not complete:
        return Bar(None, missing="fails")
    if value is None:
        return Bar(None)
    return Bar(value, high=max(runs) if runs else None, low=min(runs) if runs else None)


def _limits(series: Series, log: bool, headroom: float) -> tuple[float, float]:
    """Decade-aligned limits on a log axis (so at least two ticks are labelled)."""
    values = [v for _, bars in series for b in bars for v in (b.value, b.high, b.low) if v is not None and v > 0]
    if not values:
        return (1.0, 10.0) if log else (0.0, 1.0)
    if not log:
        return 0.0, max(values) * (1.1 + headroom)
    low = 10 ** math.floor(math.log10(min(values)))
    high = 10 ** (math.ceil(math.log10(max(values) * 1.2)) + headroom)
    return low, max(high, low * 10)


def measured(series: Series) -> bool:
    """Whether any bar of ``series`` has a figure."""
    return any(bar.value is not None for _, bars in series for bar in bars)


def draw(ax: Axes, title: str, labels: list[str], series: Series, axis: Axis, headroom: float = 0.0) -> None:
    """Grouped bars, one group per model, one bar per series."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    width = 0.8 / max(1, len(series))
    bottom, top = _limits(series, axis.log, headroom)
    any_bound = False
    for k, (legend, bars) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        drawn = ax.bar(
            xs,
            [b.value if b.value is not None else math.nan for b in bars],
            width,
            label=legend if len(series) > 1 else None,
        )
        color = drawn.patches[0].get_facecolor() if drawn.patches else None
        for x, bar, patch in zip(xs, bars, drawn.patches, strict=True):
            if bar.value is None:
                ax.annotate(
                    bar.missing,
                    (x, 0),
                    xycoords=("data", "axes fraction"),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    rotation=90,
                    fontsize=7,
                    color="firebrick" if bar.missing == "fails" else "grey",
                )
                continue
            if bar.lower_bound:
                any_bound = True
                patch.set_hatch("///")
                patch.set_edgecolor("white")
            if bar.high is not None:
                low = bar.low if bar.low is not None else bar.value
                ax.errorbar(
                    [x],
                    [bar.value],
                    yerr=[[max(0.0, bar.value - low)], [max(0.0, bar.high - bar.value)]],
                    fmt="none",
                    ecolor="black",
                    elinewidth=0.8,
                    capsize=2,
                )
            if bar.label:
                ax.annotate(
                    bar.label,
                    (x, bar.value),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    rotation=90,
                    fontsize=7,
                    color=color if color is not None and not bar.lower_bound else "black",
                )
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    if axis.log and measured(series):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, numticks=30))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: axis.tick(value)))
    ax.set_ylim(bottom, top)
    if not measured(series):
        ax.set_yticks([])  # an empty panel says "not measured", not a scale of nothing
    ax.set_ylabel(axis.label)
    ax.set_title(title, fontsize=10)
    if len(series) > 1 or any_bound:
        from matplotlib.patches import Patch

        handles, names = ax.get_legend_handles_labels()
        if any_bound:
            handles.append(Patch(facecolor="grey", edgecolor="white", hatch="///"))
            names.append("≥: at least (the ramp reached its limit)")
        ax.legend(handles, names, fontsize=8, loc="upper left", ncols=min(len(names), 5))
    ax.grid(axis="y", alpha=0.3)


def write(report: Report, directory: Path) -> list[Path]:
    """single.png, multi.png, throughput.png, cost.png and pipeline.png in
    ``directory``, each when the run measured something it shows; returns
    their paths."""
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in figures(report):
        path = directory / f"{name}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def figures(report: Report) -> list[tuple[str, Figure]]:
    """The charts of ``report``, by name, drawn but not saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.rows_of()
    labels = [r.label for r in rows]
    subtitle = report.chart_subtitle()
    settings = report.meta.get("settings", {})
    drawn: list[tuple[str, Figure]] = []

    def chart(name: str, title: str, panels: list[tuple[str, Series, Axis, float]], names: list[str] = labels) -> None:
        """One figure of stacked panels; none when the run measured nothing it shows."""
        if not any(measured(series) for _, series, _, _ in panels):
            return
        fig, axes = plt.subplots(len(panels), 1, figsize=(max(9.0, 0.9 * len(names)), 4.6 * len(panels)), squeeze=False)
        fig.suptitle(f"{title}\n{subtitle}", fontsize=11)
        for ax, (panel, series, axis, headroom) in zip(axes[:, 0], panels, strict=True):
            draw(ax, panel, names, series, axis, headroom)
        fig.tight_layout()
        drawn.append((name, fig))

    # ---- single connection ---------------------------------------------------
    def single(field: str) -> list[Bar]:
        return [summary_bar(getattr(r.single, field) if r.single else None) for r in rows]

    trials = settings.get("trials", "?")
    chart(
        "single",
        "Single connection: a fresh connection per trial",
        [
            (
                f"bar: median of {trials} trials; whisker: p99",
                [
                    ("connect", single("connect")),
                    ("exchange 1", single("exchange1")),
                    ("exchange 2", single("exchange2")),
                    ("exchange 1, back to back", single("exchange1_back_to_back")),
                ],
                TIME,
                0.3,
            )
        ],
    )

    # ---- multiple connections -------------------------------------------------
    counts = sorted({m.connections for r in rows for m in r.multi})

    def multi(count: int, field: str) -> list[Bar]:
        bars = []
        for r in rows:
            m: MultiResult | None = r.multi_for(count)
            if m is None:
                bars.append(Bar(None))
            else:
                runs = m.open_runs if field == "open" else m.messages_runs
                bars.append(runs_bar(m.open_s if field == "open" else m.messages_s, runs, m.complete))
        return bars

    times: Series = []
    for count in counts:
        times.append((f"{count:,} connections opened", multi(count, "open")))
        times.append((f"{count:,} messages", multi(count, "messages")))

    def maximum(r: ModelResult) -> Bar:
        if r.ramp is None:
            return Bar(None)
        if r.ramp.completed:
            return Bar(float(r.ramp.maximum), lower_bound=True, label=f"≥ {r.ramp.maximum:,}")
        return Bar(float(r.ramp.maximum), label=f"{r.ramp.maximum:,} ({r.ramp.stop_reason})")

    repeats = settings.get("repeats", "?")
    chart(
        "multi",
        "Multiple connections: N opened at once, then one message on each",
        [
            (f"time (bar: median of {plural(repeats, 'run') if isinstance(repeats, int) else repeats}; "
             "whisker: fastest to slowest run)", times, TIME, 0.3),
            ("Maximum concurrent connections, every echo correct", [("maximum", [maximum(r) for r in rows])],
             Axis("connections (log scale)", True, fmt_count), 1.5),
        ],
    )  # fmt: skip

    # ---- round trips ---------------------------------------------------------
    clients = sorted({t.clients for r in rows for t in r.throughput})

    def rate(n: int) -> list[Bar]:
        bars = []
        for r in rows:
            t = r.throughput_for(n)
            bars.append(runs_bar(t.round_trips_per_s, t.runs) if t is not None else Bar(None))
        return bars

    def latency(n: int) -> list[Bar]:
        bars = []
        for r in rows:
            t = r.throughput_for(n)
            bars.append(Bar(t.p50_s, high=t.p99_s) if t is not None and t.p50_s is not None else Bar(None))
        return bars

    chart(
        "throughput",
        "Round trips: each client sends, waits for its echo, sends again",
        [
            ("round trips per second (bar: median of runs; whisker: slowest to fastest run)",
             [(plural(n, "client"), rate(n)) for n in clients], Axis("round trips / s", False, fmt_count), 0.15),
            ("latency of one round trip (bar: p50; whisker: p99)",
             [(plural(n, "client"), latency(n)) for n in clients], TIME, 0.3),
        ],
    )  # fmt: skip

    # ---- cost ----------------------------------------------------------------
    big = max(counts, default=1000)

    def cpu_per_echo(r: ModelResult) -> Bar:
        t = r.throughput_for(32)
        return Bar(t.server_cpu_per_echo_s if t else None)

    def cpu_per_connection(r: ModelResult) -> Bar:
        m = r.multi_for(big)
        return Bar(m.server_cpu_per_connection_s if m else None)

    def memory(r: ModelResult, field: str) -> Bar:
        m = r.multi_for(big)
        found = getattr(m.memory, field) if m is not None and m.memory is not None else None
        return Bar(found / 2**20 if found else None)

    chart(
        "cost",
        "What an echo costs the server (all its processes)",
        [
            ("server CPU time",
             [("per echo, 32 clients", [cpu_per_echo(r) for r in rows]),
              (f"per connection, {big:,} at once", [cpu_per_connection(r) for r in rows])], TIME, 0.3),
            (f"server memory with {big:,} connections open",
             [("RSS sum", [memory(r, "rss_bytes") for r in rows]),
              ("PSS sum (shared pages divided)", [memory(r, "pss_bytes") for r in rows])],
             Axis("MiB (log scale)", True, fmt_count), 0.3),
        ],
    )  # fmt: skip

    # ---- the ZeroMQ pipeline -------------------------------------------------
    pipeline: list[dict[str, Any]] = report.meta.get("pipeline") or []
    if pipeline:
        bars = [
            Bar(float(run["jobs_per_second"]), label="" if run["exactly_once"] else "jobs lost or twice")
            for run in pipeline
        ]
        jobs = pipeline[0]["jobs"]
        chart(
            "pipeline",
            "ZeroMQ pipeline: ventilator, N workers, sink (PUSH/PULL over ipc)",
            [(f"jobs per second ({jobs:,} jobs, each checked done exactly once)", [("jobs / s", bars)],
              Axis("jobs / s", False, fmt_count), 0.1)],
            [plural(run["workers"], "worker") for run in pipeline],
        )  # fmt: skip
    return drawn
