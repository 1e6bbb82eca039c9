"""Compile: partitions fit the budget, are valid models, and reproduce the oracle."""

from __future__ import annotations

import os
import pathlib

import networkx as nx
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

import crowdgraph
from crowdgraph import zoo
from crowdgraph.lower import lower, outer_scope_names
from crowdgraph.partition import RUNTIME_BASE_BYTES, _Cutter
from tests import models, plans
from tests.oracle import assert_matches, oracle, run_partitions

SMALL = {
    "chain": models.chain,
    "diamond": models.diamond,
    "skip": models.skip,
    "multi_io": models.multi_io,
    "shared_initializer": models.shared_initializer,
    "if_then": lambda: models.if_model(True),
    "if_else": lambda: models.if_model(False),
    "loop": models.loop_model,
    "constant_subgraphs": models.constant_subgraphs,
}


def check_plan(compiled: crowdgraph.CompiledModel, model: onnx.ModelProto, budget: int | None = None) -> None:
    """Invariants every plan must satisfy."""
    og = lower(model, compiled.input_shapes)
    assert nx.is_directed_acyclic_graph(compiled.graph)
    placed = [n for p in compiled.partitions for n in p.nodes]
    assert sorted(placed) == sorted(n.name for n in og.nodes), "every computing node in exactly one partition"
    for part in compiled.partitions:
        if budget is not None:
            assert part.resident_bytes <= budget, (part.name, part.resident_bytes, budget)
        m = part.model
        onnx.checker.check_model(m)
        assert m.ir_version >= 4
        read = {i for n in m.graph.node for i in n.input} | {
            name for n in m.graph.node for name in outer_scope_names(n)}
        assert all(init.name in read for init in m.graph.initializer), "only the initializers it needs"
        for vi in list(m.graph.input) + list(m.graph.output):
            assert vi.type.tensor_type.elem_type, vi.name
            assert vi.type.tensor_type.HasField("shape"), vi.name
        for name in part.inputs:
            assert name not in og.constant_bytes, f"constant {name} sent between partitions"
    for u, v, data in compiled.graph.edges(data=True):
        assert set(data["tensors"]) <= set(compiled[u].outputs) & set(compiled[v].inputs)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_small_models_match_the_oracle(name, count):
    model, feeds = SMALL[name]()
    compiled = crowdgraph.compile(model, partitions=count, sample=feeds)
    assert 1 <= len(compiled.partitions) <= count
    check_plan(compiled, model)
    assert_matches(run_partitions(compiled, feeds), oracle(model, feeds))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_budget_between_smallest_and_whole(name):
    model, feeds = SMALL[name]()
    whole = crowdgraph.compile(model, partitions=1, sample=feeds).partitions[0].resident_bytes
    finest = max(p.resident_bytes for p in crowdgraph.compile(model, partitions=10**6, sample=feeds).partitions)
    budget = (whole + finest) // 2
    compiled = crowdgraph.compile(model, budget, sample=feeds)
    check_plan(compiled, model, budget)
    assert_matches(run_partitions(compiled, feeds), oracle(model, feeds))


def test_fewer_partitions_is_preferred():
    model, feeds = models.chain()
    whole = crowdgraph.compile(model, partitions=1, sample=feeds)
    roomy = crowdgraph.compile(model, whole.partitions[0].resident_bytes, sample=feeds)
    assert len(roomy.partitions) == 1


def test_mask_goes_straight_to_every_consumer():
    model = zoo.distilbert("tiny")
    feeds = zoo.sample_inputs(model, batch=2, sequence=16)
    compiled = crowdgraph.compile(model, partitions=6, sample=feeds)
    check_plan(compiled, model)
    mask_readers = [p.name for p in compiled.partitions if any("attention_mask" in t for t in p.inputs)]
    producers = {u for u, v, d in compiled.graph.edges(data=True) if any("attention_mask" in t for t in d["tensors"])}
    assert len(mask_readers) >= 2 and len(producers) == 1, "one producer sends the mask to each reader"
    assert compiled.graph.number_of_edges() > len(compiled.partitions) - 1, "a DAG, not a chain"
    assert_matches(run_partitions(compiled, feeds), oracle(model, feeds))


