"""Memory per worker: peak RSS of crowdgraph-tcp worker processes against the whole model.

For each budget (128, 64, 48, 32 MB) the model is compiled at the batch's
shapes; a budget that does not compile is reported with the smallest
budget the error names.  A plan that compiles runs once on a local crowd
of ``crowdgraph-worker`` processes (``TcpExecutor.local``, as many workers
as partitions, one onnxruntime thread each).  Per worker:

* ``floor``: the idle worker's RSS (Python + numpy + onnxruntime, no
  partition), as the worker announces it when it joins;
* ``peak``: the peak RSS the worker reports for its task (the kernel's
  high-water mark, reset when the worker starts loading a partition,
  after the partition's bytes were received and written to its cache);
* ``above floor`` = peak - floor, the figure the budget promises;
* ``sampled max``: the largest RSS seen by polling the worker process
  from outside every few milliseconds during the whole run (receiving
  the partition's bytes included).

The whole model's peak RSS is measured in a fresh process
(:func:`crowdgraph.measure.measure_in_fresh_process`) from a file with
external data, the way onnxruntime loads it with the least memory.

Needs crowdgraph-tcp (imported lazily); without it the worker part is
skipped and only the whole-model figure is measured.

First of all it prints the floor per model: the smallest budget that
compiles each model at one row (:func:`crowdgraph.split.smallest_budget`,
splitting included): DistilBERT at 1x128 and the onnx package's light
CNNs (seeded weights) at 1x3x224x224.

Run: python -m benchmarks.memory [--quick]
"""

from __future__ import annotations

import pathlib
import re
import tempfile
import time
from typing import Any

import crowdgraph
from crowdgraph.errors import BudgetError
from crowdgraph.measure import RssSampler, measure_in_fresh_process
from crowdgraph.runtime import current_rss
from crowdgraph.split import smallest_budget
from crowdgraph.units import parse_bytes

from . import common
from .common import Target, fmt, show, table

NAME = "memory"
BUDGETS = ("128MB", "64MB", "48MB", "32MB")
QUICK_BUDGETS = ("16MB", "14MB", "8MB")
#: Largest worker peak RSS / whole-model peak RSS at one row.
RATIO_TARGET = 0.30
_SMALLEST = re.compile(r"smallest budget that compiles[^;]*? is ([0-9.]+ ?[kMGT]?i?B)")


def _tcp():
    try:
        from crowdgraph_tcp import TcpExecutor
    except ImportError:
        return None
    return TcpExecutor


def _crowd_run(TcpExecutor: Any, compiled: Any, feeds: dict[str, Any], budget: str) -> list[dict[str, Any]]:
    """Run ``compiled`` once on a fresh local TCP crowd; one row per worker."""
    n = len(compiled.partitions)
    ex = TcpExecutor.local(workers=n, memory=budget, threads=1)
    try:
        peers = dict(ex.coordinator.workers)
        floors = {w: getattr(peers.get(w), "floor_rss", None) for w in ex.processes}
        idle = {w: current_rss(p.pid) for w, p in ex.processes.items()}  # seen from outside, before any load
        with RssSampler({w: p.pid for w, p in ex.processes.items()}, period=0.004) as sampler:
            compiled.run(feeds, ex)
        report = compiled.last_report
    finally:
        ex.close()
    rows = []
    for w, rec in report.workers.items():
        parts = sorted({t.partition for t in report.tasks if t.worker == w}, key=lambda p: (len(p), p))
        floor = floors.get(w) or idle.get(w)
        peak = rec.peak_rss
        rows.append({
            "worker": w, "partitions": parts,
            "estimate": max((compiled[p].resident_bytes for p in parts), default=0),
            "floor": floor, "idle_rss_outside": idle.get(w), "peak_rss": peak,
            "above_floor": (peak - floor) if peak and floor else None,
            "sampled_max_rss": sampler.peak.get(w),
            "sampled_above_floor": (sampler.peak[w] - floor) if sampler.peak.get(w) and floor else None,
        })
    return rows


#: The light CNNs whose floor is reported (``tests.models.light_cnn``).
FLOOR_CNNS = ("resnet50", "inception_v1", "densenet121", "squeezenet")
QUICK_FLOOR_CNNS = ("squeezenet",)


