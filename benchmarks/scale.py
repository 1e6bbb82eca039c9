"""Scheduler scale: CPU time per task for crowds of 10, 100 and 1,000 workers.

Three measurements on a chain of 20 partitions in streaming mode (10,000
tasks = 20 x 500 micro-batches, 100,000 tasks = 20 x 5,000):

* ``scheduler``: :class:`crowdgraph.schedule.Scheduler` driven directly
  by a minimal loop in which tasks finish first in, first out (every
  ``Run`` becomes a ``TaskFinished`` at the back of one queue, every
  ``Load`` a ``LoadFinished``); ``time.process_time`` is read around the
  ``start()`` and ``handle()`` calls only, so the figure is the
  scheduler's own CPU time per task (plus about one timer read per call).
  Building the scheduler (which walks the task graph once) is reported
  apart.  Each of the three placement policies is measured; under
  ``cost`` (the default) every partition is 5 GFLOP and every task
  reports 1 s / speed, so replicas are made and estimates updated.
* ``simulate()``: the whole of :func:`crowdgraph.simulate` (task graph,
  driver loop, virtual-clock executor, report) on a chain model compiled
  into 20 partitions, CPU time per task.

* ``dask``: the same task graph as a plain Dask graph of no-op tasks run
  by ``dask.threaded.get`` (4 threads) and ``dask.local.get_sync``, CPU
  time per task on the same machine in the same run: all of it is
  scheduler overhead.

Run: python -m benchmarks.scale [--quick]
"""

from __future__ import annotations

import gc
import pathlib
import random
import time
from collections import deque
from typing import Any

import networkx as nx

import crowdgraph
from crowdgraph.schedule import POLICIES, Load, LoadFinished, Run, Scheduler, TaskFinished, WorkerInfo
from crowdgraph.taskgraph import build_task_graph

from . import common
from .common import Target, show, stats, table

NAME = "scale"
PARTITIONS = 20
TARGET_US = 50.0
TARGET_WORKERS = 1000


def crowd(n: int, seed: int = 0) -> list[WorkerInfo]:
    """``n`` workers with 64-128 MB budgets and speeds 0.4-1.0 (seeded)."""
    rng = random.Random(seed)
    return [WorkerInfo(f"w{i}", memory=rng.choice((64, 96, 128)) * 10**6, speed=rng.choice((0.4, 0.5, 0.6, 0.8, 1.0)))
            for i in range(n)]


def drive(tasks: nx.DiGraph, workers: list[WorkerInfo], need: dict[str, int],
          policy: str = "cost") -> dict[str, float]:
    """Run the scheduler to the end with FIFO completions; CPU seconds spent in it."""
    clock = time.process_time
    t0 = clock()
    sched = Scheduler(tasks, need, workers, seed=0, policy=policy,  # type: ignore[arg-type]
                      flops=dict.fromkeys(need, 5e9))
    speed = {w.id: w.speed for w in workers}
    init = clock() - t0
    pending: deque[Any] = deque()
    spent = 0.0
    calls = 1
    t0 = clock()
    actions = sched.start()
    spent += clock() - t0
    loop0 = clock()
    while True:
        for a in actions:
            if isinstance(a, Run):
                pending.append(TaskFinished(a.worker, a.key, 1.0 / speed[a.worker]))
            elif isinstance(a, Load):
                pending.append(LoadFinished(a.worker, a.partition))
        if not pending:
            break
        event = pending.popleft()
        t0 = clock()
        actions = sched.handle(event)
        spent += clock() - t0
        calls += 1
    loop = clock() - loop0
    assert sched.done, "the scheduler stopped with unfinished tasks"
    return {"init": init, "scheduler": spent, "loop": loop, "calls": calls}


def _dask_schedulers() -> list[tuple[str, Any]]:
    """Dask's single-machine schedulers, or none when Dask is not installed."""
    try:
        import dask.local
        import dask.threaded
    except ImportError:
        return []
    return [("dask.threaded.get (4 threads)", lambda dsk, keys: dask.threaded.get(dsk, keys, num_workers=4)),
            ("dask.local.get_sync", dask.local.get_sync)]


def _noop(*args: Any) -> None:
    return None


def _dask_cpu(tasks: nx.DiGraph, get: Any) -> float:
    """CPU seconds Dask spends running ``tasks`` as no-op tasks (all of it overhead)."""
    dsk = {key: (_noop, *tasks.predecessors(key)) for key in tasks}
    sinks = [key for key in tasks if tasks.out_degree(key) == 0]
    t0 = time.process_time()
    get(dsk, sinks)
    return time.process_time() - t0


def _timer_cost() -> float:
    clock = time.process_time
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        clock()
    return (time.perf_counter() - t0) / n


