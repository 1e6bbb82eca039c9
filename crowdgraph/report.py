"""RunReport: who ran what, when, at which tier, moving how many bytes.

This is stage 7 of crowdgraph's flow.  The driver records every load,
unload and task as the executor reports it; the report prints a
per-worker table, exports JSON and draws a timeline (a Gantt chart with
one row per worker, loads and runs in different colours).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from .units import format_bytes


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

    @property
    def makespan(self) -> float:
        """Seconds from the start of the run to its end."""
        return self.end - self.start

    @property
    def tier_counts(self) -> dict[int, int]:
        """How many tasks ran at each affinity tier."""
        return dict(sorted(Counter(t.tier for t in self.tasks).items()))

    @property
    def weight_bytes_sent(self) -> int:
        """Partition bytes sent to workers (0 when every load was cached)."""
        return sum(load.bytes_sent for load in self.loads)

    # -- recording (driver side) -----------------------------------------

    def add_worker(self, worker_id: str, memory: int, speed: float) -> None:
        self.workers.setdefault(worker_id, WorkerRecord(worker_id, memory, speed))

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
                "bytes in", "bytes out", "peak RSS", "")
        rows = [head]
        for w in self.workers.values():
            tiers = "/".join(str(w.tiers.get(t, 0)) for t in (1, 2, 3, 4))
            rows.append((
                w.id, format_bytes(w.memory), str(w.tasks), str(w.loads), str(w.unloads), tiers,
                f"{w.busy:.3f}", format_bytes(w.bytes_in), format_bytes(w.bytes_out),
                format_bytes(w.peak_rss) if w.peak_rss else "-", f"lost: {w.lost}" if w.lost else "",
            ))
        widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
        lines = ["  ".join(cell.ljust(wd) for cell, wd in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * wd for wd in widths if wd).rstrip())
        lines.append(
            f"{len(self.tasks)} tasks ({self.partitions} partitions x {self.microbatches} micro-batches, "
            f"{self.mode}) on {self.executor} in {self.makespan:.3f} s; tiers {self.tier_counts}; "
            f"partition bytes sent {format_bytes(self.weight_bytes_sent)}"
            + (f"; {len(self.replaced)} tasks placed again after worker loss" if self.replaced else "")
        )
        return "\n".join(lines)

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
        """Draw a Gantt chart (one row per worker; loads grey, runs coloured by partition).

        Needs matplotlib (``pip install crowdgraph[plot]``).
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:  # the plot extra is optional
            from .errors import MissingExtraError

            raise MissingExtraError("plot_timeline needs matplotlib: pip install 'crowdgraph[plot]'") from exc
        workers = list(self.workers)
        row = {w: n for n, w in enumerate(workers)}
        parts = sorted({t.partition for t in self.tasks}, key=lambda p: (len(p), p))
        colours = plt.get_cmap("tab10" if len(parts) <= 10 else "tab20")
        colour = {p: colours(n % colours.N) for n, p in enumerate(parts)}
        fig, ax = plt.subplots(figsize=(11, 1.2 + 0.55 * len(workers)))
        for load in self.loads:
            ax.barh(row[load.worker], load.end - load.start, left=load.start - self.start,
                    color="0.75", edgecolor="0.4", hatch="//", height=0.6)
        for t in self.tasks:
            ax.barh(row[t.worker], t.end - t.start, left=t.start - self.start,
                    color=colour[t.partition], edgecolor="black", linewidth=0.3, height=0.6)
            if len(self.tasks) <= 120:
                ax.text(t.start - self.start + (t.end - t.start) / 2, row[t.worker], str(t.microbatch),
                        ha="center", va="center", fontsize=6)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colour[p]) for p in parts]
        handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="0.75", hatch="//", edgecolor="0.4"))
        ax.legend(handles, parts + ["load"], loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
        ax.set_yticks(range(len(workers)), workers)
        ax.invert_yaxis()
        ax.set_xlabel("seconds since start (numbers: micro-batch)")
        ax.set_title(title or f"{self.mode}: {self.partitions} partitions x {self.microbatches} "
                     f"micro-batches on {self.executor}, {self.makespan:.2f} s")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
