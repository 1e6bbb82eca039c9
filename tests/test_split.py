"""Operator splitting: split nodes equal the original, pieces fit, errors name the true floor."""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import crowdgraph
from crowdgraph import zoo
from crowdgraph.lower import lower
from crowdgraph.partition import RUNTIME_BASE_BYTES, node_estimates
from crowdgraph.split import (
    SplitRecord,
    fitting_microbatch,
    piece_bounds,
    smallest_budget,
    split_node,
    split_oversized,
)
from crowdgraph.tile import tile_nodes
from tests import models, plans
from tests.oracle import assert_matches, oracle, run_partitions
from tests.test_compile import check_plan

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: A DistilBERT whose embedding table (4 MB) and FFN weights outweigh its
#: activations at short sequences, as in the full model, but that builds and
#: runs in milliseconds: budgets of 2-3 MB split it.
SMALL_BERT = zoo.DistilBertSize(vocab_size=8000, dim=128, n_layers=2, n_heads=4, hidden_dim=512,
                                max_position_embeddings=64)


# -- models with one node to split ------------------------------------------------


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "split_case", inputs, outputs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def gather_case(rows: int, width: int, indices: np.ndarray, table_rank: int = 2,
                seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``y = Tanh(Gather(table, idx))``; the table is ``[rows, width]`` (or 1-D / 3-D)."""
    rng = np.random.default_rng(seed)
    shape = {1: (rows,), 2: (rows, width), 3: (rows, 2, width)}[table_rank]
    table = rng.standard_normal(shape).astype(np.float32)
    elem = helper.np_dtype_to_tensor_dtype(indices.dtype)
    nodes = [helper.make_node("Gather", ["table", "idx"], ["g"], name="lookup", axis=0),
             helper.make_node("Tanh", ["g"], ["y"], name="tanh")]
    out_shape = list(indices.shape) + list(shape[1:])
    model = _model(nodes, [helper.make_tensor_value_info("idx", elem, list(indices.shape))],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                   [numpy_helper.from_array(table, "table")])
    return model, {"idx": indices}


def matmul_case(lead: tuple[int, ...], k: int, n: int, seed: int = 0, opset: int = 17):
    """``y = Relu(x @ W)`` with ``x`` of shape ``lead + (k,)`` (batched when ``lead`` has 2 dims)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="product"),
             helper.make_node("Relu", ["mm"], ["y"], name="relu")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(lead) + [k])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(lead) + [n])],
                   [numpy_helper.from_array(w, "w")], opset)
    return model, {"x": rng.standard_normal(lead + (k,)).astype(np.float32)}


BIASES = ["none", "row", "matrix", "column", "scalar", "input"]