@pytest.mark.parametrize("name", [
    name if name in models.QUICK_LIGHT_CNNS else pytest.param(name, marks=pytest.mark.slow)
    for name in models.LIGHT_CNNS if name not in models.SLOW_LIGHT_CNNS])
def test_light_cnns(name):
    model, feeds = models.light_cnn(name)
    compiled = crowdgraph.compile(model, partitions=4, sample=feeds)
    assert len(compiled.partitions) > 1
    check_plan(compiled, model)
    assert_matches(run_partitions(compiled, feeds), oracle(model, feeds))


@pytest.mark.slow  # vgg19 and zfnet512 are the same plain stack as AlexNet; test_zoo builds and runs them
@pytest.mark.parametrize("name", ["bvlc_alexnet"])
def test_large_light_cnns(name):
    model, feeds = models.light_cnn(name)
    compiled = crowdgraph.compile(model, partitions=3, sample=feeds)
    check_plan(compiled, model)
    assert_matches(run_partitions(compiled, feeds), oracle(model, feeds))


def test_embedded_distilbert_tiny_symbolic_dims_run_at_other_sizes():
    model = zoo.distilbert("tiny")
    compiled = crowdgraph.compile(model, partitions=4, input_shapes={"input_ids": (2, 16)})
    check_plan(compiled, model)
    for batch, seq in [(2, 16), (3, 9), (1, 40)]:
        feeds = zoo.sample_inputs(model, batch=batch, sequence=seq)
        assert_matches(run_partitions(compiled, feeds), oracle(model, feeds))


@pytest.mark.slow  # the tiny DistilBERT tests above check the same graph, fast
def test_embedded_distilbert_full_at_128mb():
    model = zoo.distilbert("full")
    feeds = zoo.sample_inputs(model, batch=1, sequence=128)
    compiled = crowdgraph.compile(model, "128MB", sample=feeds)
    check_plan(compiled, model, crowdgraph.parse_bytes("128MB"))
    assert len(compiled.partitions) >= 3
    assert_matches(run_partitions(compiled, feeds), plans.expected(model, feeds))


def test_exported_distilbert_reduced():
    path = models.exported_distilbert("reduced")
    feeds = models.exported_distilbert_inputs(2, 16)
    compiled = crowdgraph.compile(path, partitions=4, sample=feeds)
    check_plan(compiled, onnx.load(str(path)))
    assert_matches(run_partitions(compiled, feeds), oracle(str(path), feeds))


@pytest.mark.slow
def test_exported_distilbert_full_at_128mb():
    path = models.exported_distilbert("full")
    feeds = models.exported_distilbert_inputs(1, 128, size="full")
    compiled = crowdgraph.compile(path, "128MB", sample=feeds)
    check_plan(compiled, onnx.load(str(path)), crowdgraph.parse_bytes("128MB"))
    assert_matches(run_partitions(compiled, feeds), oracle(str(path), feeds))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), n_nodes=st.integers(1, 14), fraction=st.floats(0.0, 1.0))
def test_random_dags(seed, n_nodes, fraction):
    model, feeds = models.random_dag(seed, n_nodes)
    whole = crowdgraph.compile(model, partitions=1, sample=feeds).partitions[0].resident_bytes
    budget = int(RUNTIME_BASE_BYTES + fraction * (whole - RUNTIME_BASE_BYTES))
    try:
        compiled = crowdgraph.compile(model, budget, sample=feeds)
    except crowdgraph.BudgetError as exc:
        assert "needs" in str(exc) and "smallest budget" in str(exc)
        finest = crowdgraph.compile(model, partitions=10**6, sample=feeds)
        assert max(p.resident_bytes for p in finest.partitions) > budget, "refused a budget that compiles"
        return
    check_plan(compiled, model, budget)
    assert_matches(run_partitions(compiled, feeds), oracle(model, feeds))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), n_nodes=st.integers(1, 14), fraction=st.floats(0.0, 1.0))
