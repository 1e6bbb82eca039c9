"""Run the tiny DistilBERT on three worker *processes* that talk TCP on 127.0.0.1.

``TcpExecutor.local`` starts a coordinator in this process and three
``crowdgraph-worker`` processes (the agent a phone or a Pi runs) that
connect to it; the run then goes over real sockets.  The second run on the
same crowd sends few or no partition bytes: the workers still hold them, or
read them from their cache.

Run it: ``python examples/tcp_local.py`` (needs ``pip install -e executors/tcp``).
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
    compiled = crowdgraph.compile(model, partitions=3, sample={k: v[:2] for k, v in batch.items()})
    expected = run_session(open_session(model.SerializeToString()), batch)
    with TcpExecutor.local(workers=3, memory=["24MB", "32MB", "64MB"]) as executor:
        print(f"coordinator at {executor.url}; workers {', '.join(executor.processes)}")
        for attempt in ("first", "second"):
            outputs = compiled.run(batch, executor=executor, microbatch=2, mode="streaming", timeout=60)
            report = compiled.last_report
            diff = float(np.max(np.abs(outputs["logits"] - expected["logits"])))
            print(f"\n{attempt} run:")
            print(report)
            print(f"max abs difference to the whole model: {diff:.2e}")
            print(f"partition bytes sent: {report.weight_bytes_sent}")


if __name__ == "__main__":
    main()
