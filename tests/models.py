"""Models the tests partition, with seeded random weights (test helpers only).

Every builder returns ``(model, feeds)``: an :class:`onnx.ModelProto` that
passes ``onnx.checker`` and runs in onnxruntime, and a dict of inputs for
it.  All of them are deterministic for a seed.  Import them as
``from tests.models import chain`` (``tests`` is a package).

Small graphs (:data:`SMALL_MODELS`) cover the shapes a partitioner must
get right: chains, diamonds, skips, several inputs and outputs, tied
weights, control flow with outer-scope names, and constant folding
material.  :func:`light_cnn` gives real CNN topologies from the onnx
package's test data, :func:`random_dag` random graphs for hypothesis, and
:func:`exported_distilbert` a DistilBERT exported by torch from
transformers (cached under ``<repo>/.cache/models/``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from crowdgraph import zoo

REPO = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO / ".cache" / "models"
OPSET = 17
IR_VERSION = 8

Case = tuple[onnx.ModelProto, dict[str, np.ndarray]]
FLOAT = TensorProto.FLOAT


# ----------------------------------------------------------------- helpers


def _model(nodes, name, inputs, outputs, initializers, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests.models"
    )
    model.ir_version = IR_VERSION
    return model


def _vi(name: str, shape, dtype=FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _weight(rng: np.random.Generator, name: str, shape, std: float | None = None) -> onnx.TensorProto:
    """Normal weights; ``std`` defaults to He scaling over the first dim."""
    if std is None:
        std = math.sqrt(2.0 / shape[0])
    return numpy_helper.from_array((rng.standard_normal(shape) * std).astype(np.float32), name)


def _feed(rng: np.random.Generator, *shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _dense(nodes, inits, rng, prefix: str, x: str, n_in: int, n_out: int, act: str | None = "Relu") -> str:
    """``act(x @ W + b)`` with weights named ``{prefix}.weight`` / ``.bias``."""
    inits.append(_weight(rng, f"{prefix}.weight", (n_in, n_out)))
    inits.append(_weight(rng, f"{prefix}.bias", (n_out,), std=0.1))
    nodes.append(helper.make_node("MatMul", [x, f"{prefix}.weight"], [f"{prefix}.mm"], name=f"{prefix}.MatMul"))
    out = f"{prefix}.add"
    nodes.append(helper.make_node("Add", [f"{prefix}.mm", f"{prefix}.bias"], [out], name=f"{prefix}.Add"))
    if act is not None:
        nodes.append(helper.make_node(act, [out], [f"{prefix}.{act.lower()}"], name=f"{prefix}.{act}"))
        out = f"{prefix}.{act.lower()}"
    return out


# ------------------------------------------------------------ small graphs


def chain(n_layers: int = 4, width: int = 256, batch: int = 4, *, seed: int = 0) -> Case:
    """``x -> (MatMul, Add, Relu) * n_layers -> y``; 256 KiB per weight at width 256."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i in range(n_layers):
        last = i == n_layers - 1
        x = _dense(nodes, inits, rng, f"layer{i}", x, width, width, act=None if last else "Relu")
    nodes.append(helper.make_node("Identity", [x], ["y"], name="output.Identity"))
    model = _model(nodes, "chain", [_vi("x", ["batch", width])], [_vi("y", ["batch", width])], inits)
    return model, {"x": _feed(rng, batch, width)}


def relu_chain(n_nodes: int = 1, width: int = 16) -> Case:
    """``n_nodes`` Relu nodes in a row on a ``[1, width]`` tensor: a session with next to no data.

    What it costs above the floor is onnxruntime's own cost of a session.
    """
    names = ["x"] + [f"t{k}" for k in range(n_nodes)]
    nodes = [helper.make_node("Relu", [a], [b], name=f"relu{k}") for k, (a, b) in enumerate(zip(names, names[1:]))]
    model = _model(nodes, "relu_chain", [_vi("x", [1, width])], [_vi(names[-1], [1, width])], [])
    return model, {"x": np.ones((1, width), np.float32)}