def gemm_case(m: int, k: int, n: int, trans_a: bool, trans_b: bool, bias: str, alpha: float = 1.0,
              beta: float = 1.0, seed: int = 0, opset: int = 17):
    """``y = Gemm(a, B, C)`` with a constant ``B`` and a bias ``C`` of the given kind."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [numpy_helper.from_array(b, "B")]
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, [k, m] if trans_a else [m, k])]
    feeds = {"a": rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)}
    names = ["a", "B"]
    shapes = {"row": (n,), "matrix": (m, n), "column": (m, 1), "scalar": ()}
    if bias in shapes:
        inits.append(numpy_helper.from_array(rng.standard_normal(shapes[bias]).astype(np.float32), "C"))
        names.append("C")
    elif bias == "input":
        inputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n]))
        feeds["c"] = rng.standard_normal((m, n)).astype(np.float32)
        names.append("c")
    nodes = [helper.make_node("Gemm", names, ["y"], name="gemm", transA=int(trans_a), transB=int(trans_b),
                              alpha=alpha, beta=beta)]
    model = _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits, opset)
    return model, feeds


def edge_indices(rows: int, pieces: int) -> list[int]:
    """Indices at and next to every shard edge, in positive and negative form."""
    edges = {0, rows - 1}
    for start, stop in piece_bounds(rows, pieces):
        edges |= {start - 1, start, stop - 1, stop}
    edges = {e for e in edges if 0 <= e < rows}
    return sorted(edges | {e - rows for e in edges})


def budget_between(model, feeds, node: str, fraction: float) -> int:
    """A budget below ``node``'s own need and at or above the model's true floor."""
    shapes = {k: v.shape for k, v in feeds.items()}
    og = lower(model, shapes)
    need = next(e.resident_bytes for n, e in zip(og.nodes, node_estimates(og)) if n.name == node)
    floor = smallest_budget(model, shapes)
    assume(floor < need - 1)
    return int(floor + fraction * (need - 1 - floor))


def compile_and_check(model, feeds, budget: int) -> crowdgraph.CompiledModel:
    """Compile at ``budget``; every partition fits, the plan is sound and equals the oracle."""
    compiled = crowdgraph.compile(model, budget, sample=feeds)
    split, records = split_oversized(model, budget, {k: v.shape for k, v in feeds.items()})
    assert records == compiled.splits
    check_plan(compiled, split, budget)
    assert all(p.resident_bytes <= budget for p in compiled.partitions)
    assert_matches(run_partitions(compiled, feeds), oracle(model, feeds))
    return compiled


# -- pure helpers -----------------------------------------------------------------


@given(n=st.integers(1, 500), data=st.data())
def test_piece_bounds_cover_every_unit_once(n, data):
    pieces = data.draw(st.integers(1, n))
    bounds = piece_bounds(n, pieces)
    assert len(bounds) == pieces and bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1 and max(sizes) == -(-n // pieces)


# -- Gather ---------------------------------------------------------------------------


@FAST
@given(rows=st.integers(2, 300), width=st.integers(1, 24), table_rank=st.sampled_from([1, 2, 3]),
       idx_dtype=st.sampled_from([np.int64, np.int32]), idx_rank=st.integers(0, 3), data=st.data())
def test_split_gather_equals_the_original(rows, width, table_rank, idx_dtype, idx_rank, data):
    pieces = data.draw(st.integers(1, min(rows, 12)), label="pieces")
    edges = edge_indices(rows, pieces)
    shape = data.draw(st.lists(st.integers(1, 4), min_size=idx_rank, max_size=idx_rank).map(tuple), label="shape")
    values = data.draw(st.lists(st.one_of(st.sampled_from(edges), st.integers(-rows, rows - 1)),
                                min_size=int(np.prod(shape)), max_size=int(np.prod(shape))), label="indices")
    indices = np.array(values, dtype=idx_dtype).reshape(shape)
    model, feeds = gather_case(rows, width, indices, table_rank)
    split, record = split_node(model, "lookup", "rows", pieces, {"idx": shape})
    assert record == SplitRecord("lookup", "Gather", "rows", pieces, record.new_nodes, "table",
                                 record.piece_weight_bytes)
    assert "table" not in {i.name for i in split.graph.initializer}, "the whole table is gone"
    onnx.checker.check_model(split)
    np.testing.assert_array_equal(oracle(split, feeds)["y"], oracle(model, feeds)["y"])


def test_gather_every_index_of_an_uneven_table():
    rows = 103
    indices = np.arange(-rows, rows, dtype=np.int64).reshape(2, rows)
    model, feeds = gather_case(rows, 8, indices)
    for pieces in (2, 7, 10, 103):
        split, _ = split_node(model, "lookup", "rows", pieces, {"idx": indices.shape})
        np.testing.assert_array_equal(oracle(split, feeds)["y"], oracle(model, feeds)["y"])


@FAST
@given(rows=st.integers(200, 3000), idx_dtype=st.sampled_from([np.int64, np.int32]),
       fraction=st.floats(0.0, 1.0), seed=st.integers(0, 100))
def test_gather_compiled_at_a_budget_below_it(rows, idx_dtype, fraction, seed):
    rng = np.random.default_rng(seed)
    indices = rng.integers(-rows, rows, size=(3, 5)).astype(idx_dtype)
    indices[0, :2] = [rows - 1, -rows]
    model, feeds = gather_case(rows, 32, indices, seed=seed)
    budget = budget_between(model, feeds, "lookup", fraction)
    compiled = compile_and_check(model, feeds, budget)
    (record,) = compiled.splits
    assert record.node == "lookup" and record.how == "rows" and record.pieces >= 2


# -- MatMul and Gemm ----------------------------------------------------------------------


@FAST
@given(lead=st.sampled_from([(1,), (5,), (2, 3), (3, 1, 4)]), k=st.integers(1, 48), n=st.integers(1, 48),
       how=st.sampled_from(["columns", "inner"]), opset=st.sampled_from([9, 13, 17]), data=st.data())
def test_split_matmul_equals_the_original(lead, k, n, how, opset, data):
    units = n if how == "columns" else k
    pieces = data.draw(st.integers(1, min(units, 9)), label="pieces")
    model, feeds = matmul_case(lead, k, n, opset=opset)
    split, record = split_node(model, "product", how, pieces, {"x": lead + (k,)})
    assert (record.how, record.pieces) == (how, pieces)
    assert "w" not in {i.name for i in split.graph.initializer}
    onnx.checker.check_model(split)
    assert_matches(oracle(split, feeds), oracle(model, feeds))


@FAST
@given(m=st.integers(1, 12), k=st.integers(1, 40), n=st.integers(1, 40), trans_a=st.booleans(),
       trans_b=st.booleans(), bias=st.sampled_from(BIASES), how=st.sampled_from(["columns", "inner"]),
       alpha=st.sampled_from([1.0, 0.5]), beta=st.sampled_from([1.0, -2.0]),
       opset=st.sampled_from([9, 11, 13, 17]), data=st.data())
def test_split_gemm_equals_the_original(m, k, n, trans_a, trans_b, bias, how, alpha, beta, opset, data):
    assume(not (opset < 11 and bias == "none"))  # C is a required input before opset 11
    units = n if how == "columns" else k
    pieces = data.draw(st.integers(1, min(units, 9)), label="pieces")
    model, feeds = gemm_case(m, k, n, trans_a, trans_b, bias, alpha, beta, opset=opset)
    split, record = split_node(model, "gemm", how, pieces)
    onnx.checker.check_model(split)
    assert_matches(oracle(split, feeds), oracle(model, feeds))


@FAST
@given(k=st.integers(64, 256), n=st.integers(64, 256), lead=st.sampled_from([(4,), (2, 8)]),
       fraction=st.floats(0.0, 1.0))
def test_matmul_compiled_at_a_budget_below_it(k, n, lead, fraction):
    model, feeds = matmul_case(lead, k, n)
    budget = budget_between(model, feeds, "product", fraction)
    (record,) = compile_and_check(model, feeds, budget).splits
    assert record.how in ("columns", "inner") and record.pieces >= 2


@FAST
@given(trans_a=st.booleans(), trans_b=st.booleans(), bias=st.sampled_from(BIASES), fraction=st.floats(0.0, 1.0))
def test_gemm_compiled_at_a_budget_below_it(trans_a, trans_b, bias, fraction):
    model, feeds = gemm_case(6, 160, 200, trans_a, trans_b, bias, alpha=0.5, beta=2.0)
    budget = budget_between(model, feeds, "gemm", fraction)
    (record,) = compile_and_check(model, feeds, budget).splits
    assert record.pieces >= 2


def test_expanding_layers_split_by_columns_contracting_ones_by_inner():
    wide, feeds_wide = matmul_case((4,), 64, 1024)
    narrow, feeds_narrow = matmul_case((4,), 1024, 64)
    for model, feeds, node_how in ((wide, feeds_wide, "columns"), (narrow, feeds_narrow, "inner")):
        og = lower(model, {"x": feeds["x"].shape})
        need = node_estimates(og)[0].resident_bytes
        (record,) = compile_and_check(model, feeds, need - 100_000).splits
        assert record.how == node_how


def test_shared_table_read_by_two_gathers():
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((2000, 16)).astype(np.float32), "table")
    nodes = [helper.make_node("Gather", ["table", "a"], ["ga"], name="lookup_a", axis=0),
             helper.make_node("Gather", ["table", "b"], ["gb"], name="lookup_b", axis=0),
             helper.make_node("Add", ["ga", "gb"], ["y"], name="add")]
    vi = [helper.make_tensor_value_info(n, TensorProto.INT64, [4]) for n in ("a", "b")]
    model = _model(nodes, vi, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], [table])
    feeds = {"a": np.array([0, 1999, -1, 700]), "b": np.array([5, -2000, 1000, 999])}
    budget = RUNTIME_BASE_BYTES + 80_000
    compiled = compile_and_check(model, feeds, budget)
    assert sorted(r.node for r in compiled.splits) == ["lookup_a", "lookup_b"]


# -- DistilBERT ------------------------------------------------------------------------------


def test_models_that_fit_are_untouched():
    model = zoo.distilbert("tiny")
    before = model.SerializeToString()
    same, records = split_oversized(model, crowdgraph.parse_bytes("48MB"), {"input_ids": (1, 16)})
    assert same is model and records == []
    assert model.SerializeToString() == before
    assert crowdgraph.compile(model, "48MB", input_shapes={"input_ids": (1, 16)}).splits == []


def test_splitting_leaves_the_given_model_alone():
    model = zoo.distilbert("tiny")
    before = model.SerializeToString()
    split, records = split_oversized(model, RUNTIME_BASE_BYTES + 200_000, {"input_ids": (1, 16)})
    assert records and split is not model
    assert model.SerializeToString() == before


@pytest.mark.parametrize("shape", [(1, 16), (2, 16)])
def test_tiny_distilbert_just_above_its_floor(shape):
    model = zoo.distilbert("tiny")
    feeds = zoo.sample_inputs(model, batch=shape[0], sequence=shape[1])
    budget = smallest_budget(model, {"input_ids": shape}) + 4096
    compiled = compile_and_check(model, feeds, budget)
    ops = {r.op_type for r in compiled.splits}
    assert "Gather" in ops and (shape[0] > 1 or "MatMul" in ops)
    with crowdgraph.ThreadExecutor(workers=2) as executor:
        assert_matches(compiled.run(feeds, executor=executor), oracle(model, feeds))


@pytest.mark.parametrize("budget,shape", [("2MB", (1, 16)), ("2.5MB", (2, 16)), ("3MB", (2, 32))])
def test_small_distilbert_at_2_to_3_mb(budget, shape):
    model = zoo.distilbert(SMALL_BERT)
    feeds = zoo.sample_inputs(model, batch=shape[0], sequence=shape[1])
    compiled = compile_and_check(model, feeds, crowdgraph.parse_bytes(budget))
    gather = [r for r in compiled.splits if r.node == "embeddings.word_embeddings.Gather"]
    assert gather and gather[0].pieces >= 2
    assert max(p.weight_bytes for p in compiled.partitions) < 4_096_000, "the 4 MB table is in pieces"
    with crowdgraph.ThreadExecutor(workers=2) as executor:
        assert_matches(compiled.run(feeds, executor=executor), oracle(model, feeds))


def test_replanned_micro_batches_are_split_again():
    model = zoo.distilbert(SMALL_BERT)
    feeds = zoo.sample_inputs(model, batch=4, sequence=32)
    compiled = crowdgraph.compile(model, "3MB", sample={k: v[:1] for k, v in feeds.items()})
    outputs = compiled.run(feeds, executor=crowdgraph.ThreadExecutor(workers=2), microbatch=2)
    assert_matches(outputs, oracle(model, feeds))
    (replan,) = compiled._replans.values()
    assert replan.splits and all(p.resident_bytes <= compiled.memory_budget for p in replan.partitions)


def _full_distilbert_at(model, feeds, budget: str, ops: set[str]) -> None:
    limit = crowdgraph.parse_bytes(budget)
    compiled = crowdgraph.compile(model, budget, sample=feeds)
    assert {r.op_type for r in compiled.splits} == ops
    assert all(p.resident_bytes <= limit for p in compiled.partitions)
    assert max(p.weight_bytes for p in compiled.partitions) < limit
    want = plans.expected(model, feeds)
    assert_matches(run_partitions(compiled, feeds), want)
    with crowdgraph.ThreadExecutor(workers=2) as executor:
        assert_matches(compiled.run(feeds, executor=executor), want)


@pytest.fixture(scope="module")
def full_distilbert():
    model = zoo.distilbert("full")
    return model, zoo.sample_inputs(model, batch=1, sequence=128)


# Full size at three budgets, each compile about 10 s: the embedded model at 16 MB is
# test_split_small_budget_example's, and test_small_distilbert_at_2_to_3_mb splits the same nodes fast.
@pytest.mark.slow
def test_embedded_distilbert_full_at_24mb(full_distilbert):
    _full_distilbert_at(*full_distilbert, "24MB", {"Gather"})


@pytest.mark.slow
@pytest.mark.parametrize("budget,ops", [("48MB", {"Gather"}), ("16MB", {"Gather", "MatMul"})])
def test_exported_distilbert_full(budget, ops):
    path = models.exported_distilbert("full")
    feeds = models.exported_distilbert_inputs(1, 128, size="full")
    _full_distilbert_at(str(path), feeds, budget, ops)


# -- the floor, micro-batches and errors --------------------------------------------------------


def test_error_only_below_the_true_floor():
    model = zoo.distilbert("tiny")
    shapes = {"input_ids": (1, 16)}
    floor = smallest_budget(model, shapes)
    assert floor < node_estimates(lower(model, shapes))[0].resident_bytes, "splitting lowers the floor"
    crowdgraph.compile(model, floor, input_shapes=shapes)
    below = floor - 20_000  # sequence chunks set it here: found by bisection to 10 kB
    with pytest.raises(crowdgraph.BudgetError) as info:
        crowdgraph.compile(model, below, input_shapes=shapes)
    message = str(info.value)
    assert "splitting included" in message and crowdgraph.format_bytes(floor) in message
    assert crowdgraph.format_bytes(below) in message


def test_a_table_that_cannot_be_split_small_enough_names_one_row():
    indices = np.zeros((64, 1024), np.int64)  # big activations: even a one-row shard is too big
    model, feeds = gather_case(5000, 64, indices)
    budget = RUNTIME_BASE_BYTES + 2_000_000
    with pytest.raises(crowdgraph.BudgetError) as info:
        crowdgraph.compile(model, budget, sample=feeds)
    message = str(info.value)
    assert "'lookup' (Gather) cannot be split below one row per piece" in message
    assert "256 B of weights" in message and crowdgraph.format_bytes(budget) in message


def test_activation_bound_error_names_the_micro_batch_that_fits():
    model = zoo.distilbert("tiny")
    shapes = {"input_ids": (16, 64), "attention_mask": (16, 64)}
    budget = smallest_budget(model, {"input_ids": (5, 64)})
    rows = fitting_microbatch(model, budget, shapes)
    assert rows is not None and 1 <= rows < 16
    with pytest.raises(crowdgraph.BudgetError) as info:
        crowdgraph.compile(model, budget, input_shapes=shapes)
    assert f"a micro-batch of {rows} rows fits: run(..., microbatch={rows})" in str(info.value)
    crowdgraph.compile(model, budget, input_shapes={"input_ids": (rows, 64)})
    with pytest.raises(crowdgraph.BudgetError):
        crowdgraph.compile(model, budget, input_shapes={"input_ids": (rows + 1, 64)})


def test_fitting_microbatch_bounds():
    model = zoo.distilbert("tiny")
    shapes = {"input_ids": (8, 32)}
    assert fitting_microbatch(model, crowdgraph.parse_bytes("1GB"), shapes) == 8
    assert fitting_microbatch(model, RUNTIME_BASE_BYTES, shapes) is None
    answers = [fitting_microbatch(model, smallest_budget(model, {"input_ids": (r, 32)}), shapes) for r in (1, 3, 6)]
    assert answers == [1, 3, 6]


def test_nodes_that_cannot_split_say_why():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((512, 512)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["w", "x"], ["y"], name="weight_first")]  # W @ x
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [512, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [512, 4])], [w])
    with pytest.raises(crowdgraph.BudgetError) as info:
        crowdgraph.compile(model, RUNTIME_BASE_BYTES + 200_000)
    assert "'weight_first' (MatMul)" in str(info.value) and "cannot be split" in str(info.value)
    assert "raise the budget" in str(info.value)


def test_a_batch_too_big_for_one_pass_runs_in_automatic_micro_batches():
    model = zoo.distilbert("tiny")
    feeds = zoo.sample_inputs(model, batch=12, sequence=32)
    budget = smallest_budget(model, {"input_ids": (4, 32)})
    compiled = crowdgraph.compile(model, budget, input_shapes={"input_ids": (4, 32)})
    outputs = compiled.run(feeds, executor=crowdgraph.ThreadExecutor(workers=2))  # microbatch="auto"
    assert_matches(outputs, oracle(model, feeds))
    assert compiled.last_report.microbatches == 3, "three micro-batches of 4 rows"
    crowd = [crowdgraph.WorkerInfo(f"w{n}", memory=budget) for n in range(2)]
    assert crowdgraph.simulate(compiled, crowd, (12, 32)).microbatches == 3
    small = {k: v[:3] for k, v in feeds.items()}
    compiled.run(small, executor=crowdgraph.ThreadExecutor(workers=2))
    assert compiled.last_report.microbatches == 1, "a batch the plan was cut for runs whole"
    with pytest.raises(crowdgraph.BudgetError, match=r"a micro-batch of 4 rows fits: run\(\.\.\., microbatch=4\)"):
        compiled.run(feeds, executor=crowdgraph.ThreadExecutor(workers=2), microbatch=6)
    with pytest.raises(crowdgraph.BudgetError, match="not even a micro-batch of one row"):
        short = {"input_ids": (1, 8)}  # compiled at its own floor, below what a row of 128 needs
        tight = crowdgraph.compile(model, smallest_budget(model, short), input_shapes=short)
        tight.run(zoo.sample_inputs(model, batch=2, sequence=128))


def test_command_line_runs_a_batch_too_big_for_one_pass(tmp_path):
    from crowdgraph.cli import main

    budget = str(smallest_budget(zoo.distilbert("tiny"), {"input_ids": (4, 32)}))
    code = main(["run", "--size", "tiny", "--budget", budget, "--shape", "input_ids=4x32",
                 "--batch-shape", "input_ids=12x32", "--batch-shape", "attention_mask=12x32",
                 "--workers", "2", "--json", str(tmp_path / "r.json")])
    assert code == 0
    assert json.loads((tmp_path / "r.json").read_text())["microbatches"] == 3


# -- plans, table, example ----------------------------------------------------------------------


def test_table_lists_the_split_nodes_and_plans_keep_them(tmp_path):
    from crowdgraph.cli import cmd_inspect

    model = zoo.distilbert(SMALL_BERT)
    feeds = zoo.sample_inputs(model, batch=1, sequence=16)
    compiled = crowdgraph.compile(model, "2MB", sample=feeds)
    table = compiled.table()
    assert "nodes split to fit the budget" in table
    for record in compiled.splits:
        assert record.node in table and f"{record.pieces:>3} pieces by {record.how}" in table
    loaded = crowdgraph.load(compiled.save(tmp_path / "plan"))
    assert loaded.splits == compiled.splits and loaded.table() == table
    assert_matches(run_partitions(loaded, feeds), oracle(model, feeds))
    args = argparse.Namespace(model=None, size="tiny", shape=["input_ids=1x16"], partitions=None,
                              budget=str(smallest_budget(zoo.distilbert("tiny"), {"input_ids": (1, 16)})))
    assert cmd_inspect(args) == 0


@pytest.mark.slow  # compiles and runs full DistilBERT in a subprocess; test_small_distilbert_at_2_to_3_mb is the fast check
def test_split_small_budget_example(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "split_small_budget.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "embeddings.word_embeddings.Gather" in done.stdout and "pieces by rows" in done.stdout
    assert float(done.stdout.split("max abs difference to the whole model: ")[1].split()[0]) <= 1e-4


# -- spatial tiles -------------------------------------------------------------------------------


def _window_attributes(draw, op: str) -> dict:
    """Kernel, strides, pads (and a Conv's dilations) of a window op, drawn."""
    kernel = [draw(st.integers(1, 4)) for _ in range(2)]
    attrs = {"kernel_shape": kernel, "strides": [draw(st.integers(1, 3)) for _ in range(2)]}
    if op == "Conv":
        attrs["dilations"] = [draw(st.integers(1, 2)) for _ in range(2)]
    # Pads below the kernel, as models have them: every output row reads at least one input row.
    attrs["pads"] = [draw(st.integers(0, k - 1)) for k in kernel + kernel]
    return attrs


@st.composite
def conv_chains(draw):
    """A random chain of image ops (with a residual Add and a channel Concat now and then) and its input."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    channels, height, width = draw(st.integers(1, 3)), draw(st.integers(4, 20)), draw(st.integers(4, 20))
    start = (1, channels, height, width)
    nodes, inits, x = [], [], "x"

    def init(values: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(values.astype(np.float32), f"w{len(inits)}"))
        return inits[-1].name

    def add(op: str, inputs: list[str], **attrs) -> str:
        out = f"t{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [out], name=f"{op}{len(nodes)}", **attrs))
        return out

    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["Conv", "MaxPool", "AveragePool", "BatchNormalization", "Relu",
                                   "ConvTranspose", "Residual", "Concat"]))
        if op in ("Conv", "MaxPool", "AveragePool"):
            attrs = _window_attributes(draw, op)
            sizes = []
            for a, n in enumerate((height, width)):
                reach = (attrs["kernel_shape"][a] - 1) * attrs.get("dilations", [1, 1])[a] + 1
                sizes.append((n + attrs["pads"][a] + attrs["pads"][a + 2] - reach) // attrs["strides"][a] + 1)
            assume(min(sizes) >= 1)
            if op == "Conv":
                out_ch = draw(st.integers(1, 4))
                weight = init(rng.standard_normal((out_ch, channels, *attrs["kernel_shape"])))
                x, channels = add("Conv", [x, weight, init(rng.standard_normal(out_ch))], **attrs), out_ch
            else:
                x = add(op, [x], **attrs)
            height, width = sizes
        elif op == "ConvTranspose":
            stride = draw(st.integers(2, 3))
            x = add(op, [x, init(rng.standard_normal((channels, 2, stride, stride)))],
                    kernel_shape=[stride, stride], strides=[stride, stride])
            channels, height, width = 2, height * stride, width * stride
        elif op == "BatchNormalization":
            stats = [init(rng.uniform(0.5, 1.5, channels)) for _ in range(4)]
            x = add(op, [x, *stats])
        elif op == "Relu":
            x = add(op, [x])
        elif op == "Residual":  # Relu(x) + Conv3x3(x), both from x
            branch = add("Conv", [x, init(rng.standard_normal((channels, channels, 3, 3)))],
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1])
            x = add("Add", [add("Relu", [x]), branch])
        else:
            x = add("Concat", [x, add("Sigmoid", [x])], axis=1)
            channels *= 2
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(start))],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, height, width])], inits)
    feeds = {"x": rng.standard_normal(start).astype(np.float32)}
    return model, feeds, [n.name for n in nodes[:-1]], (height, width)


@FAST
@given(case=conv_chains(), axis=st.sampled_from([2, 3]), data=st.data())
def test_tiled_image_chain_equals_the_original(case, axis, data):
    model, feeds, names, out_shape = case
    extent = out_shape[axis - 2]
    assume(extent >= 2)
    tiles = data.draw(st.integers(2, min(extent, 6)), label="tiles")
    tiled, record = tile_nodes(model, names, axis, tiles)
    onnx.checker.check_model(tiled)
    assert (record.op_type, record.how, record.pieces, record.region) == (
        "region", {2: "rows", 3: "columns"}[axis], tiles, tuple(names))
    assert not set(names) & {n.name for n in tiled.graph.node}, "the region's nodes are replaced"
    want, got = oracle(model, feeds)["y"], oracle(tiled, feeds)["y"]
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 1e-5 * max(1.0, float(np.max(np.abs(want))))


def test_interior_tiles_pad_zero_and_border_tiles_keep_the_pads():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 2, 1, 2])]
    w = numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 9, 5])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 9, 7])], [w])
    tiled, _ = tile_nodes(model, ["conv"], 2, 3)
    pads = [list(helper.get_attribute_value(a)) for n in tiled.graph.node if n.op_type == "Conv"
            for a in n.attribute if a.name == "pads"]
    assert pads == [[1, 2, 0, 2], [0, 2, 0, 2], [0, 2, 1, 2]]  # columns keep theirs
    feeds = {"x": np.arange(45, dtype=np.float32).reshape(1, 1, 9, 5)}
    assert_matches(oracle(tiled, feeds), oracle(model, feeds))


def test_what_does_not_tile_says_why():
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 256, 256])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 256, 256])], [])
    with pytest.raises(crowdgraph.BudgetError) as info:  # a model output must fit whole
        crowdgraph.compile(model, "4MB")
    assert "'relu' (Relu)" in str(info.value) and "running it in tiles" in str(info.value)
    assert "the model output 'y'" in str(info.value)
    with pytest.raises(crowdgraph.ModelError, match="concatenates along the tiled axis"):
        concat = _model([helper.make_node("Concat", ["x", "x"], ["y"], name="join", axis=2)],
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 4])], [])
        tile_nodes(concat, ["join"], 2, 2)


LIGHT_AT_16MB = [pytest.param("inception_v1"), pytest.param("resnet50", marks=pytest.mark.slow),
                 pytest.param("densenet121", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def light_at_16mb(request):
    """name -> (model, feeds, plan at 16 MB), compiled once per module."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            model, feeds = models.light_cnn(name)
            cache[name] = model, feeds, crowdgraph.compile(model, "16MB", sample=feeds)
        return cache[name]

    return get


@pytest.mark.parametrize("name", LIGHT_AT_16MB)
def test_light_cnn_at_16mb_is_tiled_and_equals_the_oracle(light_at_16mb, name):
    model, feeds, compiled = light_at_16mb(name)
    assert all(p.resident_bytes <= 16_000_000 for p in compiled.partitions)
    regions = [r for r in compiled.splits if r.region]
    assert regions and all(r.how == "rows" and r.pieces >= 2 for r in regions)
    assert f"{len(regions)} regions tiled to fit the budget" in compiled.table()
    want = oracle(model, feeds)
    assert_matches(run_partitions(compiled, feeds), want)
    with crowdgraph.ThreadExecutor(workers=2) as executor:
        assert_matches(compiled.run(feeds, executor=executor), want)


def test_tiles_only_where_a_node_does_not_fit(light_at_16mb):
    model, feeds, at_16mb = light_at_16mb("inception_v1")
    (region,) = at_16mb.splits
    assert region.region == ("n1", "n2"), "the stem's Relu on 1x64x112x112, and the MaxPool after it"
    assert crowdgraph.compile(model, "20MB", sample=feeds).splits == []


@pytest.fixture(scope="module")
def unet_at_32mb():
    model, feeds = zoo.unet(), zoo.image_inputs(1, 512, 512)
    return model, feeds, crowdgraph.compile(model, "32MB", sample=feeds)


def test_unet_at_512x512_compiles_at_32mb_and_equals_the_oracle(unet_at_32mb, tmp_path):
    model, feeds, compiled = unet_at_32mb
    untiled = max(e.resident_bytes for e in node_estimates(lower(model, {"image": (1, 3, 512, 512)})))
    assert untiled > 2 * 32_000_000, "whole, its largest node needs 77 MB"
    assert all(p.resident_bytes <= 32_000_000 for p in compiled.partitions)
    assert {r.op_type for r in compiled.splits} == {"region"}
    want = oracle(model, feeds)
    loaded = crowdgraph.load(compiled.save(tmp_path / "plan"))
    assert loaded.splits == compiled.splits and loaded.table() == compiled.table()
    with crowdgraph.ThreadExecutor(workers=2) as executor:
        assert_matches(loaded.run(feeds, executor=executor), want)


def test_the_floor_counts_tiles():
    model, shapes = zoo.unet(), {"image": (1, 3, 128, 128)}
    floor = smallest_budget(model, shapes)
    untiled = max(e.resident_bytes for e in node_estimates(lower(model, shapes)))
    assert floor < untiled / 2
    assert any(r.region for r in crowdgraph.compile(model, floor, input_shapes=shapes).splits)
    with pytest.raises(crowdgraph.BudgetError) as info:
        crowdgraph.compile(model, floor - 20_000, input_shapes=shapes)
    assert crowdgraph.format_bytes(floor) in str(info.value)


def test_inspect_shows_the_tiled_regions(tmp_path, capsys):
    from crowdgraph.cli import main

    onnx.save_model(zoo.unet(), str(tmp_path / "unet.onnx"))
    assert main(["inspect", str(tmp_path / "unet.onnx"), "--budget", "3MB", "--shape", "image=1x3x128x128"]) == 0
    out = capsys.readouterr().out
    assert "regions tiled to fit the budget:" in out
    assert "  up2.Concat " in out and "2 nodes (up2.Concat .. up2.conv0.Conv) in 2 tiles by rows" in out


@pytest.mark.parametrize("height,width,how", [(512, 64, "rows"), (64, 512, "columns")])
def test_tiles_run_across_the_long_side_where_halos_cost_least(height, width, how):
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((1, 8, 3, 3)).astype(np.float32), "w2")
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", **conv),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="conv2", **conv)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, height, width])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, height, width])], [w1, w2])
    compiled = crowdgraph.compile(model, "4MB")
    (record,) = compiled.splits
    assert record.region == ("conv1", "relu", "conv2") and record.how == how
    feeds = {"x": rng.standard_normal((1, 1, height, width)).astype(np.float32)}
    assert_matches(run_partitions(compiled, feeds), oracle(model, feeds))


