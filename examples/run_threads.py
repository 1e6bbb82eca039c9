"""Run a model on a crowd of thread workers with different budgets and speeds.

Run it: ``python examples/run_threads.py`` (writes timeline.png here)
"""

from __future__ import annotations

import numpy as np

import crowdgraph
from crowdgraph import ThreadExecutor, WorkerInfo, zoo
from crowdgraph.runtime import open_session, run_session


def main() -> None:
    model = zoo.distilbert("tiny")
    batch = zoo.sample_inputs(model, batch=16, sequence=32)
    compiled = crowdgraph.compile(model, partitions=4, sample={k: v[:4] for k, v in batch.items()})
    big = max(p.resident_bytes for p in compiled.partitions)
    crowd = [WorkerInfo("laptop", memory=2 * big, speed=1.0),
             WorkerInfo("pi", memory=big, speed=0.5),
             WorkerInfo("phone", memory=big, speed=0.3)]
    with ThreadExecutor(workers=crowd) as executor:
        outputs = compiled.run(batch, executor=executor, microbatch=4, mode="streaming")
    report = compiled.last_report
    print(report)
    expected = run_session(open_session(model.SerializeToString()), batch)
    print(f"max abs difference to the whole model: {np.max(np.abs(outputs['logits'] - expected['logits'])):.2e}")
    report.plot_timeline("timeline.png")
    print("timeline written to timeline.png")


if __name__ == "__main__":
    main()