def diamond(width: int = 64, batch: int = 4, *, seed: int = 0) -> Case:
    """One input, two branches (Relu and Tanh), joined by Add, then a MatMul."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    left = _dense(nodes, inits, rng, "left", "x", width, width, act="Relu")
    right = _dense(nodes, inits, rng, "right", "x", width, width, act="Tanh")
    nodes.append(helper.make_node("Add", [left, right], ["join"], name="join.Add"))
    out = _dense(nodes, inits, rng, "out", "join", width, width, act=None)
    nodes.append(helper.make_node("Identity", [out], ["y"], name="output.Identity"))
    model = _model(nodes, "diamond", [_vi("x", ["batch", width])], [_vi("y", ["batch", width])], inits)
    return model, {"x": _feed(rng, batch, width)}


def skip(n_blocks: int = 4, width: int = 128, batch: int = 4, *, seed: int = 0) -> Case:
    """Residual blocks ``h = Relu(h + W2 Relu(W1 h))`` plus a long skip from the stem to the end."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    stem = _dense(nodes, inits, rng, "stem", "x", width, width, act="Relu")
    h = stem
    for i in range(n_blocks):
        t = _dense(nodes, inits, rng, f"block{i}.a", h, width, width, act="Relu")
        inits.append(_weight(rng, f"block{i}.b.weight", (width, width), std=0.5 / math.sqrt(width)))
        nodes.append(helper.make_node("MatMul", [t, f"block{i}.b.weight"], [f"block{i}.b.mm"], name=f"block{i}.b.MatMul"))
        nodes.append(helper.make_node("Add", [h, f"block{i}.b.mm"], [f"block{i}.sum"], name=f"block{i}.Residual"))
        nodes.append(helper.make_node("Relu", [f"block{i}.sum"], [f"block{i}.out"], name=f"block{i}.Relu"))
        h = f"block{i}.out"
    nodes.append(helper.make_node("Add", [h, stem], ["long_skip"], name="long_skip.Add"))
    out = _dense(nodes, inits, rng, "head", "long_skip", width, width, act=None)
    nodes.append(helper.make_node("Identity", [out], ["y"], name="output.Identity"))
    model = _model(nodes, "skip", [_vi("x", ["batch", width])], [_vi("y", ["batch", width])], inits)
    return model, {"x": _feed(rng, batch, width)}


def multi_io(width: int = 64, batch: int = 4, *, seed: int = 0) -> Case:
    """Inputs ``a``, ``b``, ``c``; outputs ``late``, ``early``, ``mid`` (in that order).

    ``early`` comes straight from ``a`` and is also used further on; ``c``
    is only needed by the last layer, so it is consumed late.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    e = _dense(nodes, inits, rng, "early", "a", width, width, act="Relu")
    nodes.append(helper.make_node("Identity", [e], ["early"], name="early.Identity"))
    bb = _dense(nodes, inits, rng, "b_proj", "b", width, width, act=None)
    nodes.append(helper.make_node("Add", ["early", bb], ["mix"], name="mix.Add"))
    m = _dense(nodes, inits, rng, "mid", "mix", width, width, act="Tanh")
    nodes.append(helper.make_node("Identity", [m], ["mid"], name="mid.Identity"))
    h = "mid"
    for i in range(3):
        h = _dense(nodes, inits, rng, f"deep{i}", h, width, width, act="Relu")
    nodes.append(helper.make_node("Mul", [h, "c"], ["gated"], name="gate.Mul"))
    out = _dense(nodes, inits, rng, "late", "gated", width, width // 2, act=None)
    nodes.append(helper.make_node("Identity", [out], ["late"], name="late.Identity"))
    inputs = [_vi(n, ["batch", width]) for n in ("a", "b", "c")]
    outputs = [_vi("late", ["batch", width // 2]), _vi("early", ["batch", width]), _vi("mid", ["batch", width])]
    model = _model(nodes, "multi_io", inputs, outputs, inits)
    return model, {n: _feed(rng, batch, width) for n in ("a", "b", "c")}


def shared_initializer(n_layers: int = 5, width: int = 128, batch: int = 4, *, seed: int = 0) -> Case:
    """A chain whose first and last MatMul use the same initializer ``tied.weight``."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], [_weight(rng, "tied.weight", (width, width))]
    h = "x"
    for i in range(n_layers):
        if i in (0, n_layers - 1):
            nodes.append(helper.make_node("MatMul", [h, "tied.weight"], [f"layer{i}.mm"], name=f"layer{i}.tied.MatMul"))
            nodes.append(helper.make_node("Tanh", [f"layer{i}.mm"], [f"layer{i}.tanh"], name=f"layer{i}.Tanh"))
            h = f"layer{i}.tanh"
        else:
            h = _dense(nodes, inits, rng, f"layer{i}", h, width, width, act="Relu")
    nodes.append(helper.make_node("Identity", [h], ["y"], name="output.Identity"))
    model = _model(nodes, "shared_initializer", [_vi("x", ["batch", width])], [_vi("y", ["batch", width])], inits)
    return model, {"x": _feed(rng, batch, width)}


