"""Fit a U-Net at 512x512 onto 32 MB phones: large feature maps are cut into row tiles.

The U-Net's weights are tiny, but each full-resolution feature map is
8.4 MB and its largest node needs 77 MB.  compile() runs those nodes on
bands of rows, each with the halo of rows its convolutions reach, so
every partition fits the budget, and the results still equal one
whole-model session.

Run it: ``python examples/tile_image_model.py [BUDGET]`` (default 32MB)
"""

from __future__ import annotations

import sys
import time

import numpy as np

import crowdgraph
from crowdgraph import ThreadExecutor, WorkerInfo, zoo
from crowdgraph.runtime import open_session, run_session


def main() -> None:
    budget = sys.argv[1] if len(sys.argv) > 1 else "32MB"
    model = zoo.unet()
    batch = zoo.image_inputs(batch=1, height=512, width=512)
    start = time.perf_counter()
    compiled = crowdgraph.compile(model, budget, sample=batch)
    print(f"compiled for {budget} in {time.perf_counter() - start:.1f} s:")
    print(compiled.table())
    phones = [WorkerInfo(f"phone{i}", memory=budget) for i in range(2)]
    with ThreadExecutor(workers=phones) as executor:
        outputs = compiled.run(batch, executor=executor)
    print(compiled.last_report)
    expected = run_session(open_session(model.SerializeToString()), batch)
    print(f"max abs difference to the whole model: {np.max(np.abs(outputs['scores'] - expected['scores'])):.2e}")


if __name__ == "__main__":
    main()
