"""RunReport: who ran what, when, at which tier, moving how many bytes.

This is stage 7 of crowdgraph's flow.  The driver records every load,
unload and task as the executor reports it; the report prints a
per-worker table, exports JSON and draws a timeline (a Gantt chart with
one row per worker, loads and runs in different colours).
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from html import escape
from typing import Any, Sequence

from .audit import AuditSummary
from .executor import Executor, Finished, Joined, Loaded, Lost, Notice, ResultsLost, Unloaded
from .units import UNITS_NOTE, format_bytes


@dataclass
class TaskRecord:
    """One finished task."""

    partition: str
    microbatch: int
    worker: str
    tier: int
    start: float
    end: float
    bytes_in: int = 0
    bytes_out: int = 0
    wire_in: int = 0
    wire_out: int = 0


@dataclass
class LoadRecord:
    """One partition load on a worker."""

    worker: str
    partition: str
    start: float
    end: float
    bytes_sent: int = 0
    from_cache: bool = False
    #: Opened as a fast session (see :meth:`crowdgraph.Partition.opens_fast`).
    fast: bool = False


@dataclass
class BackupRecord:
    """A straggling task that got a second copy on another worker."""

    partition: str
    microbatch: int
    straggler: str
    backup: str
    after: float  #: seconds the straggler had run it when the backup was placed
    winner: str | None = None  #: whose result was used
    dropped: str | None = None  #: whose later result was dropped (None: still running at the end)


@dataclass
class WorkerRecord:
    """Totals for one worker."""

    id: str
    memory: int
    speed: float = 1.0
    tasks: int = 0
    loads: int = 0
    unloads: int = 0
    tiers: dict[int, int] = field(default_factory=dict)
    busy: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    weight_bytes_sent: int = 0
    peak_rss: int | None = None
    rss: int | None = None
    lost: str | None = None
    #: The worker process's RSS with no partition loaded, when it reports one.
    floor: int | None = None

    @property
    def above_floor(self) -> int | None:
        """Peak RSS above the idle floor: what the memory budget bounds (None when either is unknown)."""
        if self.peak_rss is None or self.floor is None:
            return None
        return max(0, self.peak_rss - self.floor)


@dataclass
class RunReport:
    """Everything that happened in one run.

    Attributes
    ----------
    tasks, loads:
        One record per finished task and per load, in the order reported.
    workers:
        Per-worker totals by worker id.
    replaced:
        Tasks placed again after their worker was lost.
    makespan:
        Seconds from the start of the run to its last event (virtual
        seconds for a simulation).
    coordinator_link_busy:
        Seconds the coordinator's link was busy (simulations), or None.
    wire_error:
        Largest absolute difference between the outputs returned and a
        lossless run's, measured on the first micro-batch when the run gave
        ``max_error=`` (0.0 for an exact wire); None when not measured.
    notes:
        What bounded or disturbed the run, in words (printed last).
    backups:
        Straggling tasks that got a backup copy, and whose result won.
    audit:
        What spot checks did (``run(..., audit=rate)``), or None when off.
    stored:
        (worker, partition) of every partition sent to a worker's local
        storage ahead of its load, in order (``Store``; see "Weights ahead
        of need" in :mod:`crowdgraph.schedule`).
    """

    executor: str
    mode: str
    microbatches: int
    partitions: int
    tasks: list[TaskRecord] = field(default_factory=list)
    loads: list[LoadRecord] = field(default_factory=list)
    workers: dict[str, WorkerRecord] = field(default_factory=dict)
    replaced: list[tuple[str, int]] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0
    wire_error: float | None = None
    coordinator_link_busy: float | None = None
    notes: list[str] = field(default_factory=list)
    backups: list[BackupRecord] = field(default_factory=list)
    audit: AuditSummary | None = None
    stored: list[tuple[str, str]] = field(default_factory=list)

    @property
    def makespan(self) -> float:
        """Seconds from the start of the run to its end."""
        return self.end - self.start

    @property
    def tier_counts(self) -> dict[int, int]:
        """How many tasks ran at each affinity tier."""
        return dict(sorted(Counter(t.tier for t in self.tasks).items()))

    @property
    def holders(self) -> dict[str, list[str]]:
        """Workers that ran each partition, in order of their first task of it."""
        held: dict[str, dict[str, None]] = {}
        for t in self.tasks:
            held.setdefault(t.partition, {})[t.worker] = None
        return {p: list(ws) for p, ws in held.items()}

    @property
    def weight_bytes_sent(self) -> int:
        """Partition bytes sent to workers (0 when every load was cached)."""
        return sum(load.bytes_sent for load in self.loads)

    # -- recording (driver side) -----------------------------------------

    def add_worker(self, worker_id: str, memory: int, speed: float, floor: int | None = None) -> None:
        self.workers.setdefault(worker_id, WorkerRecord(worker_id, memory, speed, floor=floor))

    def record_task(self, record: TaskRecord, peak_rss: int | None, rss: int | None) -> None:
        self.tasks.append(record)
        w = self.workers[record.worker]
        w.tasks += 1
        w.tiers[record.tier] = w.tiers.get(record.tier, 0) + 1
        w.busy += record.end - record.start
        w.bytes_in += record.wire_in
        w.bytes_out += record.wire_out
        self._rss(w, peak_rss, rss)

    def record_load(self, record: LoadRecord, rss: int | None) -> None:
        self.loads.append(record)
        w = self.workers[record.worker]
        w.loads += 1
        w.busy += record.end - record.start
        w.weight_bytes_sent += record.bytes_sent
        self._rss(w, rss, rss)

    def record_unload(self, worker: str, rss: int | None) -> None:
        w = self.workers[worker]
        w.unloads += 1
        self._rss(w, None, rss)

    @staticmethod
    def _rss(w: WorkerRecord, peak: int | None, rss: int | None) -> None:
        if peak is not None:
            w.peak_rss = max(w.peak_rss or 0, peak)
        if rss is not None:
            w.rss = rss

    # -- output ----------------------------------------------------------

    def __str__(self) -> str:
        head = ("worker", "budget", "tasks", "loads", "unloads", "tiers 1/2/3/4", "busy s",
                "bytes in", "bytes out", "peak RSS", "floor", "above floor", "")
        audit = self.audit
        if audit is not None:
            head = head[:-1] + ("checks passed", "disputed", "")
        rows = [head]
        for w in self.workers.values():
            tiers = "/".join(str(w.tiers.get(t, 0)) for t in (1, 2, 3, 4))
            rows.append(self._audit_cells(w.id, (
                w.id, format_bytes(w.memory), str(w.tasks), str(w.loads), str(w.unloads), tiers,
                f"{w.busy:.3f}", format_bytes(w.bytes_in), format_bytes(w.bytes_out),
                format_bytes(w.peak_rss) if w.peak_rss else "-", format_bytes(w.floor) if w.floor else "-",
                format_bytes(w.above_floor) if w.above_floor is not None else "-",
                f"lost: {w.lost}" if w.lost else "",
            )))
        widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
        lines = ["  ".join(cell.ljust(wd) for cell, wd in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * wd for wd in widths if wd).rstrip())
        lines.append(
            f"{len(self.tasks)} tasks ({self.partitions} partitions x {self.microbatches} micro-batches, "
            f"{self.mode}) on {self.executor} in {self.makespan:.3f} s; tiers {self.tier_counts}; "
            f"partition bytes sent {format_bytes(self.weight_bytes_sent)}"
            + (f"; {sum(load.fast for load in self.loads)} of {len(self.loads)} loads opened fast"
               if any(load.fast for load in self.loads) else "")
            + (f"; {len(self.stored)} partitions stored ahead of need" if self.stored else "")
            + (f"; {len(self.replaced)} tasks placed again after worker loss" if self.replaced else "")
        )
        for b in self.backups:
            lines.append(f"task ({b.partition}, {b.microbatch}) was slow on {b.straggler} after {b.after:.1f} s: "
                         f"backed up on {b.backup}, result of {b.winner or 'neither'} used"
                         + (f", {b.dropped}'s dropped" if b.dropped else ""))
        if audit is not None:
            lines.append(audit.line())
        lines.extend(self.notes)
        lines.append(UNITS_NOTE + ("; peak RSS is the whole worker process, its idle floor (interpreter and "
                                   "onnxruntime) included: the budget bounds what a partition adds above "
                                   "that floor (\"above floor\")" if any(w.peak_rss for w in self.workers.values())
                                   else ""))
        return "\n".join(lines)

    def _audit_cells(self, worker: str, row: tuple[str, ...]) -> tuple[str, ...]:
        """``row`` with the audit columns (checks passed, disputed) before its last cell, when audit is on."""
        if self.audit is None:
            return row
        record = self.audit.reputations.get(worker)
        passed, disputed = (record.passed, record.disagreements) if record else (0, 0)
        return row[:-1] + (str(passed), str(disputed), row[-1])

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        data = asdict(self)
        data["makespan"] = self.makespan
        data["tier_counts"] = self.tier_counts
        return data

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The report as JSON text, also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def plot_timeline(self, path: str | os.PathLike, title: str | None = None) -> None:
        """Draw a Gantt chart: one row per worker in pipeline order, loads hatched, runs by partition.

        Rows are grouped by the partition each worker mostly ran (see
        :func:`timeline_rows`), so the flow reads top to bottom; workers
        that ran nothing share one row; micro-batch numbers are written
        only on bars wide enough for them.  Needs
        matplotlib (``pip install crowdgraph[plot]``); :meth:`to_html`
        draws the same chart without it, with a tooltip on every bar.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:  # the plot extra is optional
            from .errors import MissingExtraError

            raise MissingExtraError("plot_timeline needs matplotlib: pip install 'crowdgraph[plot]'") from exc
        rows = [r for r in timeline_rows(self) if r.group != "idle"]
        idle = len(self.workers) - len(rows)
        row = {r.worker: n for n, r in enumerate(rows)}
        labels = [f"{r.worker} ({r.group})" for r in rows] + ([f"{idle} idle workers"] if idle else [])
        parts = self.partition_order()
        colours = plt.get_cmap("tab10" if len(parts) <= 10 else "tab20")
        colour = {p: colours(n % colours.N) for n, p in enumerate(parts)}
        span = max(self.makespan, 1e-9)
        row_inches = 0.42 if len(labels) <= 12 else max(0.16, 6.0 / len(labels))
        width_inches, dpi = 11.0, 110
        fig, ax = plt.subplots(figsize=(width_inches, 1.6 + row_inches * len(labels)))
        plot_px = 0.72 * width_inches * dpi  # the axes' share of the figure, near enough to decide labels
        least = span * MIN_BAR_PX / plot_px  # a sliver stays visible
        for load in self.loads:
            ax.barh(row[load.worker], max(load.end - load.start, least), left=load.start - self.start,
                    color="0.8", edgecolor="0.45", hatch="//", height=0.7, linewidth=0.3)
        for t in self.tasks:
            ax.barh(row[t.worker], max(t.end - t.start, least), left=t.start - self.start,
                    color=colour[t.partition], edgecolor="black", linewidth=0.3, height=0.7)
            text = str(t.microbatch)
            if label_fits((t.end - t.start) / span * plot_px, text, LABEL_FONT_PX) and row_inches >= 0.3:
                ax.text(t.start - self.start + (t.end - t.start) / 2, row[t.worker], text,
                        ha="center", va="center", fontsize=8)
        for n, r in enumerate(rows[1:], start=1):
            if r.group != rows[n - 1].group:
                ax.axhline(n - 0.5, color="0.3", linewidth=0.8)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colour[p]) for p in parts]
        handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="0.8", hatch="//", edgecolor="0.45"))
        ax.legend(handles, parts + ["load"], loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
                  title="partition")
        ax.set_yticks(range(len(labels)), labels, fontsize=8 if len(labels) <= 24 else 6)
        ax.set_ylim(len(labels) - 0.5, -0.5)
        ax.set_xlim(0, span * 1.01)
        ax.set_ylabel("worker (main partition)")
        ax.set_xlabel("seconds since the run started (numbers on bars: micro-batch)")
        ax.set_title(title or self.title(), fontsize=10)
        ax.grid(axis="x", color="0.9")
        ax.set_axisbelow(True)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
        plt.close(fig)

    def title(self) -> str:
        """One line saying what ran where and how long it took."""
        return (f"{self.mode}: {self.partitions} partitions x {self.microbatches} micro-batches on "
                f"{self.executor} ({len(self.workers)} workers), {self.makespan:.2f} s")

    def partition_order(self) -> list[str]:
        """Partitions that ran, in pipeline order (``p2`` before ``p10``)."""
        return sorted({t.partition for t in self.tasks} | {ld.partition for ld in self.loads}, key=_partition_key)

    def to_html(self, path: str | os.PathLike | None = None) -> str:
        """The report as one self-contained web page, also written to ``path`` when given.

        The page holds the summary, the timeline as inline SVG (a tooltip
        on every bar says partition, micro-batch, worker, tier, seconds and
        bytes) and the per-worker table.  It needs no extra package and
        loads nothing from the network.
        """
        text = _html_page(self)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text


