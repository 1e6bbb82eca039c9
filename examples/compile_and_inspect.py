"""Cut a model into partitions for a memory budget, look at them, save the plan.

Run it: ``python examples/compile_and_inspect.py [PLAN_FOLDER]``
"""

from __future__ import annotations

import sys
import tempfile

import crowdgraph
from crowdgraph import zoo


def main() -> None:
    model = zoo.distilbert("tiny")          # or a path: "distilbert.onnx"
    compiled = crowdgraph.compile(model, memory_budget="4MB", input_shapes={"input_ids": (4, 64)})
    print(compiled.table())
    for source, target, data in compiled.graph.edges(data=True):
        print(f"{source} -> {target}: {', '.join(data['tensors'])}")
    folder = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
    plan = compiled.save(f"{folder}/plan")
    again = crowdgraph.load(plan)
    print(f"saved {len(again.partitions)} partitions to {plan}; sha256 of p0: {again.partitions[0].sha256[:16]}...")


if __name__ == "__main__":
    main()