def run(quick: bool = False, out: pathlib.Path = common.RESULTS) -> dict[str, Any]:
    began = time.perf_counter()
    worker_counts = (10, 100) if quick else (10, 100, 1000)
    microbatch_counts = (50,) if quick else (500, 5000)
    repeats = 1 if quick else 3
    chain = nx.DiGraph([(f"p{i}", f"p{i + 1}") for i in range(PARTITIONS - 1)])
    need = {f"p{i}": 40 * 10**6 for i in range(PARTITIONS)}
    rows: list[dict[str, Any]] = []
    targets: list[Target] = []
    for m in microbatch_counts:
        tasks = build_task_graph(chain, m, "streaming")
        n_tasks = tasks.number_of_nodes()
        for policy in POLICIES:
            for n in worker_counts:
                per_task, loop_task, init_task = [], [], []
                for _ in range(repeats):
                    gc.collect()
                    r = drive(tasks, crowd(n), need, policy)
                    per_task.append(r["scheduler"] / n_tasks * 1e6)
                    loop_task.append(r["loop"] / n_tasks * 1e6)
                    init_task.append(r["init"] / n_tasks * 1e6)
                rows.append({"what": "scheduler", "policy": policy, "workers": n, "tasks": n_tasks,
                             "partitions": PARTITIONS, "microbatches": m, "us_per_task": stats(per_task),
                             "loop_us_per_task": stats(loop_task), "init_us_per_task": stats(init_task),
                             "handle_calls": r["calls"]})
                if n == TARGET_WORKERS and policy == "cost":
                    targets.append(Target(NAME, f"scheduler CPU per task, {n} workers, {n_tasks} tasks, cost rule",
                                          stats(per_task)["median"], TARGET_US, "<=", " us",
                                          "Dask's own schedulers measured in the same run: see the table"))
        for name, get in _dask_schedulers():
            per_task = []
            for _ in range(repeats):
                gc.collect()
                per_task.append(_dask_cpu(tasks, get) / n_tasks * 1e6)
            rows.append({"what": "dask", "policy": name, "workers": 4 if "threaded" in name else 1,
                         "tasks": n_tasks, "partitions": PARTITIONS, "microbatches": m,
                         "us_per_task": stats(per_task)})
        show(f"  scheduler and dask, {n_tasks} tasks: done ({time.perf_counter() - began:.0f} s)")

    # The whole simulate(): a chain model cut into PARTITIONS partitions.
    from tests.models import chain as chain_model  # the repository root is on sys.path (python -m benchmarks)

    model, _ = chain_model(n_layers=PARTITIONS, width=64, batch=1)
    compiled = crowdgraph.compile(model, partitions=PARTITIONS, input_shapes={"x": (1, 64)})
    sim_parts = len(compiled.partitions)
    sim_microbatches = (50,) if quick else (500, 5000)
    for m in sim_microbatches:
        for n in worker_counts:
            workers = [crowdgraph.WorkerInfo(w.id, memory="64MB", speed=w.speed) for w in crowd(n)]
            gc.collect()
            t0 = time.process_time()
            report = crowdgraph.simulate(compiled, workers, (m, 64), microbatch=1)
            cpu = time.process_time() - t0
            n_tasks = len(report.tasks)
            rows.append({"what": "simulate()", "workers": n, "tasks": n_tasks, "partitions": sim_parts,
                         "microbatches": m, "us_per_task": stats([cpu / n_tasks * 1e6]),
                         "virtual_makespan_s": report.makespan})
        show(f"  simulate(), {m} micro-batches: done ({time.perf_counter() - began:.0f} s)")

    timer = _timer_cost()
    show(table(
        ["measured", "policy", "workers", "tasks", "us/task [min-max]", "loop us/task", "build us/task"],
        [(r["what"], r.get("policy", "cost"), r["workers"], r["tasks"],
          common.ratio_cell(r["us_per_task"]),
          r.get("loop_us_per_task", {}).get("median"), r.get("init_us_per_task", {}).get("median"))
         for r in rows],
        title=f"Scheduler scale: chain of {PARTITIONS} partitions, streaming, CPU time per task "
              f"(median of {repeats}; one process_time read costs {timer * 1e6:.2f} us)"))
    _plot(rows, out)
    return common.result(NAME, quick, config={"partitions": PARTITIONS, "workers": list(worker_counts),
                                              "microbatches": list(microbatch_counts), "repeats": repeats,
                                              "process_time_read_us": timer * 1e6, "mode": "streaming"},
                         rows=rows, targets=targets, seconds=time.perf_counter() - began)


def _plot(rows: list[dict[str, Any]], out: pathlib.Path) -> None:
    plt = common.plt()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for what, policy in (("scheduler", "cost"), ("scheduler", "pipeline"), ("simulate()", None)):
        for tasks in sorted({r["tasks"] for r in rows if r["what"] == what}):
            pts = sorted((r["workers"], r["us_per_task"]["median"]) for r in rows
                         if r["what"] == what and r["tasks"] == tasks and r.get("policy") == policy)
            label = f"{what}{f' ({policy})' if policy else ''}, {tasks} tasks"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    for r in rows:
        if r["what"] == "dask" and r["tasks"] == max(x["tasks"] for x in rows if x["what"] == "dask"):
            ax.axhline(r["us_per_task"]["median"], linestyle="--", color="tab:grey", linewidth=0.8)
            ax.annotate(r["policy"], (10, r["us_per_task"]["median"]), fontsize=6)
    ax.axhline(TARGET_US, color="tab:red", linestyle=":", label=f"target {TARGET_US:g} us")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("workers")
    ax.set_ylabel("CPU us per task")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "scale.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return common.module_main(NAME, run, __doc__, argv)


if __name__ == "__main__":
    main()