def test_the_cut_scans_runs_exactly_and_takes_the_fewest_that_fit(seed, n_nodes, fraction):
    model, feeds = models.random_dag(seed, n_nodes)
    cutter = _Cutter(lower(model, {k: v.shape for k, v in feeds.items()}))
    n = len(cutter.nodes)
    fits: dict[int, list[int]] = {}
    budget = int(cutter.smallest_budget() + fraction * cutter.estimate(0, n).resident_bytes)
    for i in range(n):
        scanned = list(cutter.scan(i))
        assert [r.end for r in scanned] == list(range(i + 1, n + 1))
        assert [r.resident_bytes for r in scanned] == [cutter.estimate(i, r.end).resident_bytes for r in scanned]
        over = [r.end for r in scanned if r.resident_bytes > budget]
        fits[i] = [r.end for r in scanned if r.resident_bytes <= budget and r.end < min(over, default=n + 1)]
        assert [r.end for r in cutter.runs_from(i, budget)] == fits[i]
    fewest = [0] + [n + 1] * n  # fewest runs that fit covering nodes[:j], by brute force
    for i in range(n):
        for j in fits[i]:
            fewest[j] = min(fewest[j], fewest[i] + 1)
    runs = cutter.cut(budget)
    assert len(runs) == fewest[n] <= cutter.count_at(budget)
    assert all(cutter.estimate(i, j).resident_bytes <= budget for i, j in runs)


# -- inputs of every kind ---------------------------------------------------


