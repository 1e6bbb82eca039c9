"""Fit DistilBERT at a 512-token sequence onto 16 MB phones: attention and the FFN run in sequence chunks.

At 1x512 the attention scores are 1x12x512x512 (12.6 MB) and the masked
Add and Softmax on them need 58 MB each, far above a phone's budget, though
no weight is that large.  Those ops treat each position on its own, so
compile() runs them in chunks of positions (the keys, values and the mask
read whole by every chunk); every partition fits the budget and the logits
still equal one whole-model session.

Run it: ``python examples/chunk_long_sequence.py [SIZE] [SEQUENCE] [BATCH] [BUDGET]``
(default ``full 512 1 16MB``; ``tiny 128 4 3MB`` is the same in seconds)
"""

from __future__ import annotations

import sys
import time

import numpy as np

import crowdgraph
from crowdgraph import ThreadExecutor, WorkerInfo, zoo
from crowdgraph.runtime import open_session, run_session


def main() -> None:
    defaults = ["full", "512", "1", "16MB"]
    size, sequence, batch, budget = (sys.argv[1:] + defaults[len(sys.argv) - 1:])[:4]
    model = zoo.distilbert(size)
    feeds = zoo.sample_inputs(model, batch=int(batch), sequence=int(sequence))
    start = time.perf_counter()
    compiled = crowdgraph.compile(model, budget, sample=feeds)
    print(f"compiled {size} DistilBERT at {batch}x{sequence} for {budget} in {time.perf_counter() - start:.1f} s, "
          f"{len(compiled.partitions)} partitions")
    lines = compiled.table().splitlines()
    summary = next(k for k, line in enumerate(lines) if " partitions; budget " in line)
    print("\n".join(lines[summary:]))  # the summary line, the split nodes and the chunked regions
    phones = [WorkerInfo(f"phone{i}", memory=budget) for i in range(2)]
    with ThreadExecutor(workers=phones) as executor:
        outputs = compiled.run(feeds, executor=executor)
    expected = run_session(open_session(model.SerializeToString()), feeds)
    print(f"max abs difference to the whole model: {np.max(np.abs(outputs['logits'] - expected['logits'])):.2e}")


if __name__ == "__main__":
    main()
