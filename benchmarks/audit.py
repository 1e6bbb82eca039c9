"""Spot checks: what ``audit=`` costs in makespan, and how soon it catches a liar.

Cost.  The same simulated crowd (:func:`crowdgraph.simulate`, CostModel
defaults; 12 workers of speeds 1.0, 0.8, 0.6, 0.5, 0.4 repeated, every
partition cached) runs the embedded DistilBERT (3 partitions at a 128 MB
budget, 32 micro-batches of 1 x 128 tokens, streaming) with ``audit=0``,
``0.05`` and ``0.2``, over 5 seeds (the seed picks which tasks are
checked); makespans are virtual seconds, so each case is exact and the
ratio to ``audit=0`` is the cost.  With the TCP plug-in installed, a real
crowd of 4 ``crowdgraph-worker`` processes on this machine runs a small
chain model the same three ways, alternately, and the ratios of wall
times are reported too.

Detection.  A worker that lies on each task with probability ``f`` is
caught at its first lie that is checked.  With every task checked at rate
``a`` (a proven worker), the chance it is caught within ``n`` tasks is::

    P(n) = 1 - (1 - a * f) ** n

A new worker is checked at ``UNPROVEN_FACTOR * a`` until it passed
``PROVEN_AFTER`` checks, so for it ``P(n)`` is at least that.  The
simulation draws lies from a seeded generator and checks with the very
functions the driver uses (:func:`crowdgraph.audit.audit_rate`,
:func:`crowdgraph.audit.chosen_for_audit`), for both kinds of worker, and
compares with the formula.

Run: python -m benchmarks.audit [--quick]
"""

from __future__ import annotations

import math
import pathlib
import statistics
import time
from typing import Any

import numpy as np

import crowdgraph
from crowdgraph import zoo
from crowdgraph.audit import PROVEN_AFTER, Reputation, audit_rate, chosen_for_audit

from . import common
from .common import Target, show, table

NAME = "audit"
RATES = (0.0, 0.05, 0.2)
SPEEDS = (1.0, 0.8, 0.6, 0.5, 0.4)
SEQUENCE = 128
LIE_SHARES = (0.01, 0.1, 0.5, 1.0)
CHECK_RATES = (0.05, 0.2)
WITHIN = (10, 50, 200)
#: Done means: the measured catch probability of a proven worker is the
#: formula's within this many standard errors, in every case ...
SIGMAS = 4.0
#: ... and audit=0.05 costs at most this much makespan in the simulated crowd.
COST_LIMIT = 1.25


def run(quick: bool = False, out: pathlib.Path = common.RESULTS) -> dict[str, Any]:
    began = time.perf_counter()
    makespans = _simulated_makespans(quick)
    show(table(["audit", "makespan s (median of seeds)", "min", "max", "x audit=0", "checks"],
               [(f"{r['audit']:g}", r["makespan"], r["min"], r["max"], r["ratio"], r["checks"])
                for r in makespans],
               title="Simulated makespan with spot checks: DistilBERT 3 partitions, 12 mixed workers, "
                     f"{_microbatches(quick)} micro-batches, virtual seconds"))
    tcp = _tcp_makespans(quick)
    if tcp:
        show(table(["audit", "wall s (median)", "x audit=0 (median [min-max] of pairs)", "checks"],
                   [(f"{r['audit']:g}", r["seconds"], r["ratio"], r["checks"]) for r in tcp],
                   title="Real TCP crowd of 4 crowdgraph-worker processes on this machine, small chain model"))
    trials = 300 if quick else 3000
    detection = _detection(trials)
    show(table(["f (lies)", "a (audit)", "n", "formula", "proven measured", "new measured", "std err"],
               [(r["f"], r["a"], r["n"], r["formula"], r["proven"], r["new"], r["stderr"]) for r in detection],
               title=f"P(liar caught within n of its tasks), {trials} simulated workers per case"))
    worst = max(abs(r["proven"] - r["formula"]) / max(r["stderr"], 1e-12) for r in detection)
    below = min(r["new"] - r["formula"] + SIGMAS * r["stderr"] for r in detection)
    cost = next(r["ratio"] for r in makespans if r["audit"] == 0.05)
    targets = [
        Target(NAME, "proven worker: |measured - formula| in standard errors, worst case", worst, SIGMAS, "<="),
        Target(NAME, "new worker: measured - formula + 4 std err, least case (>= 0: never below the formula)",
               below, 0.0, ">="),
        Target(NAME, "simulated makespan audit=0.05 / audit=0", cost, COST_LIMIT, "<=", "x"),
    ]
    return common.result(NAME, quick, config={"rates": RATES, "speeds": SPEEDS, "workers": 12,
                                              "microbatches": _microbatches(quick), "trials": trials,
                                              "lie_shares": LIE_SHARES, "check_rates": CHECK_RATES,
                                              "within": WITHIN},
                         rows=makespans, tcp=tcp, detection=detection, targets=targets,
                         seconds=time.perf_counter() - began)