def test_model_from_path_with_external_data(tmp_path):
    model, feeds = models.chain()
    path = tmp_path / "m.onnx"
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(model)  # saving with external data changes the proto it is given
    onnx.save_model(on_disk, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    assert (tmp_path / "m.onnx.data").exists()
    compiled = crowdgraph.compile(path, partitions=2, sample=feeds)
    assert_matches(run_partitions(compiled, feeds), oracle(model, feeds))


def test_model_from_bytes():
    model, feeds = models.diamond()
    compiled = crowdgraph.compile(model.SerializeToString(), partitions=2, sample=feeds)
    assert_matches(run_partitions(compiled, feeds), oracle(model, feeds))


def test_ir3_model_is_upgraded():
    model, feeds = models.light_cnn("squeezenet", legacy_inputs=True)
    assert model.ir_version == 3
    compiled = crowdgraph.compile(model, partitions=2, sample=feeds)
    assert all(p.model.ir_version >= 4 for p in compiled.partitions)
    assert [t.name for t in compiled.inputs] == ["data_0"], "initializers are not inputs"
    assert_matches(run_partitions(compiled, feeds), oracle(model, feeds))


# -- plans on disk ------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    model = zoo.distilbert("tiny")
    feeds = zoo.sample_inputs(model, batch=2, sequence=16)
    compiled = crowdgraph.compile(model, partitions=3, sample=feeds)
    plan = compiled.save(tmp_path / "plan")
    for part in compiled.partitions:
        assert (plan / f"{part.name}.onnx").exists()
        assert (plan / f"{part.name}.onnx.data").exists(), "weights are external data"
    loaded = crowdgraph.load(plan)
    assert [p.sha256 for p in loaded.partitions] == [p.sha256 for p in compiled.partitions]
    assert list(loaded.graph.edges) == list(compiled.graph.edges)
    assert_matches(run_partitions(loaded, feeds), oracle(model, feeds))
    compiled.save(plan)  # replacing an existing plan works
    assert sorted(os.listdir(tmp_path)) == ["plan"], "no staging folders left behind"


def test_changed_plan_is_refused(tmp_path):
    model, feeds = models.chain()
    plan = crowdgraph.compile(model, partitions=2, sample=feeds).save(tmp_path / "plan")
    data = plan / "p0.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(crowdgraph.ModelError, match="sha256"):
        crowdgraph.load(plan)


def test_failed_compile_writes_nothing(tmp_path):
    from crowdgraph.cli import main

    model, _ = models.chain()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert main(["compile", str(path), "--budget", "1kB", "-o", str(tmp_path / "plan")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_save_refuses_to_replace_a_foreign_folder(tmp_path):
    model, feeds = models.chain()
    target = tmp_path / "stuff"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(crowdgraph.ModelError, match="not a crowdgraph plan"):
        crowdgraph.compile(model, partitions=2, sample=feeds).save(target)
    assert (target / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stuff"]


# -- clear errors -------------------------------------------------------------


def test_unreadable_models(tmp_path):
    with pytest.raises(crowdgraph.ModelError, match="not found"):
        crowdgraph.compile(tmp_path / "missing.onnx", "48MB")
    with pytest.raises(crowdgraph.ModelError, match="not an ONNX model"):
        crowdgraph.compile(b"\x00\x01garbage\xff" * 10, "48MB")
    bad = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("NoSuchOp", ["y"], ["z"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2])]))
    with pytest.raises(crowdgraph.ModelError, match="not valid ONNX"):
        crowdgraph.compile(bad, "48MB")


def test_budget_below_the_largest_node_names_it():
    model = zoo.distilbert("tiny")
    with pytest.raises(crowdgraph.BudgetError) as info:
        crowdgraph.compile(model, "1MB", input_shapes={"input_ids": (1, 16)})
    message = str(info.value)
    assert "(Gather)" in message or "(MatMul)" in message
    assert "1.0 MB" in message and "smallest budget" in message


def test_bad_input_shapes():
    model = zoo.distilbert("tiny")
    with pytest.raises(crowdgraph.InputError, match="does not have"):
        crowdgraph.compile(model, "48MB", input_shapes={"token_ids": (1, 16)})
    with pytest.raises(crowdgraph.InputError, match="rank"):
        crowdgraph.compile(model, "48MB", input_shapes={"input_ids": (1, 16, 3)})
    with pytest.raises(crowdgraph.InputError, match="memory_budget"):
        crowdgraph.compile(model)


def test_inspect_prints_the_table(capsys):
    from crowdgraph.cli import main

    assert main(["inspect", "--size", "tiny", "--partitions", "3"]) == 0
    out = capsys.readouterr().out
    assert "est. resident MB" in out and "p2" in out


def _length_model(range_op: str = "Range", domain: str = "") -> onnx.ModelProto:
    """Positions 0..n-1 of an input of length n pick rows of a table: shape inference cannot
    size a Range over an input's length, so lowering measures it."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, "n"])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4096])
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "one"], ["length"], axis=0),
             helper.make_node(range_op, ["zero", "length", "one"], ["positions"], domain=domain),
             helper.make_node("Gather", ["table", "positions"], ["rows"], axis=0),
             helper.make_node("MatMul", ["rows", "weight"], ["y"])]
    inits = [onnx.numpy_helper.from_array(np.array(0, np.int64), "zero"),
             onnx.numpy_helper.from_array(np.array(1, np.int64), "one"),
             onnx.numpy_helper.from_array(np.ones((64, 8), np.float32), "table"),
             onnx.numpy_helper.from_array(np.ones((8, 4096), np.float32), "weight")]
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=opsets)


@pytest.mark.parametrize("n", [5, 9])
def test_tensors_shape_inference_cannot_size_are_measured_at_the_bound_shapes(n):
    tensors = lower(_length_model(), {"x": (1, n)}).tensors
    assert (tensors["positions"].shape, tensors["rows"].shape, tensors["y"].shape) == ((n,), (n, 8), (n, 4096))


def test_tensors_that_cannot_be_measured_either_name_themselves():
    with pytest.raises(crowdgraph.ModelError, match="could not determine the shapes of .* 'positions'"):
        lower(_length_model("Mystery", "com.example"), {"x": (1, 5)})
