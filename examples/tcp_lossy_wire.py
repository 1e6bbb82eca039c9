"""Send boundary tensors as fp16 or int8 between TCP workers, and bound the error that costs.

The tiny DistilBERT runs on three ``crowdgraph-worker`` processes on
127.0.0.1, three times: with the exact wire (lz4), then with
``lossy="fp16"`` and ``lossy="int8"``.  ``max_error=`` makes each run
measure the error the wire put in the logits (against a lossless run of the
first micro-batch) and fall back to an exact run above the bound; the
report keeps the figure as ``wire_error``.

Run it: ``python examples/tcp_lossy_wire.py`` (needs ``pip install -e executors/tcp``).
"""

from __future__ import annotations

import numpy as np

import crowdgraph
from crowdgraph import zoo
from crowdgraph.runtime import open_session, run_session
from crowdgraph_tcp import TcpExecutor

MAX_ERROR = 0.05


def main() -> None:
    model = zoo.distilbert("tiny")
    batch = zoo.sample_inputs(model, batch=8, sequence=32)
    compiled = crowdgraph.compile(model, partitions=3, sample={k: v[:4] for k, v in batch.items()})
    expected = run_session(open_session(model.SerializeToString()), batch)
    # Lossy encodings are agreed per link with the coordinator; direct=False sends the exact run
    # through the coordinator too (a lossy run always does), so the bytes compare on the same links.
    with TcpExecutor.local(workers=3, memory="64MB", direct=False) as executor:
        for lossy in (None, "fp16", "int8"):
            executor.lossy = lossy
            outputs = compiled.run(batch, executor=executor, microbatch=4, max_error=MAX_ERROR, timeout=60)
            report = compiled.last_report
            sent = sum(t.wire_in + t.wire_out for t in report.tasks)
            diff = float(np.max(np.abs(outputs["logits"] - expected["logits"])))
            print(f"wire {lossy or 'exact'}: tensor bytes on the wire {sent}; wire error {report.wire_error:.3g} "
                  f"(bound {MAX_ERROR}); max abs difference to the whole model: {diff:.3g}")
            for note in report.notes:
                print(f"  {note}")


if __name__ == "__main__":
    main()