#: Bars narrower than this many pixels are drawn this wide, so short partitions stay visible.
MIN_BAR_PX = 2.0
#: Size of the micro-batch numbers written on bars.
LABEL_FONT_PX = 11.0


@dataclass(frozen=True)
class TimelineRow:
    """One worker's row of the timeline: its id and the partition it mostly ran (its group)."""

    worker: str
    group: str


def _partition_key(name: str) -> tuple[int, str]:
    """Order partition names as the pipeline runs them: ``p2`` before ``p10``."""
    return (len(name), name)


def timeline_rows(report: RunReport) -> list[TimelineRow]:
    """Workers in pipeline order, grouped by the partition each ran most.

    Sorting by name makes the flow zig-zag between rows; sorting by the
    partition a worker mostly ran (ties: the earliest start) makes it read
    top to bottom, and neighbouring rows of one group are the replicas of
    one stage.  Workers that ran nothing come last, in group ``idle``.

    >>> r = RunReport("threads", "streaming", 1, 2)
    >>> for w in ("a", "b", "c"):
    ...     r.add_worker(w, 100, 1.0)
    >>> r.record_task(TaskRecord("p1", 0, "a", 3, 2.0, 3.0), None, None)
    >>> r.record_task(TaskRecord("p0", 0, "b", 3, 0.0, 1.0), None, None)
    >>> [(row.worker, row.group) for row in timeline_rows(r)]
    [('b', 'p0'), ('a', 'p1'), ('c', 'idle')]
    """
    ran: dict[str, Counter[str]] = {w: Counter() for w in report.workers}
    first: dict[str, float] = {}
    for t in report.tasks:
        ran[t.worker][t.partition] += 1
        first[t.worker] = min(first.get(t.worker, t.start), t.start)
    group = {w: min(c, key=lambda p: (-c[p], _partition_key(p))) if c else None for w, c in ran.items()}

    def key(worker: str) -> tuple:
        g = group[worker]
        return (g is None, _partition_key(g or ""), first.get(worker, 0.0), worker)

    return [TimelineRow(w, group[w] or "idle") for w in sorted(report.workers, key=key)]