def floor_rows(quick: bool) -> list[dict[str, Any]]:
    """The smallest budget that compiles each model at one row, splitting included."""
    from tests import models as test_models

    rows = []
    for case in common.model_cases(quick):
        feeds = case.inputs(1)
        rows.append({"model": case.label, "shape": "x".join(map(str, feeds["input_ids"].shape)),
                     "floor": smallest_budget(case.model, {k: v.shape for k, v in feeds.items()})})
    for name in QUICK_FLOOR_CNNS if quick else FLOOR_CNNS:
        model, feeds = test_models.light_cnn(name)[:2]
        (shape,) = {v.shape for v in feeds.values()}
        rows.append({"model": name, "shape": "x".join(map(str, shape)),
                     "floor": smallest_budget(model, {k: v.shape for k, v in feeds.items()})})
    show(table(["model", "shape", "smallest budget that compiles MB"],
               [(r["model"], r["shape"], r["floor"] / 1e6) for r in rows],
               title="Floor per model: the smallest budget that compiles it (splitting included)"))
    return rows


def run(quick: bool = False, out: pathlib.Path = common.RESULTS) -> dict[str, Any]:
    began = time.perf_counter()
    floors = floor_rows(quick)
    TcpExecutor = _tcp()
    budgets = QUICK_BUDGETS if quick else BUDGETS
    if TcpExecutor is None:
        show(f"memory: {common.TCP_MISSING} (measuring the whole model only)")
    rows: list[dict[str, Any]] = []
    targets: list[Target] = []
    for case in common.model_cases(quick):
        for batch in common.batches(quick):
            feeds = case.inputs(batch)
            shape = f"{batch}x{case.sequence}"
            with tempfile.TemporaryDirectory() as tmp:
                whole = measure_in_fresh_process(case.save_whole(pathlib.Path(tmp) / "whole"), feeds)
            base = {"model": case.label, "shape": shape, "whole_peak": whole["peak"],
                    "whole_floor": whole["floor"], "whole_above_floor": whole["above_floor"]}
            for budget in budgets:
                row: dict[str, Any] = {**base, "budget": budget, "budget_bytes": parse_bytes(budget)}
                try:
                    compiled = crowdgraph.compile(case.model, budget, sample=feeds)
                except BudgetError as exc:
                    found = _SMALLEST.search(str(exc))
                    row.update(compiles=False, smallest_budget=found.group(1) if found else None,
                               error=str(exc))
                    rows.append(row)
                    continue
                row.update(compiles=True, partitions=len(compiled.partitions))
                if TcpExecutor is None:
                    row["skipped"] = common.TCP_MISSING
                    rows.append(row)
                    continue
                workers = _crowd_run(TcpExecutor, compiled, feeds, budget)
                peaks = [w["peak_rss"] for w in workers if w["peak_rss"]]
                aboves = [w["above_floor"] for w in workers if w["above_floor"] is not None]
                floors = [w["floor"] for w in workers if w["floor"]]
                row.update(
                    workers=workers, max_peak=max(peaks) if peaks else None,
                    max_above_floor=max(aboves) if aboves else None,
                    floor_min=min(floors) if floors else None, floor_max=max(floors) if floors else None,
                    max_sampled=max((w["sampled_max_rss"] or 0) for w in workers) or None,
                    max_estimate=max(w["estimate"] for w in workers),
                )
                row["peak_ratio"] = row["max_peak"] / whole["peak"] if row["max_peak"] else None
                row["above_floor_ratio"] = (row["max_above_floor"] / whole["above_floor"]
                                            if row["max_above_floor"] else None)
                rows.append(row)
                targets.append(Target(
                    NAME, f"{case.label} {shape} budget {budget}: largest worker RSS above its floor",
                    None if row["max_above_floor"] is None else row["max_above_floor"] / 1e6,
                    row["budget_bytes"] / 1e6, "<=", " MB"))
                sampled = [w["sampled_above_floor"] for w in workers if w["sampled_above_floor"] is not None]
                sampled_above = row["max_sampled_above_floor"] = max(sampled) if sampled else None
                targets.append(Target(
                    NAME, f"{case.label} {shape} budget {budget}: largest worker RSS above its floor, polled "
                          "from outside (receiving the partition included; extra check, not a stated target)",
                    None if sampled_above is None else sampled_above / 1e6, row["budget_bytes"] / 1e6, "<=", " MB"))
                if batch == 1:
                    targets.append(Target(
                        NAME, f"{case.label} {shape} budget {budget}: largest worker peak RSS / whole-model peak RSS",
                        row["peak_ratio"], RATIO_TARGET, "<=", "",
                        "a Python worker's idle floor alone is "
                        f"{fmt((row['floor_min'] or 0) / 1e6)} MB; above the floors the ratio is "
                        f"{fmt(row['above_floor_ratio'])}"))
            show(f"  {case.label} {shape}: done ({time.perf_counter() - began:.0f} s)")

    mb = lambda v: None if v is None else v / 1e6  # noqa: E731

    def spread(r: dict[str, Any], key: str) -> str:
        values = sorted(w[key] for w in r.get("workers", []) if w[key] is not None)
        if not values:
            return "-"
        return f"{fmt(values[0] / 1e6)} / {fmt(values[len(values) // 2] / 1e6)} / {fmt(values[-1] / 1e6)}"

    show(table(
        ["model", "shape", "budget", "compiles", "workers", "floor MB", "max peak MB",
         "above floor MB min/med/max", "max estimate MB", "whole peak MB", "peak ratio", "above-floor ratio"],
        [(r["model"], r["shape"], r["budget"],
          "yes" if r["compiles"] else f"no (needs {r.get('smallest_budget') or '?'})",
          r.get("partitions"), mb(r.get("floor_min")), mb(r.get("max_peak")), spread(r, "above_floor"),
          mb(r.get("max_estimate")), mb(r["whole_peak"]), r.get("peak_ratio"), r.get("above_floor_ratio"))
         for r in rows],
        title="Memory per worker (crowdgraph-tcp local workers, 1 onnxruntime thread, one per partition) "
              "vs the whole model in one process"))
    show(table(
        ["model", "shape", "budget", "sampled max MB", "sampled above floor MB", "worker-reported peak MB"],
        [(r["model"], r["shape"], r["budget"], mb(r.get("max_sampled")),
          mb(r.get("max_sampled_above_floor")),
          mb(r.get("max_peak"))) for r in rows if r.get("workers")],
        title="Largest RSS polled from outside every 4 ms over the whole run (receiving the partition's bytes "
              "included; polling can miss short peaks)"))
    _plot(rows, out)
    return common.result(NAME, quick, config={"budgets": list(budgets), "threads": 1,
                                              "tcp": TcpExecutor is not None, "floors": floors},
                         rows=rows, targets=targets, seconds=time.perf_counter() - began,
                         skipped=common.TCP_MISSING if TcpExecutor is None else None)


