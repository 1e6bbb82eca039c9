"""Estimated vs measured resident memory of DistilBERT partitions (fresh processes).

First, what onnxruntime itself costs: chains of 1 and 64 tiny nodes are
run in fresh processes, once with the floor taken before any session
(*cold*, as crowdgraph measured before workers warmed up) and once after
:func:`crowdgraph.runtime.warm_up` (*warm*, as workers and the estimate
do now).  The warm-up's own cost is the once-cost each worker pays; what
a session costs above the warm floor is what every partition's estimate
carries.  Then every partition of the DistilBERT plans is measured warm
(the promise: at most its estimate) and cold, and every partition of the
image models whose large activations are tiled (ResNet-50, Inception v1
and DenseNet-121 at 16 MB, the U-Net at 512x512 and 32 MB) and of tiny
DistilBERT at 4x128 and 3 MB, chunked along the sequence, warm.

Run: python -m benchmarks.estimate [--quick]
"""

from __future__ import annotations

import pathlib
import tempfile
import time
from typing import Any

import onnx

import crowdgraph
from crowdgraph import zoo
from crowdgraph.measure import measure_in_fresh_process, measure_plan
from crowdgraph.partition import RUNTIME_BASE_BYTES, RUNTIME_NODE_BYTES

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


def runtime_rows(folder: pathlib.Path, repeats: int = 3) -> list[dict[str, Any]]:
    """Cold and warm cost of sessions on tiny models, the smallest of ``repeats`` fresh processes each."""
    from tests.models import relu_chain

    rows = []
    for nodes in (1, 64):
        model, feeds = relu_chain(nodes)
        path = folder / f"relu{nodes}.onnx"
        onnx.save_model(model, str(path))
        cold = [measure_in_fresh_process(path, feeds, warm=False) for _ in range(repeats)]
        warm = [measure_in_fresh_process(path, feeds) for _ in range(repeats)]
        rows.append({"nodes": nodes, "cold": min(r["above_floor"] for r in cold),
                     "warm": min(r["above_floor"] for r in warm),
                     "once": min(r["floor"] - r["cold_floor"] for r in warm),
                     "estimate": RUNTIME_BASE_BYTES + RUNTIME_NODE_BYTES * nodes})
    return rows


#: Models whose activation-bound nodes are tiled (images) or chunked along the sequence (a transformer),
#: and the budget each is measured at.
TILED_PLANS = (("resnet50", "16MB"), ("inception_v1", "16MB"), ("densenet121", "16MB"), ("unet", "32MB"),
               ("tiny DistilBERT", "3MB"))
#: None with --quick: the smallest chunked plan is 18 to 27 partitions, each measured in its own
#: process (most of the quick run's time), and tests/test_memory.py's slow
#: test_sequence_chunked_partitions_stay_within_estimates measures this one (tiny DistilBERT, 4x128,
#: 3 MB) and asserts on each partition.
QUICK_TILED_PLANS: tuple[tuple[str, str], ...] = ()


def _tiled_case(name: str) -> tuple[Any, dict[str, Any]]:
    from tests import models as test_models

    if name == "unet":
        return zoo.unet(), zoo.image_inputs()
    if name == "tiny DistilBERT":
        model = zoo.distilbert("tiny")
        return model, zoo.sample_inputs(model, batch=4, sequence=128)
    return test_models.light_cnn(name)


def tiled_rows(quick: bool) -> list[dict[str, Any]]:
    """Every partition of the tiled and chunked plans, estimated and measured warm in fresh processes."""
    rows, summary = [], []
    for name, budget in QUICK_TILED_PLANS if quick else TILED_PLANS:
        model, feeds = _tiled_case(name)
        compiled = crowdgraph.compile(model, budget, sample=feeds)
        tiled = {n for r in compiled.splits for n in r.new_nodes if r.region}
        with tempfile.TemporaryDirectory() as tmp:
            measured = measure_plan(compiled, feeds, pathlib.Path(tmp) / "plan")
        mine = [{"model": name, "budget": budget, "partition": part.name, "tiled": bool(tiled & set(part.nodes)),
                 "estimate": part.resident_bytes, "measured": row["above_floor"]}
                for part, row in zip(compiled.partitions, measured)]
        rows.extend(mine)
        summary.append((name, "x".join(map(str, next(iter(feeds.values())).shape)), budget,
                        len(mine), sum(r["tiled"] for r in mine), max(r["estimate"] for r in mine) / 1e6,
                        max(r["measured"] for r in mine) / 1e6, max(r["measured"] / r["estimate"] for r in mine)))
    show(table(["model", "shape", "budget", "partitions", "with tiles", "max estimate MB", "max measured MB",
                "worst meas/est"], summary,
               title="Tiled and chunked models: estimated vs measured resident memory above the floor, fresh processes"))
    return rows


def run(quick: bool = False, out: pathlib.Path = RESULTS, budget: str = "128MB") -> dict[str, Any]:
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runtime = runtime_rows(pathlib.Path(tmp), repeats=1 if quick else 3)
    show(table(["nodes", "once-cost MB", "cold session MB", "warm session MB", "estimate MB"],
               [(r["nodes"], r["once"] / 1e6, r["cold"] / 1e6, r["warm"] / 1e6, r["estimate"] / 1e6)
                for r in runtime],
               title="onnxruntime's own cost above the floor, fresh processes (cold: no warm-up; warm: after it)"))
    rows = []
    for label, model, feeds_for in models(quick):
        for batch in (1, 8):
            feeds = feeds_for(model, batch)
            budget = "16MB" if quick else budget
            compiled = crowdgraph.compile(model, budget, sample=feeds)
            with tempfile.TemporaryDirectory() as tmp:
                warm = measure_plan(compiled, feeds, pathlib.Path(tmp) / "plan")
                cold = measure_plan(compiled, feeds, pathlib.Path(tmp) / "plan", warm=False)
                for part, row, first in zip(compiled.partitions, warm, cold):
                    rows.append({"model": label, "shape": f"{batch}x{feeds['input_ids'].shape[1]}", "budget": budget,
                                 "partition": part.name, "weights": part.weight_bytes, "estimate": part.resident_bytes,
                                 "measured": row["above_floor"], "floor": row["floor"],
                                 "cold": first["above_floor"], "cold_floor": first["floor"]})
    show(table(["model", "shape", "part", "weights MB", "estimate MB", "measured MB", "meas/est", "cold MB"],
               [(r["model"], r["shape"], r["partition"], r["weights"] / 1e6, r["estimate"] / 1e6,
                 r["measured"] / 1e6, r["measured"] / r["estimate"], r["cold"] / 1e6) for r in rows],
               title=f"Estimated vs measured resident memory above the floor, budget {budget}, fresh processes"))
    images = tiled_rows(quick)
    worst = max(r["measured"] / r["estimate"] for r in rows + images)
    targets = [Target(NAME, "largest measured / estimated resident memory of a partition", worst, 1.0, "<=")]
    targets.append(Target(NAME, "largest warm session cost / its estimate (tiny models)",
                          max(r["warm"] / r["estimate"] for r in runtime), 1.0, "<="))
    return common.result(NAME, quick, config={"budget": budget, "runtime": runtime, "images": images}, rows=rows,
                         targets=targets,
                         seconds=time.perf_counter() - began)


def main(argv=None) -> dict[str, Any]:
    return common.module_main(NAME, run, __doc__, argv)


if __name__ == "__main__":
    main()