def if_model(take_then: bool = True, width: int = 32, batch: int = 4, *, seed: int = 0) -> Case:
    """An If whose branches read ``h`` (computed in the main graph) and main-graph initializers.

    The condition is computed in the main graph from the input's shape
    (``Shape(x)[1] > threshold``), so it does not depend on the batch: the
    same branch is taken whatever the micro-batch.  ``take_then`` picks the
    threshold, hence the branch.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    h = _dense(nodes, inits, rng, "pre", "x", width, width, act="Relu")
    inits += [
        numpy_helper.from_array(np.array(0 if take_then else 10**6, np.int64), "cond.threshold"),
        numpy_helper.from_array(np.array([1], np.int64), "cond.index"),
        _weight(rng, "then.weight", (width, width)),
        numpy_helper.from_array(np.full((width,), 0.5, np.float32), "else.scale"),
    ]
    nodes += [
        helper.make_node("Shape", ["x"], ["cond.shape"], name="cond.Shape"),
        helper.make_node("Gather", ["cond.shape", "cond.index"], ["cond.width"], name="cond.Gather", axis=0),
        helper.make_node("Squeeze", ["cond.width"], ["cond.width_scalar"], name="cond.Squeeze"),
        helper.make_node("Greater", ["cond.width_scalar", "cond.threshold"], ["cond"], name="cond.Greater"),
    ]
    then_branch = helper.make_graph(
        [
            helper.make_node("MatMul", [h, "then.weight"], ["then.mm"], name="then.MatMul"),
            helper.make_node("Tanh", ["then.mm"], ["then.out"], name="then.Tanh"),
        ],
        "then_branch", [], [_vi("then.out", ["batch", width])],
    )
    else_branch = helper.make_graph(
        [
            helper.make_node("Mul", [h, "else.scale"], ["else.mul"], name="else.Mul"),
            helper.make_node("Sub", ["else.mul", "x"], ["else.out"], name="else.Sub"),
        ],
        "else_branch", [], [_vi("else.out", ["batch", width])],
    )
    nodes.append(helper.make_node("If", ["cond"], ["branch"], name="If", then_branch=then_branch, else_branch=else_branch))
    out = _dense(nodes, inits, rng, "post", "branch", width, width, act=None)
    nodes.append(helper.make_node("Identity", [out], ["y"], name="output.Identity"))
    model = _model(nodes, "if_model", [_vi("x", ["batch", width])], [_vi("y", ["batch", width])], inits)
    return model, {"x": _feed(rng, batch, width)}


def loop_model(trip_count: int = 3, width: int = 32, batch: int = 4, *, seed: int = 0) -> Case:
    """A Loop with a fixed trip count whose body reads outer ``h`` and ``loop.weight``.

    Body: ``v = Tanh(v @ loop.weight + h)``.  The loop also emits a scan
    output (``v`` each iteration, stacked on a new first axis).
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    h = _dense(nodes, inits, rng, "pre", "x", width, width, act="Tanh")
    inits += [
        numpy_helper.from_array(np.array(trip_count, np.int64), "loop.trip_count"),
        _weight(rng, "loop.weight", (width, width), std=1.0 / math.sqrt(width)),
    ]
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["body.cond_in"], ["body.cond_out"], name="body.cond.Identity"),
            helper.make_node("MatMul", ["body.v_in", "loop.weight"], ["body.mm"], name="body.MatMul"),
            helper.make_node("Add", ["body.mm", h], ["body.add"], name="body.AddOuter"),
            helper.make_node("Tanh", ["body.add"], ["body.v_out"], name="body.Tanh"),
            helper.make_node("Identity", ["body.v_out"], ["body.scan"], name="body.scan.Identity"),
        ],
        "loop_body",
        [_vi("body.iter", [], TensorProto.INT64), _vi("body.cond_in", [], TensorProto.BOOL), _vi("body.v_in", ["batch", width])],
        [_vi("body.cond_out", [], TensorProto.BOOL), _vi("body.v_out", ["batch", width]), _vi("body.scan", ["batch", width])],
    )
    nodes.append(helper.make_node("Loop", ["loop.trip_count", "", "x"], ["loop.v", "loop.scan"], name="Loop", body=body))
    out = _dense(nodes, inits, rng, "post", "loop.v", width, width, act=None)
    nodes.append(helper.make_node("Identity", [out], ["y"], name="output.Identity"))
    nodes.append(helper.make_node("ReduceMean", ["loop.scan"], ["steps_mean"], name="steps.ReduceMean", axes=[0], keepdims=0))
    model = _model(
        nodes, "loop_model", [_vi("x", ["batch", width])],
        [_vi("y", ["batch", width]), _vi("steps_mean", ["batch", width])], inits,
    )
    return model, {"x": _feed(rng, batch, width)}


