"""Estimated vs measured resident memory of DistilBERT partitions (fresh processes).

Run: python -m benchmarks.estimate [--quick]
"""

from __future__ import annotations

import pathlib
import tempfile
import time
from typing import Any

import crowdgraph
from crowdgraph import zoo
from crowdgraph.measure import measure_plan

from . import common
from .common import Target, show, table

NAME = "estimate"
RESULTS = common.RESULTS


def models(quick: bool):
    """(label, model, feeds-maker) for the models to measure."""
    yield "embedded DistilBERT", zoo.distilbert("tiny" if quick else "full"), lambda m, b: zoo.sample_inputs(m, batch=b, sequence=128 if not quick else 64)
    if not quick:
        from tests import models as test_models

        path = test_models.exported_distilbert("full")
        yield "exported DistilBERT", str(path), lambda m, b: test_models.exported_distilbert_inputs(b, 128, size="full")


def run(quick: bool = False, out: pathlib.Path = RESULTS, budget: str = "128MB") -> dict[str, Any]:
    began = time.perf_counter()
    rows = []
    for label, model, feeds_for in models(quick):
        for batch in (1, 8):
            feeds = feeds_for(model, batch)
            budget = "16MB" if quick else budget
            compiled = crowdgraph.compile(model, budget, sample=feeds)
            with tempfile.TemporaryDirectory() as tmp:
                for part, row in zip(compiled.partitions, measure_plan(compiled, feeds, pathlib.Path(tmp) / "plan")):
                    rows.append({"model": label, "shape": f"{batch}x{feeds['input_ids'].shape[1]}", "budget": budget,
                                 "partition": part.name, "weights": part.weight_bytes, "estimate": part.resident_bytes,
                                 "measured": row["above_floor"], "floor": row["floor"]})
    show(table(["model", "shape", "part", "weights MB", "estimate MB", "measured MB", "meas/est"],
               [(r["model"], r["shape"], r["partition"], r["weights"] / 1e6, r["estimate"] / 1e6,
                 r["measured"] / 1e6, r["measured"] / r["estimate"]) for r in rows],
               title=f"Estimated vs measured resident memory above the floor, budget {budget}, fresh processes"))
    worst = max(r["measured"] / r["estimate"] for r in rows)
    targets = [Target(NAME, "largest measured / estimated resident memory of a partition", worst, 1.0, "<=")]
    return common.result(NAME, quick, config={"budget": budget}, rows=rows, targets=targets,
                         seconds=time.perf_counter() - began)


def main(argv=None) -> dict[str, Any]:
    return common.module_main(NAME, run, __doc__, argv)


if __name__ == "__main__":
    main()
