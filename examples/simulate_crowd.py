"""How long would five phones take, or a thousand?  Simulate before you buy.

Runs crowdgraph's real scheduler and driver on a virtual clock with a cost
model of phones on Wi-Fi, compares streaming micro-batches with barrier
synchronisation (CROWDio's two modes), then shows a bigger crowd being a
faster crowd: the default placement rule loads replicas of the busiest
partitions, where the pipeline rule keeps one phone per partition.

Run it: ``python examples/simulate_crowd.py``
"""

from __future__ import annotations

import crowdgraph
from crowdgraph import CostModel, WorkerInfo, zoo


def main() -> None:
    compiled = crowdgraph.compile(zoo.distilbert("full"), "128MB", input_shapes={"input_ids": (8, 128)})
    phones = [WorkerInfo(f"phone{n}", memory="128MB", speed=s) for n, s in enumerate([1.0, 0.8, 0.6, 0.5, 0.4])]
    wifi = CostModel(flops_per_second=5e9, bandwidth=10e6)
    for mode in ("barrier", "streaming"):
        report = crowdgraph.simulate(compiled, phones, (64, 128), microbatch=8, mode=mode, cost=wifi)
        print(f"{mode:9}: 64x128 on 5 phones in {report.makespan:6.2f} virtual seconds")

    # Phones that already have every partition on local storage (a warm crowd).
    names = frozenset(p.name for p in compiled.partitions)
    print("64 micro-batches of 1 row, warm phones: makespan in virtual seconds")
    for n in (3, 12, 40):
        crowd = [WorkerInfo(f"phone{k}", memory="128MB", cached=names) for k in range(n)]
        spans = {policy: crowdgraph.simulate(compiled, crowd, (64, 128), microbatch=1, cost=wifi,
                                             policy=policy).makespan
                 for policy in ("pipeline", "cost")}
        print(f"  {n:3} phones: pipeline rule {spans['pipeline']:6.1f}, cost rule {spans['cost']:6.1f}")

    crowd = [WorkerInfo(f"phone{n}", memory="128MB", speed=0.4 + (n % 7) / 10) for n in range(1000)]
    report = crowdgraph.simulate(compiled, crowd, (8 * 500, 128), microbatch=8, cost=wifi)
    busiest = max(len(workers) for workers in report.holders.values())
    print(f"1000 phones, 500 micro-batches: {report.makespan:.1f} virtual seconds, "
          f"{sum(1 for w in report.workers.values() if w.tasks)} phones busy, "
          f"up to {busiest} holding one partition")
    for note in report.notes:
        print(f"  {note}")


if __name__ == "__main__":
    main()
