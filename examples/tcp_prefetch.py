"""Stream each worker the partition it will load next, to its disk, while it computes.

The tiny DistilBERT, cut into six partitions, runs on two
``crowdgraph-worker`` processes: more partitions than workers, so each
worker loads several in turn.  Each crowd starts cold (empty caches),
once as usual and once with ``TcpExecutor(prefetch=True)``: then the
coordinator sends a busy worker the partition the scheduler expects it to
load next (in STORE frames, to its cache, never to its memory), and that
load reads it from disk (tier 2) instead of waiting for its bytes.

Run it: ``python examples/tcp_prefetch.py`` (needs ``pip install -e executors/tcp``).
"""

from __future__ import annotations

import numpy as np

import crowdgraph
from crowdgraph import zoo
from crowdgraph.runtime import open_session, run_session
from crowdgraph_tcp import TcpExecutor


def main() -> None:
    model = zoo.distilbert("tiny")
    batch = zoo.sample_inputs(model, batch=8, sequence=32)
    compiled = crowdgraph.compile(model, partitions=6, sample={k: v[:2] for k, v in batch.items()})
    expected = run_session(open_session(model.SerializeToString()), batch)
    for prefetch in (False, True):
        with TcpExecutor.local(workers=2, memory="64MB", prefetch=prefetch) as executor:
            outputs = compiled.run(batch, executor=executor, microbatch=2, timeout=60)
        report = compiled.last_report
        diff = float(np.max(np.abs(outputs["logits"] - expected["logits"])))
        from_disk = sum(load.from_cache for load in report.loads)
        print(f"prefetch={prefetch}: {len(report.stored)} partitions stored ahead; {from_disk} of "
              f"{len(report.loads)} loads read from disk; tiers {report.tier_counts}; partition bytes sent "
              f"with loads {report.weight_bytes_sent}; max abs difference to the whole model: {diff:.2e}")


if __name__ == "__main__":
    main()
