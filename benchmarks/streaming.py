"""Streaming vs barrier: the same crowd, the same micro-batches, two task orders.

*Barrier* (CROWDio's synchronisation): a partition starts only when the
previous stage finished every micro-batch.  *Streaming*: a task waits only
for its own micro-batch, so micro-batches flow through the crowd as a
pipeline.  The figure is the batch latency ratio streaming / barrier and
the cut ``1 - ratio``.

* Real: the plan (compiled at the micro-batch's shapes) runs a batch of 8
  rows in 8 micro-batches of 1 on a warm crowd of one worker per partition
  (ThreadExecutor threads, and crowdgraph-tcp worker processes when
  installed), one onnxruntime thread each; the two modes alternate.
* Simulated (:func:`crowdgraph.simulate`, CostModel defaults: 5 GFLOP/s at
  speed 1.0, 10 MB/s links with 5 ms latency): five workers like CROWDio's
  handsets, speeds 1.0, 0.8, 0.6, 0.5, 0.4, and five equal ones, with
  plans for 128, 64 and 48 MB.  A *cold* crowd has nothing: every
  partition is sent over the 10 MB/s link when first needed.  A *warm*
  crowd has every partition on local storage and worker i holds
  partition i in memory from the previous batch (as the real crowds
  below do).  Each crowd runs under two placement policies: ``pipeline``
  (a stage per phone, as CROWDio places them; the 34% target is
  evaluated there, on the heterogeneous phones) and ``cost`` (the
  default, which gives a stage replicas where their loads pay, so its
  barrier stages already spread over the crowd).  The simulation is
  deterministic: one run per mode.

Run: python -m benchmarks.streaming [--quick]
"""

from __future__ import annotations

import itertools
import pathlib
import time
from typing import Any

import crowdgraph
from crowdgraph.errors import BudgetError

from . import common
from .common import Target, alternate, ratio_cell, show, table

NAME = "streaming"
CUT_TARGET = 0.34
#: Placement policies of the simulated crowds: CROWDio's (a stage per phone), the target's setting, and the default.
POLICIES = ("pipeline", "cost")
SPEEDS = {"heterogeneous": (1.0, 0.8, 0.6, 0.5, 0.4), "equal": (1.0,) * 5}


def _tcp():
    try:
        from crowdgraph_tcp import TcpExecutor
    except ImportError:
        return None
    return TcpExecutor