def constant_subgraphs(batch: int = 4, *, seed: int = 0) -> Case:
    """Constant, ConstantOfShape, Identity of an initializer and constant shape arithmetic.

    ``x`` is ``[batch, 4, 8]``.  The reshape target ``[-1, 32]`` is computed
    from ``Shape(weight)`` (all constant), and a second one from
    ``Shape(x)`` (dynamic).
    """
    rng = np.random.default_rng(seed)
    inits = [
        _weight(rng, "weight", (8, 8)),
        _weight(rng, "head.weight", (32, 8)),
        numpy_helper.from_array(np.array([1, 8], np.int64), "half.shape"),
        numpy_helper.from_array(np.array([0], np.int64), "index0"),
    ]
    t = lambda name, arr: helper.make_node("Constant", [], [name], name=f"{name}.Constant", value=numpy_helper.from_array(arr, name))  # noqa: E731
    nodes = [
        t("bias", (rng.standard_normal(8) * 0.1).astype(np.float32)),
        helper.make_node("Add", ["x", "bias"], ["biased"], name="bias.Add"),
        helper.make_node("ConstantOfShape", ["half.shape"], ["half"], name="half.ConstantOfShape",
                         value=numpy_helper.from_array(np.array([0.5], np.float32))),
        helper.make_node("Add", ["biased", "half"], ["shifted"], name="half.Add"),
        helper.make_node("Identity", ["weight"], ["weight.alias"], name="weight.Identity"),
        helper.make_node("MatMul", ["shifted", "weight.alias"], ["mm"], name="MatMul"),
        helper.make_node("Relu", ["mm"], ["act"], name="Relu"),
        # Constant shape arithmetic: [-1, 4 * Shape(weight)[0]] = [-1, 32].
        helper.make_node("Shape", ["weight"], ["weight.shape"], name="weight.Shape"),
        helper.make_node("Gather", ["weight.shape", "index0"], ["weight.rows"], name="weight.rows.Gather", axis=0),
        t("four", np.array([4], np.int64)),
        helper.make_node("Mul", ["weight.rows", "four"], ["flat.width"], name="flat.width.Mul"),
        t("minus_one", np.array([-1], np.int64)),
        helper.make_node("Concat", ["minus_one", "flat.width"], ["flat.shape"], name="flat.shape.Concat", axis=0),
        helper.make_node("Reshape", ["act", "flat.shape"], ["flat"], name="flat.Reshape"),
        helper.make_node("MatMul", ["flat", "head.weight"], ["head"], name="head.MatMul"),
        # Dynamic shape arithmetic: back to [batch, 2, 4] from Shape(x)[0].
        helper.make_node("Shape", ["x"], ["x.shape"], name="x.Shape"),
        helper.make_node("Gather", ["x.shape", "index0"], ["x.batch"], name="x.batch.Gather", axis=0),
        t("tail", np.array([2, 4], np.int64)),
        helper.make_node("Concat", ["x.batch", "tail"], ["y.shape"], name="y.shape.Concat", axis=0),
        helper.make_node("Reshape", ["head", "y.shape"], ["y"], name="y.Reshape"),
    ]
    model = _model(
        nodes, "constant_subgraphs", [_vi("x", ["batch", 4, 8])], [_vi("y", ["batch", 2, 4])], inits
    )
    return model, {"x": _feed(rng, batch, 4, 8)}


#: The small hand-written graphs by name: ``name -> builder()``.
SMALL_MODELS: dict[str, Callable[..., Case]] = {
    "chain": chain,
    "diamond": diamond,
    "skip": skip,
    "multi_io": multi_io,
    "shared_initializer": shared_initializer,
    "if_model": if_model,
    "loop_model": loop_model,
    "constant_subgraphs": constant_subgraphs,
}


# -------------------------------------------------------------- light CNNs

LIGHT_DIR = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "light"
#: Every light model of the onnx package; all of them work with :func:`light_cnn`.
LIGHT_CNNS = [
    "squeezenet", "resnet50", "inception_v1", "inception_v2", "densenet121",
    "shufflenet", "vgg19", "zfnet512", "bvlc_alexnet",
]
#: The big ones (243 MB to 575 MB of weights once filled in): mark their tests slow.
SLOW_LIGHT_CNNS = {"vgg19", "zfnet512", "bvlc_alexnet"}
#: Quick to build, compile and run (5 MB to 27 MB of weights), and between
#: them every operator the CNNs use: the light CNNs of the fast set
#: (``-m "not slow"``).  Tests mark the others slow.
QUICK_LIGHT_CNNS = {"squeezenet", "shufflenet", "inception_v1"}
#: Std of the last layer's outputs on the sample input, see :func:`light_cnn`.
LIGHT_LOGIT_STD = 2.0


def _light_param(rng: np.random.Generator, shape: tuple[int, ...], role: tuple[str, int], attrs: dict) -> np.ndarray:
    op, index = role
    size = shape
    if op == "ResidualBatchNormalization":  # last BN of a residual branch
        if index == 1:  # small scale, so the sums do not grow block after block
            return rng.uniform(0.1, 0.3, size).astype(np.float32)
        op = "BatchNormalization"
    if (op == "Conv" and index == 1) or (op == "Gemm" and index == 1):
        if op == "Gemm" and not attrs.get("transB", 0):
            fan_in = shape[0]
        else:
            fan_in = math.prod(shape[1:])
        std = math.sqrt(2.0 / max(fan_in, 1))
        return (rng.standard_normal(size, dtype=np.float32) * np.float32(std))
    if op == "BatchNormalization" and index in (1, 4):  # scale, variance
        return rng.uniform(0.8, 1.2, size).astype(np.float32)
    if op == "Mul":  # scale after BatchNormalization (densenet, inception_v2)
        return rng.uniform(0.8, 1.2, size).astype(np.float32)
    # Biases, BatchNormalization bias and mean, Add after BatchNormalization.
    return (rng.standard_normal(size, dtype=np.float32) * np.float32(0.05))