def label_fits(width_px: float, text: str, font_px: float) -> bool:
    """Whether ``text`` fits inside a bar ``width_px`` wide (digits are about 0.6 em wide, plus a margin).

    >>> label_fits(30, "12", 11), label_fits(10, "12", 11)
    (True, False)
    """
    return width_px >= 0.6 * font_px * len(text) + 4


# -- the web page --------------------------------------------------------

#: Row backgrounds of the HTML timeline, alternating, so every row is visible (and countable) at a glance.
ROW_BANDS = ("#e6edf7", "#f7efe1")
_PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
            "#9c755f", "#bab0ac", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")


def _html_timeline(report: RunReport, width: int = 1100) -> str:
    """The timeline as inline SVG: a row per worker, a tooltip (``<title>``) on every bar."""
    rows = timeline_rows(report)
    row = {r.worker: n for n, r in enumerate(rows)}
    parts = report.partition_order()
    colour = {p: _PALETTE[n % len(_PALETTE)] for n, p in enumerate(parts)}
    row_px = 24 if len(rows) <= 12 else 16
    gutter, top, axis = 170, 8, 34
    plot = width - gutter - 10
    span = max(report.makespan, 1e-9)
    height = top + row_px * len(rows) + axis

    def x(seconds: float) -> float:
        return gutter + (seconds - report.start) / span * plot

    out = [f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">']
    for n, r in enumerate(rows):
        y = top + n * row_px
        out.append(f'<g class="worker-row" data-worker="{escape(r.worker)}"><rect x="0" y="{y}" width="{width}" '
                   f'height="{row_px}" fill="{ROW_BANDS[n % 2]}"/><text x="6" y="{y + row_px * 0.7:.1f}">'
                   f'{escape(r.worker)} <tspan fill="#555">({escape(r.group)})</tspan></text></g>')
        if n and r.group != rows[n - 1].group:
            out.append(f'<line x1="0" x2="{width}" y1="{y}" y2="{y}" stroke="#444" stroke-width="1"/>')
    bar = row_px - 6
    for load in report.loads:
        y = top + row[load.worker] * row_px + 3
        w = max((load.end - load.start) / span * plot, MIN_BAR_PX)
        tip = (f"load {load.partition} on {load.worker}: {load.start - report.start:.3f}-"
               f"{load.end - report.start:.3f} s, {format_bytes(load.bytes_sent)} sent"
               + (" (from its cache)" if load.from_cache else ""))
        out.append(f'<rect class="load" x="{x(load.start):.1f}" y="{y}" width="{w:.1f}" height="{bar}" '
                   f'fill="#c8c8c8" stroke="#777" stroke-dasharray="3 2"><title>{escape(tip)}</title></rect>')
    for t in report.tasks:
        y = top + row[t.worker] * row_px + 3
        w = max((t.end - t.start) / span * plot, MIN_BAR_PX)
        tip = (f"{t.partition} micro-batch {t.microbatch} on {t.worker} (tier {t.tier}): "
               f"{t.start - report.start:.3f}-{t.end - report.start:.3f} s, "
               f"in {format_bytes(t.bytes_in)}, out {format_bytes(t.bytes_out)}")
        out.append(f'<rect class="task" x="{x(t.start):.1f}" y="{y}" width="{w:.1f}" height="{bar}" '
                   f'fill="{colour[t.partition]}" stroke="#222" stroke-width="0.4"><title>{escape(tip)}</title></rect>')
        if label_fits(w, str(t.microbatch), LABEL_FONT_PX):
            out.append(f'<text x="{x(t.start) + w / 2:.1f}" y="{y + bar * 0.78:.1f}" text-anchor="middle" '
                       f'fill="#fff" pointer-events="none">{t.microbatch}</text>')
    base = top + row_px * len(rows)
    out.append(f'<line x1="{gutter}" x2="{gutter + plot}" y1="{base}" y2="{base}" stroke="#222"/>')
    for tick in _ticks(span):
        tx = gutter + tick / span * plot
        out.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{base}" y2="{base + 4}" stroke="#222"/>'
                   f'<text x="{tx:.1f}" y="{base + 16}" text-anchor="middle">{tick:g}</text>')
    out.append(f'<text x="{gutter + plot / 2}" y="{base + 30}" text-anchor="middle">seconds since the run started '
               '(numbers on bars: micro-batch; hover a bar for details)</text></svg>')
    legend = "".join(f'<span class="swatch" style="background:{colour[p]}"></span>{escape(p)} ' for p in parts)
    return f'<p class="legend">{legend}<span class="swatch load"></span>load</p>' + "".join(out)


