"""Show and save simulation results: a comparison table, a results directory, plots.

This is the I/O edge of the simulator: `metrics` computes the numbers, this module prints
them with rich and writes JSON, CSV and PNG files. Plots are drawn on
`matplotlib.figure.Figure` objects with the Agg canvas, never through pyplot, so no global
backend or figure registry is touched (safe in tests, threads and headless machines).
matplotlib is imported lazily so printing a table does not pay for it.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from prescient.sim.metrics import SloSpec, Summary, to_deterministic_json
from prescient.sim.records import LoadSample, RequestRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "CSV_COLUMNS",
    "format_table_text",
    "render_table",
    "safe_filename",
    "write_results",
]

CSV_COLUMNS = (
    "request_id",
    "instance_id",
    "arrival_time",
    "prompt_len",
    "output_len",
    "ttft",
    "tpot",
    "e2e",
    "queueing_delay",
    "num_preemptions",
    "num_cached_tokens",
    "rejected",
)
"""Columns of ``requests-<policy>.csv``; times are seconds at 1 µs resolution."""

_BEST_STYLE = "bold green"
_DPI = 120
_LOG_X_DECADES = 2.0  # CDF plots switch to a log x-axis when max/min exceeds 10**this


# ---------------------------------------------------------------------------------------------
# Table


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    ms = x * 1e3
    return f"{ms:.1f}" if abs(ms) < 1000 else f"{ms:.0f}"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


class _Column:
    """One numeric table column: how to read it, show it, and which end is best."""

    def __init__(
        self,
        header: str,
        get: Callable[[Summary], float | None],
        fmt: Callable[[float | None], str],
        best: str | None,  # "min", "max" or None (not marked)
    ) -> None:
        self.header, self.get, self.fmt, self.best = header, get, fmt, best

    def cells(self, summaries: Sequence[Summary]) -> list[Text]:
        values = [self.get(s) for s in summaries]
        shown = [self.fmt(v) for v in values]
        present = [v for v in values if v is not None]
        # Marking a lone policy is noise; ties (as displayed) are all marked.
        best_shown = None
        if self.best is not None and len(summaries) > 1 and present:
            target = min(present) if self.best == "min" else max(present)
            best_shown = self.fmt(target)
        return [Text(text, style=_BEST_STYLE if text == best_shown else "") for text in shown]


def _columns(slo: SloSpec | None) -> list[_Column]:
    cols = [
        _Column("TTFT\nmean\nms", lambda s: s.ttft.mean, _ms, "min"),
        _Column("TTFT\np99\nms", lambda s: s.ttft.p99, _ms, "min"),
        _Column("TPOT\nmean\nms", lambda s: s.tpot.mean, _ms, "min"),
        _Column("TPOT\np99\nms", lambda s: s.tpot.p99, _ms, "min"),
        _Column("E2E\np50\ns", lambda s: s.e2e.p50, _s, "min"),
        _Column("E2E\np99\ns", lambda s: s.e2e.p99, _s, "min"),
        _Column("Queue\np99\nms", lambda s: s.queueing.p99, _ms, "min"),
        _Column("Thru\nreq/s", lambda s: s.throughput_rps, _s, None),
        _Column("Thru\ntok/s", lambda s: s.throughput_tok_s, lambda x: f"{x or 0:.0f}", None),
        _Column("Pre-\nempt", lambda s: s.num_preemptions, lambda x: f"{x or 0:.0f}", None),
    ]
    if slo is not None:
        cols.append(_Column("SLO\nmet", lambda s: s.slo_attainment, _pct, "max"))
    return cols


def _slo_caption(slo: SloSpec) -> str:
    parts = []
    if slo.ttft_s is not None:
        parts.append(f"TTFT <= {slo.ttft_s * 1e3:g} ms")
    if slo.tpot_s is not None:
        parts.append(f"TPOT <= {slo.tpot_s * 1e3:g} ms")
    return "SLO: " + (", ".join(parts) if parts else "completion only")


def _build_table(summaries: Sequence[Summary], slo: SloSpec | None) -> Table:
    notes = [] if slo is None else [_slo_caption(slo)]
    if len(summaries) > 1:
        notes.append(f"best per column in {_BEST_STYLE}")
    caption = "; ".join(notes) or None
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True, caption=caption)
    table.add_column("Policy", overflow="fold")
    table.add_column("Done", justify="right", no_wrap=True)
    columns = _columns(slo)
    for col in columns:
        table.add_column(col.header, justify="right", no_wrap=True)
    per_column = [col.cells(summaries) for col in columns]
    for i, summary in enumerate(summaries):
        done = f"{summary.num_completed}/{summary.num_requests}"
        table.add_row(Text(summary.policy), done, *(cells[i] for cells in per_column))
    return table


def render_table(
    summaries: Sequence[Summary],
    *,
    slo: SloSpec | None = None,
    console: Console | None = None,
) -> None:
    """Print one table comparing policies, in the given order.

    Latency columns mark the lowest value and the SLO column the highest (ties as
    displayed are all marked; nothing is marked for a single policy).

    Args:
        summaries: One summary per policy; rows keep this order.
        slo: The SLO the summaries were computed with; adds the "SLO met" column.
        console: Where to print; a default rich Console (stdout) if None.
    """
    (console or Console()).print(_build_table(summaries, slo))


def format_table_text(summaries: Sequence[Summary], slo: SloSpec | None = None) -> str:
    """Render `render_table`'s table to plain text, 120 columns wide, without styles.

    Args:
        summaries: One summary per policy.
        slo: As for `render_table`.

    Returns:
        The table as text (for tests, logs and the README sample).
    """
    console = Console(record=True, width=120, file=io.StringIO(), color_system=None)
    render_table(summaries, slo=slo, console=console)
    return console.export_text()


# ---------------------------------------------------------------------------------------------
# Files


def safe_filename(name: str) -> str:
    """Replace every character outside ``[A-Za-z0-9_.-]`` with ``_`` (empty -> ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def _unique_stems(names: Sequence[str]) -> dict[str, str]:
    """Map names to distinct safe stems; later collisions get ``-2``, ``-3``, ... suffixes."""
    stems: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        base = stem = safe_filename(name)
        n = 1
        while stem in used:
            n += 1
            stem = f"{base}-{n}"
        used.add(stem)
        stems[name] = stem
    return stems


def _cell(x: float | int | str | None) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.6f}"
    return str(x)