def light_cnn(name: str, *, seed: int = 0, legacy_inputs: bool = False) -> Case:
    """A real CNN topology from ``onnx/backend/test/data/light`` with random weights.

    As shipped, every weight is a ``ConstantOfShape`` of 0.02 and a few
    small tensors are initializers.  Here each float parameter becomes an
    initializer drawn by its role: He-normal for Conv and Gemm weights,
    about 1 for BatchNormalization scale and variance, 0.1 to 0.3 for the
    scale of a BatchNormalization that ends a residual branch (so that sums
    do not grow block after block), small otherwise.  The last Conv or Gemm
    is then scaled so that its outputs have std :data:`LIGHT_LOGIT_STD` on
    the returned input (one extra onnxruntime run), so the softmax is
    neither saturated nor flat.  The ``ConstantOfShape`` nodes and unused
    blobs go, and the model moves to IR version 8 with the initializers no
    longer listed as graph inputs (opset stays 9).
    With ``legacy_inputs=True`` it keeps IR version 3 and lists every
    initializer as a graph input, as the shipped file does.  The input is a
    seeded standard normal of the model's input shape (``[1, 3, 224, 224]``).
    """
    if name not in LIGHT_CNNS:
        raise ValueError(f"unknown light model {name!r}; use one of {LIGHT_CNNS}")
    rng = np.random.default_rng(seed)
    model = onnx.load(str(LIGHT_DIR / f"light_{name}.onnx"))
    g = model.graph
    inits = {t.name: t for t in g.initializer}

    # Parameters: float initializers and ConstantOfShape(initializer) outputs.
    params: dict[str, tuple[int, ...]] = {
        t.name: tuple(t.dims) for t in g.initializer if t.data_type == FLOAT
    }
    generated = [n for n in g.node if n.op_type == "ConstantOfShape" and n.input[0] in inits]
    for n in generated:
        params[n.output[0]] = tuple(int(v) for v in numpy_helper.to_array(inits[n.input[0]]))

    # Role of each parameter: its first consumer, looking through Unsqueeze/Reshape.
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in g.node:
        for i, x in enumerate(n.input):
            consumers.setdefault(x, []).append((n, i))

    # BatchNormalization outputs summed with a non-parameter: the ends of residual branches.
    residual_branches = {
        x
        for n in g.node if n.op_type in ("Sum", "Add") and not any(i in params for i in n.input)
        for x in n.input
    }

    classifier = [n for n in g.node if n.op_type in ("Conv", "Gemm")][-1]

    def role(tensor: str) -> tuple[str, int, dict]:
        for _ in range(4):
            uses = consumers.get(tensor, [])
            if not uses:
                return ("", 0, {})
            node, index = uses[0]
            if node.op_type in ("Unsqueeze", "Reshape") and index == 0:
                tensor = node.output[0]
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            op = node.op_type
            if op == "BatchNormalization" and node.output[0] in residual_branches:
                op = "ResidualBatchNormalization"
            return (op, index, attrs)
        return ("", 0, {})

    new_inits = []
    for pname in sorted(params):  # sorted: the draw order does not depend on the file's order
        if pname not in consumers:
            continue  # unused blobs are dropped below
        op, index, attrs = role(pname)
        values = _light_param(rng, params[pname], (op, index), attrs)
        new_inits.append(numpy_helper.from_array(values, pname))

    dropped_shapes = {n.input[0] for n in generated}
    keep_nodes = [n for n in g.node if not (n.op_type == "ConstantOfShape" and n.input[0] in inits)]
    still_used = {x for n in keep_nodes for x in n.input}
    replaced = {t.name for t in new_inits}
    keep_inits = [
        t for t in g.initializer
        if t.name not in replaced and t.name in still_used  # drops unused blobs and shapes
    ]
    del g.node[:]
    g.node.extend(keep_nodes)
    del g.initializer[:]
    g.initializer.extend(keep_inits + new_inits)

    init_names = {t.name for t in g.initializer}
    original_inits = set(inits)
    real_inputs = [i for i in g.input if i.name not in init_names and i.name not in original_inits]
    del g.input[:]
    if legacy_inputs:
        g.input.extend(real_inputs)
        for t in g.initializer:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    else:
        g.input.extend(real_inputs)
        model.ir_version = IR_VERSION
    # Old value_info entries may name the removed shape tensors.
    kept_vi = [v for v in g.value_info if v.name not in dropped_shapes]
    del g.value_info[:]
    g.value_info.extend(kept_vi)

    (inp,) = real_inputs
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    feeds = {inp.name: rng.standard_normal(shape).astype(np.float32)}

    # Scale the last layer so its outputs (the softmax's logits) have std
    # LIGHT_LOGIT_STD: one run of the model, a fixed factor for a seed.
    import onnxruntime as ort

    g.output.append(helper.make_empty_tensor_value_info(classifier.output[0]))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    del g.output[-1]
    (logits,) = session.run([classifier.output[0]], feeds)
    del session
    factor = LIGHT_LOGIT_STD / max(float(logits.std()), 1e-12)
    weight = classifier.input[1]  # may be a Reshape of the initializer (inception_v1)
    producers = {o: n for n in g.node for o in n.output}
    while weight in producers and producers[weight].op_type in ("Reshape", "Unsqueeze", "Identity"):
        weight = producers[weight].input[0]
    for k, t in enumerate(g.initializer):
        if t.name == weight:
            scaled = numpy_helper.to_array(t) * np.float32(factor)
            g.initializer[k].CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), t.name))
    return model, feeds