def _ticks(span: float) -> list[float]:
    """About six round tick positions from 0 to ``span`` seconds.

    >>> _ticks(2.6)
    [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    """
    raw = span / 6
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw), default=10 * magnitude)
    return [round(n * step, 12) for n in range(int(span / step) + 1)]


def _html_page(report: RunReport) -> str:
    table = str(report).splitlines()
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>crowdgraph run report</title>
<style>
body {{ margin: 16px; font-family: sans-serif; color: #222; }}
h1 {{ font-size: 18px; margin: 0 0 8px; }}
svg.timeline {{ display: block; }}
.legend {{ font-size: 12px; margin: 4px 0 8px; }}
.swatch {{ display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 10px; vertical-align: middle; }}
.swatch.load {{ background: #c8c8c8; border: 1px dashed #777; }}
pre {{ font-size: 12px; }}
</style></head><body>
<h1>crowdgraph run: {escape(report.title())}</h1>
{_html_timeline(report)}
<h2 style="font-size:15px">Workers</h2>
<pre>{escape(chr(10).join(table))}</pre>
</body></html>
"""


# -- the live view ---------------------------------------------------------

@dataclass
class LiveWorker:
    """What one worker has done so far in a running run."""

    id: str
    resident: str | None = None
    tasks: int = 0
    #: Loads by the tier they were made at: 2 from the worker's cache, 3 onto
    #: an empty worker, 4 after unloading another partition.
    load_tiers: dict[int, int] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    weight_bytes_sent: int = 0
    lost: str | None = None
    #: An unload came after the last load, so a network load now is a tier-4 swap.
    unloaded_since_load: bool = False

    @property
    def tiers(self) -> tuple[int, int, int, int]:
        """Tasks by tier so far: each load starts one task at its tier, the other tasks needed none (tier 1)."""
        t2, t3, t4 = (self.load_tiers.get(t, 0) for t in (2, 3, 4))
        return max(0, self.tasks - t2 - t3 - t4), t2, t3, t4


class LiveState:
    """A run's progress per worker, folded from the executor's notices (no I/O, no clock).

    :class:`LiveView` feeds it and draws :meth:`lines` on a terminal while
    the run goes on; a task reported twice (a replica finishing late)
    counts once, as in the final report.

    >>> from crowdgraph.executor import Finished, Loaded, TaskStats
    >>> state = LiveState(["w0", "w1"], total_tasks=4)
    >>> state.apply(Loaded("w0", "p0", start=0.0, end=0.1, bytes_sent=2_000_000))
    >>> stats = TaskStats(start=0.1, end=0.2, bytes_in=4000, wire_in=1000, bytes_out=9000, wire_out=3000)
    >>> state.apply(Finished("w0", ("p0", 0), {}, stats))
    >>> state.apply(Finished("w0", ("p0", 1), {}, stats))
    >>> print("\\n".join(state.lines()))
    2/4 tasks [##########..........]  50%
    w0  p0  2 tasks  tiers 1/2/3/4 1/0/1/0  weights 2.0 MB  in 2.0 kB  out 6.0 kB
    w1  -   0 tasks  tiers 1/2/3/4 0/0/0/0  weights 0 B  in 0 B  out 0 B
    """

    def __init__(self, workers: Sequence[str], total_tasks: int):
        self.total = total_tasks
        self.workers = {w: LiveWorker(w) for w in workers}
        self.finished: set[tuple[str, int]] = set()

    def apply(self, notice: Notice) -> None:
        """Fold one notice (:data:`~crowdgraph.executor.Notice`) into the state."""
        if isinstance(notice, Joined):
            self.workers.setdefault(notice.info.id, LiveWorker(notice.info.id))
            return
        w = self.workers.get(notice.worker) if not isinstance(notice, ResultsLost) else None
        if w is None:
            return
        match notice:
            case Loaded():
                tier = 2 if notice.from_cache else 4 if (w.unloaded_since_load or w.resident is not None) else 3
                w.load_tiers[tier] = w.load_tiers.get(tier, 0) + 1
                w.resident, w.unloaded_since_load = notice.partition, False
                w.weight_bytes_sent += notice.bytes_sent
            case Unloaded():
                w.resident, w.unloaded_since_load = None, True
            case Finished(_, key, _, stats) if key not in self.finished:
                self.finished.add(key)
                w.tasks += 1
                w.bytes_in += stats.wire_in
                w.bytes_out += stats.wire_out
            case Lost(_, reason):
                w.lost = reason or "lost"

    def lines(self, bar_width: int = 20) -> list[str]:
        """The view: one line for the whole run, then one per worker, columns aligned."""
        done = len(self.finished)
        filled = bar_width * done // max(self.total, 1)
        head = (f"{done}/{self.total} tasks [{'#' * filled}{'.' * (bar_width - filled)}] "
                f"{100 * done // max(self.total, 1):3d}%")
        rows = [(w.id, w.resident or "-", f"{w.tasks} tasks", "tiers 1/2/3/4 " + "/".join(map(str, w.tiers)),
                 f"weights {format_bytes(w.weight_bytes_sent)}", f"in {format_bytes(w.bytes_in)}",
                 f"out {format_bytes(w.bytes_out)}" + (f"  lost: {w.lost}" if w.lost else ""))
                for w in self.workers.values()]
        widths = [max((len(r[c]) for r in rows), default=0) for c in range(3)]
        return [head] + ["  ".join([*(cell.ljust(wd) for cell, wd in zip(r[:3], widths)), *r[3:]]) for r in rows]


class LiveView(Executor):
    """Wrap an executor so that a run draws :class:`LiveState` on a terminal as it goes.

    Use it for long runs: ``compiled.run(batch, executor=LiveView(executor,
    total_tasks))``, or ``crowdgraph run --live``.  On a terminal the view
    is redrawn in place at most every ``interval`` seconds; on anything
    else (a pipe, a file) only the final state is written, by
    :meth:`finish`.  Every executor method is passed through unchanged.
    """

    def __init__(self, executor: Executor, total_tasks: int, stream: Any = None, interval: float = 0.5):
        self.executor = executor
        self.name = executor.name
        self.total_tasks = total_tasks
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.state: LiveState | None = None
        self._lock = threading.Lock()
        self._drawn = 0
        self._last = float("-inf")
        self._terminal = bool(getattr(self.stream, "isatty", lambda: False)())

    def start(self, job: Any, reporter: Any) -> Any:
        workers = self.executor.start(job, reporter)
        self.state = LiveState([w.id for w in workers], self.total_tasks)
        reporter.add_listener(self._notice)
        return workers

    def _notice(self, notice: Any) -> None:
        with self._lock:
            assert self.state is not None
            self.state.apply(notice)
            if self._terminal and time.monotonic() - self._last >= self.interval:
                self._last = time.monotonic()
                self._draw()

    def _draw(self) -> None:
        assert self.state is not None
        lines = self.state.lines()
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        self.stream.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
        self.stream.flush()
        self._drawn = len(lines)

    def finish(self) -> None:
        """Draw the final state (call it when the run has returned)."""
        with self._lock:
            if self.state is not None:
                if self._terminal:
                    self._draw()
                else:
                    self.stream.write("\n".join(self.state.lines()) + "\n")
                    self.stream.flush()

    # Everything else goes to the wrapped executor as it is.
    def load(self, worker: str, partition: Any) -> None:
        self.executor.load(worker, partition)

    def unload(self, worker: str, partition: str) -> None:
        self.executor.unload(worker, partition)

    def store(self, worker: str, partition: Any) -> None:
        self.executor.store(worker, partition)

    def run(self, worker: str, key: Any, partition: Any, inputs: Any, **state: Any) -> None:
        self.executor.run(worker, key, partition, inputs, **state)

    def forget_state(self, worker: str, keys: Any) -> None:
        self.executor.forget_state(worker, keys)

    def gather(self, values: Any) -> Any:
        return self.executor.gather(values)

    def quarantine(self, worker: str, reason: str) -> None:
        self.executor.quarantine(worker, reason)

    def forget(self, values: Any) -> None:
        self.executor.forget(values)

    def idle(self) -> None:
        self.executor.idle()

    def now(self) -> float:
        return float(self.executor.now())

    def reset(self) -> None:
        self.executor.reset()

    def close(self) -> None:
        self.executor.close()
