"""Fit DistilBERT onto 16 MB phones: nodes too big for the budget are split.

The word-embedding table alone is 93.8 MB, so without operator splitting
no partition of DistilBERT could fit under about 97 MB.  compile() cuts
the embedding lookup into row shards and the largest FFN MatMuls into
column or inner-dimension pieces, each small enough for a 16 MB worker,
and the results still equal one whole-model session.

Run it: ``python examples/split_small_budget.py [BUDGET]`` (default 16MB)
"""

from __future__ import annotations

import sys
import time

import numpy as np

import crowdgraph
from crowdgraph import ThreadExecutor, WorkerInfo, zoo
from crowdgraph.runtime import open_session, run_session


def main() -> None:
    budget = sys.argv[1] if len(sys.argv) > 1 else "16MB"
    model = zoo.distilbert("full")
    batch = zoo.sample_inputs(model, batch=2, sequence=128)
    start = time.perf_counter()
    compiled = crowdgraph.compile(model, budget, sample=batch)
    print(f"compiled for {budget} in {time.perf_counter() - start:.1f} s:")
    print(compiled.table())
    phones = [WorkerInfo(f"phone{i}", memory=budget) for i in range(2)]
    with ThreadExecutor(workers=phones) as executor:
        outputs = compiled.run(batch, executor=executor)
    print(compiled.last_report)
    expected = run_session(open_session(model.SerializeToString()), batch)
    print(f"max abs difference to the whole model: {np.max(np.abs(outputs['logits'] - expected['logits'])):.2e}")


if __name__ == "__main__":
    main()