# ------------------------------------------------------------- random DAGs

RANDOM_DAG_OPS = ("Add", "Mul", "Relu", "Tanh", "MatMul")


def random_dag(
    seed: int,
    n_nodes: int = 12,
    *,
    width: int = 8,
    n_inputs: int = 2,
    batch: int = 3,
    extra_outputs: int = 1,
) -> Case:
    """A random DAG of elementwise ops and MatMuls over ``[batch, width]`` tensors.

    Each of the ``n_nodes`` steps applies one of :data:`RANDOM_DAG_OPS` to
    one or two earlier tensors, so fan-in and fan-out are random.  Every
    input is read (a few steps more are added when ``n_nodes`` is too small
    for that).  Add and MatMul are followed by a Tanh,
    so every tensor stays in ``[-1, 1]`` and comparisons are stable; each
    step is thus one or two ONNX nodes.  Outputs are every tensor nothing
    consumes plus up to ``extra_outputs`` random inner ones.
    """
    if n_nodes < 1 or n_inputs < 1:
        raise ValueError("random_dag needs at least one node and one input")
    rng = np.random.default_rng(seed)
    inputs = [f"in{i}" for i in range(n_inputs)]
    tensors = list(inputs)
    unused = list(inputs)
    consumed: set[str] = set()
    nodes, inits = [], []

    def pick() -> str:
        # Inputs first, then mostly tensors nothing reads yet, so few dangle.
        if unused and (unused[0] in inputs or rng.random() < 0.6):
            index = 0 if unused[0] in inputs else int(rng.integers(len(unused)))
            return unused.pop(index)
        # Otherwise favour recent tensors, so the graph is deep as well as wide.
        k = len(tensors)
        weights = np.arange(1, k + 1, dtype=float) ** 2
        choice = tensors[int(rng.choice(k, p=weights / weights.sum()))]
        if choice in unused:
            unused.remove(choice)
        return choice

    step = 0
    while step < n_nodes or any(x in unused for x in inputs):
        op = RANDOM_DAG_OPS[int(rng.integers(len(RANDOM_DAG_OPS)))]
        if step >= n_nodes - 1 and sum(x in unused for x in inputs) > 1:
            op = "Add"  # the last step reads two inputs nothing has read yet
        name = f"n{step}"
        a = pick()
        if op in ("Add", "Mul"):
            b = pick()
            operands = [a, b]
        elif op == "MatMul":
            w = f"{name}.weight"
            inits.append(_weight(rng, w, (width, width), std=1.0 / math.sqrt(width)))
            operands = [a, w]
        else:
            operands = [a]
        consumed.update(operands)
        if op in ("Add", "MatMul"):
            nodes.append(helper.make_node(op, operands, [f"{name}.{op.lower()}"], name=f"{name}.{op}"))
            nodes.append(helper.make_node("Tanh", [f"{name}.{op.lower()}"], [name], name=f"{name}.Tanh"))
        else:
            nodes.append(helper.make_node(op, operands, [name], name=f"{name}.{op}"))
        tensors.append(name)
        unused.append(name)
        step += 1

    made = tensors[n_inputs:]
    outputs = [t for t in made if t not in consumed]
    inner = [t for t in made if t in consumed]
    if inner and extra_outputs > 0:
        extra = rng.choice(len(inner), size=min(extra_outputs, len(inner)), replace=False)
        outputs += [inner[int(i)] for i in extra]
    outputs = sorted(set(outputs), key=made.index)
    model = _model(
        nodes, f"random_dag_{seed}",
        [_vi(x, ["batch", width]) for x in inputs],
        [_vi(x, ["batch", width]) for x in outputs],
        inits,
    )
    feeds = {x: rng.uniform(-1, 1, (batch, width)).astype(np.float32) for x in inputs}
    return model, feeds


# ------------------------------------------------------- exported DistilBERT

#: ``DistilBertConfig`` arguments of the reduced export: the graph of the
#: full model at the dimensions of ``crowdgraph.zoo.SIZES["tiny"]``.
REDUCED_CONFIG = dict(
    dim=64, hidden_dim=256, n_layers=2, n_heads=4, vocab_size=1000, max_position_embeddings=128
)
_DISTILBERT_ZOO_SIZE = {"reduced": "tiny", "full": "full"}


