"""Run the tiny DistilBERT on a Dask cluster of two worker processes, twice.

Each Dask worker keeps the partitions it loaded on its local disk, by
sha256.  The second run, with a new executor on the same cluster, learns
from the workers what they keep and loads those partitions from their
disks (tier 2): no partition bytes travel for them.

Run it: ``python examples/dask_local.py`` (needs ``pip install -e executors/dask``).
"""

from __future__ import annotations

import numpy as np
from dask.distributed import Client, LocalCluster

import crowdgraph
from crowdgraph import zoo
from crowdgraph.runtime import open_session, run_session
from crowdgraph_dask import DaskExecutor


def main() -> None:
    model = zoo.distilbert("tiny")
    batch = zoo.sample_inputs(model, batch=8, sequence=32)
    compiled = crowdgraph.compile(model, partitions=3, sample={k: v[:2] for k, v in batch.items()})
    expected = run_session(open_session(model.SerializeToString()), batch)
    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="512MB", host="127.0.0.1",
                      dashboard_address=":0", silence_logs=40) as cluster, Client(cluster) as client:
        for attempt in ("first", "second"):
            with DaskExecutor(client) as executor:  # closing it drops the sessions; the disk caches stay
                outputs = compiled.run(batch, executor=executor, microbatch=2, mode="barrier", timeout=60)
            report = compiled.last_report
            diff = float(np.max(np.abs(outputs["logits"] - expected["logits"])))
            print(f"\n{attempt} run:")
            print(report)
            print(f"max abs difference to the whole model: {diff:.2e}")
            print(f"loads from the workers' disks: {sum(ld.from_cache for ld in report.loads)} of {len(report.loads)}")
            print(f"partition bytes sent: {report.weight_bytes_sent}")


if __name__ == "__main__":  # LocalCluster starts worker processes, which import this file again
    main()