def _plot(rows: list[dict[str, Any]], out: pathlib.Path) -> None:
    plt = common.plt()
    runs = [r for r in rows if r.get("workers")]
    if plt is None or not runs:
        return
    cols = min(5, len(runs))
    nrows = -(-len(runs) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols + 0.5, 3.4 * nrows), squeeze=False, sharey=True)
    flat = [ax for line in axes for ax in line]
    for ax in flat[len(runs):]:
        ax.set_visible(False)
    for ax, r in zip(flat, runs):
        ws = r["workers"]
        x = range(len(ws))
        floors = [(w["floor"] or 0) / 1e6 for w in ws]
        above = [(w["above_floor"] or 0) / 1e6 for w in ws]
        ax.bar(x, floors, color="0.75", label="idle floor")
        ax.bar(x, above, bottom=floors, color="tab:blue", label="above floor")
        ax.axhline(r["whole_peak"] / 1e6, color="tab:red", linestyle="--", label="whole model peak")
        ax.axhline(r["budget_bytes"] / 1e6 + min(floors), color="tab:green", linestyle=":", label="floor + budget")
        ax.set_xticks(list(x), [",".join(w["partitions"]) for w in ws], fontsize=6 if len(ws) <= 12 else 4,
                      rotation=0 if len(ws) <= 12 else 90)
        ax.set_title(f"{r['model'].replace('DistilBERT', 'DB')}\n{r['shape']}, {r['budget']}", fontsize=8)
    for line in axes:
        line[0].set_ylabel("RSS MB")
    flat[len(runs) - 1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "memory.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return common.module_main(NAME, run, __doc__, argv)


if __name__ == "__main__":
    main()
