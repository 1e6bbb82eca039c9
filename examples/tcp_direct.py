"""Tensors between partitions go from worker to worker, not through the coordinator.

The tiny DistilBERT, cut into three partitions, runs on four
``crowdgraph-worker`` processes, once with every tensor through the
coordinator (``TcpExecutor(direct=False)``) and once as by default: each
worker holds the outputs the next partition reads, and the worker running
that partition fetches them from the holder's peer port (both prove the
crowd's token).  The coordinator then carries only the model's inputs,
its outputs and the small tensors a fetch would not pay for.

Run it: ``python examples/tcp_direct.py`` (needs ``pip install -e executors/tcp``).
"""

from __future__ import annotations

import numpy as np

import crowdgraph
from crowdgraph import zoo
from crowdgraph.runtime import open_session, run_session
from crowdgraph.units import format_bytes
from crowdgraph_tcp import TcpExecutor


def main() -> None:
    model = zoo.distilbert("tiny")
    batch = zoo.sample_inputs(model, batch=16, sequence=128)
    compiled = crowdgraph.compile(model, partitions=3, sample={k: v[:4] for k, v in batch.items()})
    expected = run_session(open_session(model.SerializeToString()), batch)
    for direct in (False, True):
        with TcpExecutor.local(workers=4, memory="64MB", direct=direct) as executor:
            outputs = compiled.run(batch, executor=executor, microbatch=4, timeout=60)
        report = compiled.last_report
        through = sum(t.wire_in + t.wire_out for t in report.tasks)
        diff = float(np.max(np.abs(outputs["logits"] - expected["logits"])))
        print(f"direct={direct}: {format_bytes(through)} of tensors through the coordinator; "
              f"max abs difference to the whole model: {diff:.2e}")


if __name__ == "__main__":
    main()