def _write_csv(path: Path, records: Sequence[RequestRecord]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for r in records:
            writer.writerow([_cell(getattr(r, col)) for col in CSV_COLUMNS])


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    # No "Software" metadata, so the bytes do not change with the matplotlib version.
    fig.savefig(path, dpi=_DPI, metadata={"Software": None})
    fig.clear()  # no pyplot registry to close; drop the artists now


def _plot_cdf(
    path: Path,
    values_by_policy: Mapping[str, Sequence[float]],
    *,
    metric: str,
) -> None:
    """Empirical CDF of one latency metric (seconds in, milliseconds on the x axis)."""
    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    all_ms = [v * 1e3 for values in values_by_policy.values() for v in values]
    drew = False
    for policy, values in values_by_policy.items():
        if not values:
            continue
        xs = sorted(v * 1e3 for v in values)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=f"{policy} (n={len(xs)})", linewidth=1.4)
        drew = True
    if drew:
        lo, hi = min(all_ms), max(all_ms)
        if lo > 0 and hi / lo > 10**_LOG_X_DECADES:
            ax.set_xscale("log")
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"{metric} (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0.0, 1.02)
    ax.set_title(f"{metric} CDF")
    ax.grid(True, which="both", alpha=0.3)
    _save(fig, path)


def _plot_load(path: Path, load_by_policy: Mapping[str, Sequence[LoadSample]]) -> None:
    """Per-instance queue length (running + waiting) over time, one subplot per policy."""
    from matplotlib.ticker import MaxNLocator

    policies = list(load_by_policy) or ["(no policies)"]
    fig = _new_figure(8.0, 1.0 + 2.2 * len(policies))
    # Shared y too: the point is to compare how full instances get under each policy.
    axes = fig.subplots(len(policies), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    for ax, policy in zip(axes, policies, strict=True):
        samples = load_by_policy.get(policy, ())
        by_instance: dict[str, tuple[list[float], list[int]]] = {}
        for s in sorted(samples, key=lambda s: s.time):  # stable: ties keep input order
            ts, ns = by_instance.setdefault(s.instance_id, ([], []))
            ts.append(s.time)
            ns.append(s.num_running + s.num_waiting)
        for instance_id in sorted(by_instance):
            ts, ns = by_instance[instance_id]
            ax.step(ts, ns, where="post", linewidth=0.8, label=instance_id)
        if not by_instance:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        elif len(by_instance) <= 8:
            ax.legend(loc="upper right", fontsize="x-small", ncols=min(4, len(by_instance)))
        ax.set_title(policy, fontsize="medium")
        ax.set_ylabel("running + waiting")
        ax.grid(True, alpha=0.3)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("time (s)")
    _save(fig, path)


def write_results(
    out_dir: Path,
    *,
    summaries: Sequence[Summary],
    records_by_policy: Mapping[str, Sequence[RequestRecord]],
    load_by_policy: Mapping[str, Sequence[LoadSample]],
    scenario: Mapping[str, object],
) -> list[Path]:
    """Write a run's results directory.

    Files: ``results.json`` (scenario and summaries, floats to 6 significant digits, sorted
    keys, so equal runs give equal bytes), ``requests-<policy>.csv`` per policy (columns
    `CSV_COLUMNS`, seconds with 1 µs resolution, empty cells for missing values),
    ``ttft_cdf.png``, ``tpot_cdf.png`` and ``load_timeline.png``. Policy names are made
    filename-safe with `safe_filename`; names that collide after that get a numeric suffix.

    Args:
        out_dir: Directory to create (parents too) or reuse; existing files are overwritten.
        summaries: One summary per policy, stored in this order.
        records_by_policy: Every request record of each policy's run.
        load_by_policy: Load samples of each policy's run.
        scenario: What was simulated (plain data, Structs or paths), stored as given.

    Returns:
        The paths written, in the order above.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    results = out_dir / "results.json"
    payload = {"scenario": dict(scenario), "summaries": list(summaries)}
    results.write_bytes(to_deterministic_json(payload, indent=2) + b"\n")
    written.append(results)

    stems = _unique_stems(list(records_by_policy))
    for policy, records in records_by_policy.items():
        path = out_dir / f"requests-{stems[policy]}.csv"
        _write_csv(path, records)
        written.append(path)

    for metric, filename, get in (
        ("TTFT", "ttft_cdf.png", lambda r: r.ttft),
        ("TPOT", "tpot_cdf.png", lambda r: r.tpot),
    ):
        values = {
            policy: [v for r in records if (v := get(r)) is not None]
            for policy, records in records_by_policy.items()
        }
        _plot_cdf(out_dir / filename, values, metric=metric)
        written.append(out_dir / filename)

    timeline = out_dir / "load_timeline.png"
    _plot_load(timeline, load_by_policy)
    written.append(timeline)
    return written
