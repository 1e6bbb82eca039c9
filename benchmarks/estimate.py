"""Estimated vs measured resident memory of DistilBERT partitions (fresh processes).

Run: python -m benchmarks.estimate [--quick]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import crowdgraph
from crowdgraph import zoo
from crowdgraph.measure import measure_plan

RESULTS = pathlib.Path(__file__).parent / "results"


def models(quick: bool):
    """(label, model, feeds-maker) for the models to measure."""
    yield "embedded DistilBERT", zoo.distilbert("tiny" if quick else "full"), lambda m, b: zoo.sample_inputs(m, batch=b, sequence=128 if not quick else 64)
    if not quick:
        from tests import models as test_models

        path = test_models.exported_distilbert("full")
        yield "exported DistilBERT", str(path), lambda m, b: test_models.exported_distilbert_inputs(b, 128, size="full")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget", default="128MB")
    args = parser.parse_args(argv)
    rows = []
    for label, model, feeds_for in models(args.quick):
        for batch in (1, 8):
            feeds = feeds_for(model, batch)
            budget = "16MB" if args.quick else args.budget
            compiled = crowdgraph.compile(model, budget, sample=feeds)
            with tempfile.TemporaryDirectory() as tmp:
                for part, row in zip(compiled.partitions, measure_plan(compiled, feeds, pathlib.Path(tmp) / "plan")):
                    rows.append({"model": label, "shape": f"{batch}x{feeds['input_ids'].shape[1]}", "budget": budget,
                                 "partition": part.name, "weights": part.weight_bytes, "estimate": part.resident_bytes,
                                 "measured": row["above_floor"], "floor": row["floor"]})
    print(f"{'model':22} {'shape':7} {'part':4} {'weights MB':>10} {'estimate MB':>11} {'measured MB':>11} {'meas/est':>8}")
    for r in rows:
        print(f"{r['model']:22} {r['shape']:7} {r['partition']:4} {r['weights'] / 1e6:10.1f} {r['estimate'] / 1e6:11.1f} "
              f"{r['measured'] / 1e6:11.1f} {r['measured'] / r['estimate']:8.2f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "estimate.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