def distilbert_torch_model(size: str = "reduced"):
    """``DistilBertForSequenceClassification`` with ``torch.manual_seed(0)`` weights, in eval mode.

    ``full`` is ``DistilBertConfig()``; ``reduced`` uses :data:`REDUCED_CONFIG`.
    Nothing is downloaded.
    """
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    if size not in _DISTILBERT_ZOO_SIZE:
        raise ValueError(f"unknown size {size!r}; use 'reduced' or 'full'")
    config = DistilBertConfig() if size == "full" else DistilBertConfig(**REDUCED_CONFIG)
    torch.manual_seed(0)
    return DistilBertForSequenceClassification(config).eval()


def exported_distilbert_inputs(batch: int = 1, seq: int = 128, *, size: str = "reduced", seed: int = 0) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask`` for :func:`exported_distilbert` (later rows padded)."""
    return zoo.sample_inputs(_DISTILBERT_ZOO_SIZE[size], batch=batch, sequence=seq, seed=seed)


def _export(size: str, path: Path) -> str:
    """Export the torch model to ``path``; return the exporter used."""
    import torch

    model = distilbert_torch_model(size)
    feeds = exported_distilbert_inputs(2, 16, size=size)  # row 1 padded: the mask path is traced
    args = (torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]))
    names = dict(input_names=["input_ids", "attention_mask"], output_names=["logits"])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            # The TorchScript exporter: it needs no onnxscript and writes one file.
            torch.onnx.export(
                model, args, str(path), dynamo=False, opset_version=OPSET, **names,
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "sequence"},
                    "logits": {0: "batch"},
                },
            )
            return "torchscript"
        except Exception as legacy_error:  # removed in a later torch: try torch.export
            for leftover in path.parent.iterdir():
                leftover.unlink()
            batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("sequence", max=128 if size == "reduced" else 512)
            try:
                torch.onnx.export(
                    model, args, str(path), dynamo=True, opset_version=max(OPSET, 18), **names,
                    dynamic_shapes={"input_ids": {0: batch_dim, 1: seq_dim}, "attention_mask": {0: batch_dim, 1: seq_dim}},
                    external_data=True,
                )
            except Exception as dynamo_error:
                raise RuntimeError(
                    f"neither torch.onnx exporter worked: TorchScript: {legacy_error!r}; "
                    f"dynamo: {dynamo_error!r}"
                ) from dynamo_error
            return "dynamo"


def exported_distilbert(size: str = "reduced", cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of ``DistilBertForSequenceClassification`` exported to ONNX, exporting it once.

    The file lives in ``<cache_dir>/distilbert-<size>-torch<v>-transformers<v>/model.onnx``
    (``cache_dir`` defaults to ``<repo>/.cache/models``), next to any
    external data file the exporter wrote and ``export.json``.
    """
    if size not in _DISTILBERT_ZOO_SIZE:
        raise ValueError(f"unknown size {size!r}; use 'reduced' or 'full'")
    return _exported_once(f"distilbert-{size}", lambda path: _export(size, path), {"size": size}, cache_dir)


def _export_versions() -> dict[str, str]:
    """The installed torch and transformers versions, read without importing either (seconds each).

    Raises ImportError, as importing them would, when one is missing.
    """
    from importlib import metadata

    try:
        return {name: metadata.version(name) for name in ("torch", "transformers")}
    except metadata.PackageNotFoundError as exc:
        raise ImportError(f"{exc.name} is not installed; pip install 'crowdgraph[export]'") from exc


