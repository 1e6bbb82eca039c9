"""Benchmark: the embedded full DistilBERT on a local Dask cluster through DaskExecutor.

Compiles ``zoo.distilbert("full")`` for a memory budget at a sample batch
(default 8 x 128, one micro-batch), starts a LocalCluster of worker
processes with one thread each, and runs the batch twice on one
DaskExecutor: *cold* (every partition is sent and loaded) and *warm* (the
partitions are still resident: tier 1, nothing loaded).  For each run it
prints the wall time, the weight bytes sent, the activation bytes Dask
moved between processes (the workers' own ``transfer_outgoing_bytes_total``
counters: worker-to-worker fetches plus the final gather) and crowdgraph's
own count (``wire_in``: input bytes a task read from another machine), and
checks the outputs against the whole model run in one session.

    PYTHONPATH=. python executors/dask/bench_dask.py [--workers 4] [--budget 128MB] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any

import numpy as np


def _outgoing(client: Any) -> int:
    def count(dask_worker: Any) -> int:
        return int(dask_worker.transfer_outgoing_bytes_total)

    return sum(client.run(count).values())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--budget", default="128MB")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--microbatch", type=int, default=None, help="rows per micro-batch (default: one)")
    parser.add_argument("--memory-limit", default="2GB", help="Dask memory_limit of each worker")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import crowdgraph
    from crowdgraph import zoo
    from crowdgraph.runtime import open_session, run_session
    from crowdgraph.units import format_bytes, parse_bytes
    from distributed import Client, LocalCluster

    from crowdgraph_dask import MEMORY_RESOURCE, DaskExecutor

    model = zoo.distilbert("full")
    batch = zoo.sample_inputs(model, batch=args.batch, sequence=args.sequence)
    t = time.perf_counter()
    compiled = crowdgraph.compile(model, args.budget, sample=batch)
    compile_s = time.perf_counter() - t
    want = run_session(open_session(model.SerializeToString()), batch)
    budget = parse_bytes(args.budget)
    print(f"{len(compiled.partitions)} partitions for {args.budget} at {args.batch}x{args.sequence} "
          f"(compiled in {compile_s:.1f} s); largest needs {format_bytes(max(p.resident_bytes for p in compiled.partitions))}")

    result: dict[str, Any] = {
        "model": "zoo.distilbert('full')", "budget": args.budget, "batch": args.batch,
        "sequence": args.sequence, "microbatch": args.microbatch, "workers": args.workers,
        "partitions": len(compiled.partitions), "compile_s": round(compile_s, 2),
        "cpus": os.cpu_count(), "python": platform.python_version(), "runs": [],
    }
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      memory_limit=args.memory_limit, resources={MEMORY_RESOURCE: budget},
                      dashboard_address=":0", silence_logs=40) as cluster, \
            Client(cluster, set_as_default=False) as client, DaskExecutor(client) as executor:
        for label in ("cold", "warm"):
            before = _outgoing(client)
            t = time.perf_counter()
            got = compiled.run(batch, executor=executor, microbatch=args.microbatch)
            report = compiled.last_report
            wall = time.perf_counter() - t
            moved = _outgoing(client) - before
            diff = max(float(np.max(np.abs(got[k].astype(np.float64) - want[k]))) for k in want)
            run = {
                "run": label, "wall_s": round(wall, 3), "makespan_s": round(report.makespan, 3),
                "tasks": len(report.tasks), "loads": len(report.loads), "tiers": report.tier_counts,
                "weight_bytes_sent": report.weight_bytes_sent,
                "dask_transfer_bytes": moved,
                "crowdgraph_wire_in_bytes": sum(t.wire_in for t in report.tasks),
                "task_input_bytes": sum(t.bytes_in for t in report.tasks),
                "task_output_bytes": sum(t.bytes_out for t in report.tasks),
                "peak_worker_rss": max((w.peak_rss or 0) for w in report.workers.values()),
                "max_worker_rss_after_task": max((w.rss or 0) for w in report.workers.values()),
                "max_abs_diff": diff,
            }
            result["runs"].append(run)
            print(f"{label}: {wall:.2f} s wall, {len(report.loads)} loads "
                  f"({format_bytes(report.weight_bytes_sent)} of weights), "
                  f"Dask moved {format_bytes(moved)} between processes "
                  f"(crowdgraph wire_in {format_bytes(run['crowdgraph_wire_in_bytes'])}), "
                  f"tiers {report.tier_counts}, max |diff| {diff:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
