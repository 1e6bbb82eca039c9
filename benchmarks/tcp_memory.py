"""What a crowdgraph-tcp worker really costs: peak RSS above its idle floor, and bytes sent.

The embedded full DistilBERT (``zoo.distilbert("full")``) is compiled for a
budget (128MB by default) at batch 1 x 128 and run twice on a local crowd of
``crowdgraph-worker`` processes (``TcpExecutor.local``, 5 workers, one
onnxruntime thread each), over real sockets on 127.0.0.1.  Per worker:

* ``floor``: the idle worker's RSS (Python, numpy, onnxruntime, the wire
  codec; no partition), which the worker announces in HELLO;
* ``peak``: the peak RSS the worker reports with its results (the kernel's
  high-water mark, reset just before the partition is opened, after its
  bytes arrived and were written to the cache);
* ``above floor`` = peak - floor, what the partition estimate promises to bound;
* ``estimate``: the partition's resident estimate.

Then the partition bytes sent on the first run (everything goes over the
wire) and on the second run on the same crowd (nothing should).

Run: ``python benchmarks/tcp_memory.py [--budget 128MB] [--workers 5] [--json out.json]``
(needs ``pip install -e executors/tcp``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import crowdgraph
from crowdgraph import zoo
from crowdgraph.runtime import open_session, run_session
from crowdgraph.units import format_bytes


def mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def measure(size: str = "full", budget: str = "128MB", workers: int = 5, sequence: int = 128) -> dict:
    from crowdgraph_tcp import TcpExecutor

    model = zoo.distilbert(size)
    feeds = zoo.sample_inputs(model, batch=1, sequence=sequence)
    compiled = crowdgraph.compile(model, budget, sample=feeds)
    expected = run_session(open_session(model.SerializeToString()), feeds)["logits"]
    estimates = {p.name: p.resident_bytes for p in compiled.partitions}
    runs = []
    with TcpExecutor.local(workers=workers, memory=budget) as ex:
        floors = {w: peer.floor_rss for w, peer in dict(ex.coordinator.workers).items()}
        for attempt in (1, 2):
            start = time.perf_counter()
            out = compiled.run(feeds, executor=ex, timeout=600)
            report = compiled.last_report
            seconds = time.perf_counter() - start
            diff = float(np.max(np.abs(out["logits"] - expected)))
            parts = {}
            for t in report.tasks:
                parts.setdefault(t.worker, []).append(t.partition)
            rows = []
            for w, rec in sorted(report.workers.items()):
                floor = floors.get(w)
                rows.append({"worker": w, "partitions": parts.get(w, []), "budget": rec.memory,
                             "estimate": max((estimates[p] for p in parts.get(w, [])), default=None),
                             "floor": floor, "peak": rec.peak_rss,
                             "above_floor": rec.peak_rss - floor if rec.peak_rss and floor else None,
                             "rss_after": rec.rss, "loads": rec.loads, "tiers": rec.tiers})
            runs.append({"run": attempt, "seconds": seconds, "max_abs_diff": diff,
                         "weight_bytes_sent": report.weight_bytes_sent, "tiers": report.tier_counts,
                         "workers": rows})
    return {"model": f"distilbert-{size}", "budget": budget, "shape": [1, sequence], "workers": workers,
            "partitions": [{"name": p.name, "estimate": p.resident_bytes, "weights": p.weight_bytes,
                            "bytes": len(p.model_bytes)} for p in compiled.partitions],
            "runs": runs}


def show(result: dict) -> None:
    print(f"{result['model']} at {result['shape'][0]}x{result['shape'][1]}, budget {result['budget']}, "
          f"{result['workers']} workers, {len(result['partitions'])} partitions "
          "(" + ", ".join(f"{p['name']} {mb(p['estimate'])} MiB" for p in result["partitions"]) + ")")
    for run in result["runs"]:
        print(f"\nrun {run['run']}: {run['seconds']:.2f} s, max abs diff {run['max_abs_diff']:.1e}, "
              f"partition bytes sent {format_bytes(run['weight_bytes_sent'])} ({run['weight_bytes_sent']} B), "
              f"tiers {run['tiers']}")
        print(f"{'worker':<7} {'partition':<10} {'estimate MiB':>12} {'floor MiB':>10} {'peak MiB':>9} "
              f"{'above floor MiB':>15} {'RSS after MiB':>13}")
        for r in run["workers"]:
            print(f"{r['worker']:<7} {','.join(r['partitions']) or '-':<10} {mb(r['estimate']):>12} "
                  f"{mb(r['floor']):>10} {mb(r['peak']):>9} {mb(r['above_floor']):>15} {mb(r['rss_after']):>13}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="full", choices=["full", "tiny"])
    parser.add_argument("--budget", default="128MB")
    parser.add_argument("--workers", type=int, default=5)
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = measure(args.size, args.budget, args.workers, args.sequence)
    show(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