def _exported_once(name: str, export: Callable[[Path], str], meta: dict,
                   cache_dir: str | os.PathLike | None) -> Path:
    """``<cache_dir>/<name>-torch<v>-transformers<v>/model.onnx``, written by ``export`` the first time.

    The directory is written under a temporary name and renamed into
    place, so test processes running at once never see half a file, and
    one of them exports while the others wait (a lock on the cache folder).
    """
    versions = _export_versions()
    root = Path(cache_dir) if cache_dir is not None else CACHE_DIR
    key = f"{name}-torch{versions['torch']}-transformers{versions['transformers']}"
    key = "".join(c if c.isalnum() or c in "-._" else "_" for c in key)
    final = root / key
    model_path = final / "model.onnx"
    if model_path.exists():
        return model_path
    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root, os.O_RDONLY):  # a lock on the folder: one process exports, the others wait for it
        if not model_path.exists():
            _export_into(root, key, export, meta, versions)
    return model_path


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, flags: int = os.O_RDWR | os.O_CREAT) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (opened with ``flags``) between the test processes of a run.

    The lock goes with the file's descriptor, so it is released when the
    block ends, and also when the process holding it dies.
    """
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _export_into(root: Path, key: str, export: Callable[[Path], str], meta: dict, versions: dict[str, str]) -> None:
    """Export into a temporary folder of ``root``, then rename it to ``root / key``."""
    final = root / key
    model_path = final / "model.onnx"
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        exporter = export(tmp / "model.onnx")
        onnx.checker.check_model(str(tmp / "model.onnx"))  # by path: works with external data
        (tmp / "export.json").write_text(json.dumps({
            **meta, "exporter": exporter, **versions, "onnx": onnx.__version__,
        }, indent=2))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, final)
        except OSError:
            if not model_path.exists():  # not a lost race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------- exported decoders (GPT-2, Llama)

#: ``GPT2Config`` arguments of the exported GPT-2: its graph at the
#: dimensions of ``crowdgraph.zoo.DECODER_SIZES["tiny"]`` (learned positions, multi-head attention).
GPT2_CONFIG = dict(vocab_size=500, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0)
#: ``LlamaConfig`` arguments of the exported Llama: rotary positions, grouped-query attention
#: (4 query heads share 2 key/value heads).
LLAMA_CONFIG = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    bos_token_id=0, eos_token_id=0, pad_token_id=0)
_DECODERS = {"gpt2": ("GPT2Config", "GPT2LMHeadModel", GPT2_CONFIG),
             "llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA_CONFIG)}


def decoder_torch_model(kind: str = "gpt2"):
    """A transformers causal LM (``gpt2`` or ``llama``) with ``torch.manual_seed(0)`` weights, in eval mode."""
    import torch
    import transformers

    config_class, model_class, arguments = _DECODERS[kind]
    torch.manual_seed(0)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**arguments)).eval()


def _export_decoder(kind: str, path: Path) -> str:
    """The decoder with its cache as flat tensors in the Optimum layout, by the TorchScript exporter."""
    import torch
    from transformers.cache_utils import DynamicCache

    model = decoder_torch_model(kind)
    config = model.config
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = config.hidden_size // config.num_attention_heads

    class WithFlatCache(torch.nn.Module):
        """past_key_values.{i}.key/.value in, logits and present.{i}.key/.value out."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(layers)], config=config)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = [t for layer in out.past_key_values.layers[:layers] for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    caches = [f"{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    batch, sequence, past = 2, 3, 4
    args = (torch.randint(1, config.vocab_size, (batch, sequence)),
            torch.ones(batch, past + sequence, dtype=torch.long),
            torch.arange(past, past + sequence).repeat(batch, 1),
            *(torch.randn(batch, kv_heads, past, head_dim) for _ in caches))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "position_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "past_sequence + sequence"},
            "logits": {0: "batch", 1: "sequence"},
            **{f"past_key_values.{c}": {0: "batch", 2: "past_sequence"} for c in caches},
            **{f"present.{c}": {0: "batch", 2: "past_sequence + sequence"} for c in caches}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(WithFlatCache(), args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=["input_ids", "attention_mask", "position_ids",
                                       *(f"past_key_values.{c}" for c in caches)],
                          output_names=["logits", *(f"present.{c}" for c in caches)], dynamic_axes=axes)
    return "torchscript"


def exported_decoder(kind: str = "gpt2", cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of a transformers decoder (``gpt2`` or ``llama``) exported with its cache, exporting it once."""
    if kind not in _DECODERS:
        raise ValueError(f"unknown decoder {kind!r}; use one of {sorted(_DECODERS)}")
    return _exported_once(f"{kind}-with-past", lambda path: _export_decoder(kind, path),
                          {"config": _DECODERS[kind][2]}, cache_dir)


# -- decoders exported by Hugging Face Optimum itself -------------------------
# Made once with optimum-onnx 0.1.0, transformers 4.57.6 and torch 2.13.0 (Optimum is not a test
# dependency: it pins transformers < 4.58), ``main_export(..., task="text-generation-with-past")``,
# from randomly initialised ``LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
# num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)`` (rotary positions,
# grouped-query attention) and ``GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=4)`` (learned
# positions, multi-head).  Both read the cache's length with ``Shape(past_key_values.0.key)`` where
# they build the mask.
OPTIMUM_DECODERS = ("llama", "gpt2")


def optimum_decoder(kind: str) -> Path:
    """The ``.onnx`` file of the Optimum export ``kind`` (one of :data:`OPTIMUM_DECODERS`)."""
    return REPO / "tests" / "data" / f"optimum-{kind}.onnx"


def whole_model_tokens(path: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy tokens of ``prompts`` from one whole-model session of ``path``, its cache fed back."""
    from crowdgraph.generate import decode, decoder_layout, left_padded
    from crowdgraph.runtime import open_session, run_session

    model = onnx.load(path)
    layout = decoder_layout([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    dims = {i.name: tuple(i.type.tensor_type.shape.dim[k].dim_value for k in (1, 3)) for i in model.graph.input
            if i.name.startswith("past_key_values.")}
    session = open_session(model.SerializeToString())
    ids, mask = left_padded(prompts)
    steps = decode(lambda feeds: run_session(session, feeds), layout, dims, ids, mask, max_new_tokens=new_tokens)
    return np.stack([s.tokens for s in steps], axis=1).tolist()