def run(quick: bool = False, out: pathlib.Path = common.RESULTS) -> dict[str, Any]:
    began = time.perf_counter()
    TcpExecutor = _tcp()
    if TcpExecutor is None:
        show(f"streaming, tcp rows: {common.TCP_MISSING}")
    budget = "14MB" if quick else "128MB"
    sim_budgets = ("14MB",) if quick else ("128MB", "64MB", "48MB")
    batch, microbatch = 8, 1
    runs = 3 if quick else 7
    real: list[dict[str, Any]] = []
    sim: list[dict[str, Any]] = []
    targets: list[Target] = []
    plots = common.plt() is not None
    for index, case in enumerate(common.model_cases(quick)):
        feeds = case.inputs(batch)
        micro_shapes = {k: (microbatch,) + v.shape[1:] for k, v in feeds.items()}
        shape = f"{batch}x{case.sequence} in {batch // microbatch} x {microbatch}"

        # -- simulated crowds ------------------------------------------------
        for sim_budget in sim_budgets:
            try:
                compiled = crowdgraph.compile(case.model, sim_budget, input_shapes=micro_shapes)
            except BudgetError as exc:
                sim.append({"model": case.label, "shape": shape, "budget": sim_budget, "compiles": False,
                            "error": str(exc)})
                continue
            names = [p.name for p in compiled.partitions]
            for state, (crowd_name, speeds), policy in itertools.product(("cold", "warm"), SPEEDS.items(),
                                                                          POLICIES):
                crowd = [crowdgraph.WorkerInfo(f"phone{n}", memory=sim_budget, speed=s,
                                           cached=names if state == "warm" else (),
                                           resident=names[n] if state == "warm" and n < len(names) else None)
                         for n, s in enumerate(speeds)]
                reports = {mode: crowdgraph.simulate(compiled, crowd, (batch, case.sequence),
                                                     microbatch=microbatch, mode=mode, policy=policy)
                           for mode in ("streaming", "barrier")}
                ratio = reports["streaming"].makespan / reports["barrier"].makespan
                sim.append({"model": case.label, "shape": shape, "budget": sim_budget, "compiles": True,
                            "partitions": len(names), "state": state, "crowd": crowd_name, "policy": policy,
                            "speeds": list(speeds),
                            "workers_used": len({t.worker for t in reports["streaming"].tasks}),
                            "loads": {m: len(r.loads) for m, r in reports.items()},
                            "streaming_s": reports["streaming"].makespan,
                            "barrier_s": reports["barrier"].makespan, "ratio": ratio, "cut": 1 - ratio})
                # CROWDio's setting (its phones' speeds, a stage per phone) has a target; the rest is in the table.
                crowdio = crowd_name == "heterogeneous" and policy == "pipeline"
                if crowdio:
                    targets.append(Target(
                        NAME, f"simulated {case.label}, {sim_budget} plan ({len(names)} partitions), {state} "
                              f"crowd, {crowd_name} speeds: streaming cuts batch latency by",
                        100 * (1 - ratio), 100 * CUT_TARGET, ">=", "%"))
                if plots and crowdio and sim_budget == sim_budgets[0] and index == 0:
                    for mode, rep in reports.items():
                        rep.plot_timeline(out / f"streaming_sim_{state}_{mode}.png",
                                          title=f"simulated {mode}, {state} crowd: {case.label}, 5 phones "
                                                f"(speeds {', '.join(map(str, speeds))}), {rep.makespan:.1f} s")

        # -- real crowds -----------------------------------------------------
        compiled = crowdgraph.compile(case.model, budget, input_shapes=micro_shapes)
        n = len(compiled.partitions)
        executors = [("threads", lambda: crowdgraph.ThreadExecutor(workers=n, threads_per_worker=1))]
        if TcpExecutor is not None:
            executors.append(("tcp", lambda: TcpExecutor.local(workers=n, memory=budget, threads=1)))
        for name, make in executors:
            ex = make()
            try:
                res = alternate(lambda: compiled.run(feeds, ex, microbatch=microbatch, mode="streaming"),
                                lambda: compiled.run(feeds, ex, microbatch=microbatch, mode="barrier"), runs)
                if plots and name == "threads" and index == 0:
                    for mode in ("streaming", "barrier"):
                        compiled.run(feeds, ex, microbatch=microbatch, mode=mode)
                        compiled.last_report.plot_timeline(
                            out / f"streaming_threads_{mode}.png",
                            title=f"{mode} on {n} thread workers: {case.label}, "
                                  f"{compiled.last_report.makespan:.2f} s")
            finally:
                ex.close()
            real.append({"model": case.label, "shape": shape, "budget": budget, "partitions": n,
                         "executor": name, "workers": n, "cores": common.machine()["cores"],
                         "streaming_s": res["a"], "barrier_s": res["b"], "ratio": res["ratio"],
                         "cut": 1 - res["ratio"]["median"]})
        show(f"  {case.label}: done ({time.perf_counter() - began:.0f} s)")

    show(table(
        ["model", "plan", "parts", "state", "speeds", "policy", "workers used", "loads s/b", "streaming s",
         "barrier s", "ratio", "cut", "target"],
        [(r["model"], r["budget"], r.get("partitions", "-"), r.get("state", "-") if r["compiles"] else "does not compile",
          r.get("crowd", "-"), r.get("policy", "-"), r.get("workers_used", "-"),
          f"{r['loads']['streaming']}/{r['loads']['barrier']}" if r["compiles"] else "-", r.get("streaming_s"), r.get("barrier_s"), r.get("ratio"),
          f"{r['cut']:.0%}" if r["compiles"] else "-",
          (("PASS" if r["cut"] >= CUT_TARGET else "MISS") + f" (>= {CUT_TARGET:.0%})")
          if r["compiles"] and r["policy"] == "pipeline" else "-")
         for r in sim],
        title=f"Simulated: batch {batch}x rows in micro-batches of {microbatch}, 5 workers, CostModel defaults"))
    show(table(
        ["model", "executor", "workers", "streaming s", "barrier s", "ratio [min-max]", "cut"],
        [(r["model"], r["executor"], f"{r['workers']} on {r['cores']} cores", r["streaming_s"]["median"],
          r["barrier_s"]["median"], ratio_cell(r["ratio"]), f"{r['cut']:.0%}") for r in real],
        title=f"Real: batch {batch} rows in micro-batches of {microbatch}, plan {budget}, one worker per partition, "
              f"median of {runs} alternating runs (no target: reported as measured)"))
    return common.result(NAME, quick, config={"batch": batch, "microbatch": microbatch, "budget": budget,
                                              "sim_budgets": list(sim_budgets), "speeds": SPEEDS, "runs": runs,
                                              "cost_model": "CostModel() defaults", "tcp": TcpExecutor is not None},
                         rows=real, simulated=sim, targets=targets, seconds=time.perf_counter() - began)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return common.module_main(NAME, run, __doc__, argv)


if __name__ == "__main__":
    main()