def _microbatches(quick: bool) -> int:
    return 8 if quick else 32


def _simulated_makespans(quick: bool) -> list[dict[str, Any]]:
    model = zoo.distilbert("tiny" if quick else "full")
    plan = crowdgraph.compile(model, "128MB", input_shapes={"input_ids": (1, SEQUENCE)})
    cached = frozenset(p.name for p in plan.partitions)
    crowd = [crowdgraph.WorkerInfo(f"w{k}", memory="128MB", speed=SPEEDS[k % len(SPEEDS)], cached=cached)
             for k in range(12)]
    seeds = range(2 if quick else 5)
    rows = []
    for rate in RATES:
        reports = [crowdgraph.simulate(plan, crowd, (_microbatches(quick), SEQUENCE), microbatch=1, audit=rate,
                                       seed=seed) for seed in seeds]
        spans = [r.makespan for r in reports]
        rows.append({"audit": rate, "makespan": statistics.median(spans), "min": min(spans), "max": max(spans),
                     "checks": statistics.median(r.audit.checks if r.audit else 0 for r in reports)})
    for row in rows:
        row["ratio"] = row["makespan"] / rows[0]["makespan"]
    return rows


def _tcp_makespans(quick: bool) -> list[dict[str, Any]]:
    try:
        from crowdgraph_tcp import TcpExecutor
    except ImportError:
        show(common.TCP_MISSING)
        return []
    from tests.models import chain

    model, feeds = chain(n_layers=6, width=256, batch=32)
    compiled = crowdgraph.compile(model, partitions=3, input_shapes={k: (4,) + v.shape[1:] for k, v in feeds.items()})
    runs = 2 if quick else 6
    times: dict[float, list[float]] = {rate: [] for rate in RATES}
    checks: dict[float, list[int]] = {rate: [] for rate in RATES}
    with TcpExecutor.local(workers=4, memory="64MB") as ex:
        compiled.run(feeds, executor=ex, microbatch=4)  # warm: partitions cached on the workers
        for k in range(runs):
            for rate in (RATES if k % 2 == 0 else RATES[::-1]):
                start = time.perf_counter()
                compiled.run(feeds, executor=ex, microbatch=4, audit=rate, seed=k)
                times[rate].append(time.perf_counter() - start)
                audit = compiled.last_report.audit
                checks[rate].append(audit.checks if audit else 0)
    rows = []
    for rate in RATES:
        ratio = common.stats([a / b for a, b in zip(times[rate], times[0.0])])
        rows.append({"audit": rate, "seconds": statistics.median(times[rate]), "ratio": common.ratio_cell(ratio),
                     "ratio_stats": ratio, "checks": statistics.median(checks[rate])})
    return rows


def _detection(trials: int) -> list[dict[str, Any]]:
    rows = []
    longest = max(WITHIN)
    for f in LIE_SHARES:
        for a in CHECK_RATES:
            caught = {"proven": _catch_times(f, a, trials, longest, Reputation(passed=PROVEN_AFTER)),
                      "new": _catch_times(f, a, trials, longest, None)}
            for n in WITHIN:
                formula = 1 - (1 - a * f) ** n
                rows.append({"f": f, "a": a, "n": n, "formula": formula,
                             "proven": sum(t < n for t in caught["proven"]) / trials,
                             "new": sum(t < n for t in caught["new"]) / trials,
                             "stderr": max(math.sqrt(formula * (1 - formula) / trials), 1 / trials)})
    return rows


def _catch_times(f: float, a: float, trials: int, longest: int, start: Reputation | None) -> list[float]:
    """For each simulated liar, the index of the task it was caught at (inf: not within ``longest``).

    ``start`` None is a new worker whose record grows with every check it passes.
    """
    rng = np.random.default_rng(int(f * 1000) * 1000 + int(a * 1000))
    times = []
    for trial in range(trials):
        record = Reputation(passed=start.passed) if start is not None else Reputation()
        lies = rng.random(longest) < f
        at = math.inf
        for t in range(longest):
            if chosen_for_audit(trial, ("p", t), "liar", audit_rate(a, record)):
                if lies[t]:
                    at = t
                    break
                record.passed += 1
        times.append(at)
    return times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return common.module_main(NAME, run, __doc__, argv)


if __name__ == "__main__":
    main()