# -- sequence chunks -----------------------------------------------------------------------------


@st.composite
def position_wise_chains(draw):
    """A random chain of transformer ops that treat each position on its own, its feeds and its nodes.

    The tensors are ``(1, sequence, features)``; every op makes each row
    (position) from the same row of its input: elementwise ops and a gate
    that branches, LayerNormalization and Softmax over the features, a
    linear layer (MatMul by a constant weight, Add of a bias), a MatMul by
    a variable matrix every chunk reads whole (as attention reads its
    keys), the Add of a mask that broadcasts along the sequence, and a
    ``Where(IsNaN(x), 0, x)`` guard.
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    sequence, features = draw(st.integers(2, 12)), draw(st.integers(1, 6))
    start = (1, sequence, features)
    nodes, inits = [], []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(start))]
    feeds = {"x": rng.standard_normal(start).astype(np.float32)}
    x = "x"

    def init(values: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(values, np.float32), f"w{len(inits)}"))
        return inits[-1].name

    def variable(shape: tuple[int, ...]) -> str:
        name = f"v{len(inputs)}"
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        feeds[name] = rng.standard_normal(shape).astype(np.float32)
        return name

    def add(op: str, ins: list[str], **attrs) -> str:
        out = f"t{len(nodes)}"
        nodes.append(helper.make_node(op, ins, [out], name=f"{op}{len(nodes)}", **attrs))
        return out

    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["Erf", "Gate", "LayerNorm", "Softmax", "Linear", "Attend", "Mask", "NaNGuard"]))
        if op == "Erf":
            x = add("Erf", [add("Div", [x, init(np.array(1.4142135))])])
        elif op == "NaNGuard":  # as exported attention guards its Softmax
            x = add("Where", [add("IsNaN", [x]), init(np.zeros(1)), x])
        elif op == "Gate":  # x * sigmoid(x), from two branches of x
            x = add("Mul", [x, add("Sigmoid", [x])])
        elif op == "LayerNorm":
            scale, bias = init(rng.uniform(0.5, 1.5, features)), init(rng.standard_normal(features))
            x = add("LayerNormalization", [x, scale, bias], axis=-1)
        elif op == "Softmax":
            x = add("Softmax", [x], axis=-1)
        elif op == "Linear":
            width = draw(st.integers(1, 6))
            x = add("Add", [add("MatMul", [x, init(rng.standard_normal((features, width)))]),
                            init(rng.standard_normal(width))])
            features = width
        elif op == "Attend":  # a variable matrix, read whole by every chunk, as attention reads its keys
            width = draw(st.integers(1, 6))
            x, features = add("MatMul", [x, variable((1, features, width))]), width
        else:  # a mask that broadcasts along the sequence
            x = add("Add", [x, variable((1, 1, features))])
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    model = _model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, sequence, features])],
                   inits)
    return model, feeds, [n.name for n in nodes[:-1]], sequence


@FAST
@given(case=position_wise_chains(), data=st.data())
def test_chunked_position_wise_chain_equals_the_original(case, data):
    model, feeds, names, sequence = case
    chunks = data.draw(st.integers(2, min(sequence, 5)), label="chunks")
    chunked, record = tile_nodes(model, names, -2, chunks)
    onnx.checker.check_model(chunked)
    assert (record.op_type, record.how, record.pieces, record.region) == ("region", "sequence", chunks, tuple(names))
    assert not set(names) & {n.name for n in chunked.graph.node}, "the region's nodes are replaced"
    want, got = oracle(model, feeds)["y"], oracle(chunked, feeds)["y"]
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 1e-5 * max(1.0, float(np.max(np.abs(want))))


def test_what_does_not_chunk_along_the_sequence_says_why():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3])
    over_sequence = _model([helper.make_node("Softmax", ["x"], ["y"], name="softmax", axis=1)], [x], [y], [])
    with pytest.raises(crowdgraph.ModelError, match="runs over the tiled axis"):
        tile_nodes(over_sequence, ["softmax"], -2, 2)
    w = numpy_helper.from_array(np.ones((3, 3), np.float32), "w")
    with pytest.raises(crowdgraph.ModelError, match="chunks of its first input's rows"):
        tile_nodes(_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [x], [y], [w]), ["mm"], -1, 2)


@pytest.fixture(scope="module")
def tiny_distilbert_4x128():
    model = zoo.distilbert("tiny")
    feeds = zoo.sample_inputs(model, batch=4, sequence=128)
    return model, feeds, {name: value.shape for name, value in feeds.items()}


def test_transformer_chunks_along_the_sequence_below_its_old_floor(tiny_distilbert_4x128, tmp_path, capsys):
    from crowdgraph.cli import main

    model, feeds, shapes = tiny_distilbert_4x128
    unchunked = max(e.resident_bytes for e in node_estimates(lower(model, shapes)))
    assert unchunked > 6_000_000, "unchunked, its attention Softmax alone needs 6.3 MB"
    floor = smallest_budget(model, shapes)
    assert floor < unchunked / 2
    compiled = crowdgraph.compile(model, floor, sample=feeds)
    assert all(p.resident_bytes <= floor for p in compiled.partitions)
    regions = [r for r in compiled.splits if r.region]
    assert regions and all(r.how == "sequence" and r.pieces >= 2 for r in regions)
    shorter = zoo.sample_inputs(model, batch=4, sequence=40)  # the last chunk runs to the end, whatever it is
    with crowdgraph.ThreadExecutor(workers=2) as executor:
        assert_matches(compiled.run(feeds, executor=executor), oracle(model, feeds))
        assert_matches(compiled.run(shorter, executor=executor), oracle(model, shorter))
    with pytest.raises(crowdgraph.BudgetError) as info:
        crowdgraph.compile(model, floor - 20_000, sample=feeds)
    assert crowdgraph.format_bytes(floor) in str(info.value)
    onnx.save_model(model, str(tmp_path / "tiny.onnx"))
    assert main(["inspect", str(tmp_path / "tiny.onnx"), "--budget", "3MB",
                 "--shape", "input_ids=4x128", "--shape", "attention_mask=4x128"]) == 0
    out = capsys.readouterr().out
    assert "regions tiled to fit the budget:" in out and "chunks by sequence" in out


def test_an_exported_distilbert_runs_its_attention_in_chunks_below_its_unchunked_floor():
    """The exported attention's mask, NaN guard (``Where(IsNaN(x), 0, x)``) and Softmax chunk too."""
    model = str(models.exported_distilbert("reduced"))
    feeds = models.exported_distilbert_inputs(1, 128, size="reduced")
    og = lower(model, {name: value.shape for name, value in feeds.items()})
    assert max(e.resident_bytes for e in node_estimates(og)) > 2_800_000, "unchunked, attention needs 2.9 MB"
    compiled = crowdgraph.compile(model, "2.2MB", sample=feeds)
    chunked = {name for r in compiled.splits if r.how == "sequence" for name in r.region}
    assert {"Softmax", "Where", "IsNaN"} <= {n.op_type for n in og.nodes if n.name in chunked}
    assert_matches(run_partitions(compiled, feeds), plans.expected(model, feeds))
