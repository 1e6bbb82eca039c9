"""Operator splitting: nodes too big for the budget become exact, smaller pieces.

Without it the model is cut at node granularity, so its largest node sets
the smallest budget: DistilBERT's word-embedding Gather reads a 93.8 MB
table, so no phone with less than about 97 MB could ever join.  This
module rewrites such nodes into equivalent chains of smaller nodes, each
with its own slice of the weight as a separate initializer, so the
partitioner can put the pieces in different partitions and the budget,
not the model, decides who can help.

What is split, and how
----------------------
Only nodes whose own estimate (:func:`crowdgraph.partition.node_estimates`)
is above the budget are rewritten, into the fewest pieces that each fit
with their activations and the runtime's base cost.

* **Gather on a constant table, axis 0** (embeddings): ``rows``.  The
  table is cut into row shards.  Indices are first brought into
  ``[0, rows)`` (``Mod``, which turns the negative indices Gather allows
  into ``idx + rows``); each shard then looks up ``Clip(idx - start, -1,
  size)`` in its rows followed by one extra row of zeros, so an index
  outside the shard (clipped to ``-1`` or ``size``) reads that zero row.
  The shard results are summed with an ``Add`` chain.  Every output row
  comes from exactly one shard plus zeros: the result is exact.
* **MatMul / Gemm with a constant 2-D weight**: ``columns`` (each piece
  multiplies the whole input by a column slice of the weight; ``Concat``
  on the last axis joins them) or ``inner`` (each piece multiplies a
  ``Slice`` of the input by a row slice of the weight; an ``Add`` chain
  sums the partial products).  Gemm keeps ``transA``, ``transB`` and
  ``alpha``; its bias ``C`` is sliced with the columns, or added once, by
  the last inner piece (with ``beta``).  Results equal the original up to
  float rounding of the changed summation order.

For MatMul and Gemm the choice is made per node by the bytes that must
cross partitions when every piece lands in its own partition
(:func:`crossing_bytes`): a column piece needs the whole input, an inner
piece a slice of it but it hands on a full-size partial sum.  Expanding
layers (DistilBERT's ``lin1``, 768 -> 3072) split by columns, contracting
ones (``lin2``) by the inner dimension.

Nodes that are activation-bound (their inputs and outputs alone are too
big) and are image ops -- convolution, pooling, normalisation, elementwise,
a channel ``Concat`` -- are run in spatial tiles instead, and transformer
ops that treat each position on its own -- elementwise, LayerNormalization
and Softmax over the last axis, MatMul -- in chunks along the sequence
(:mod:`crowdgraph.tile`).  When even one row or column per piece cannot
fit, or a node neither splits nor tiles,
:class:`~crowdgraph.errors.BudgetError` names the node and the true floor,
and, when smaller micro-batches would help, the largest micro-batch that
fits (:func:`fitting_microbatch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import BudgetError, ModelError
from .lower import (
    ModelLike,
    OpGraph,
    OpNode,
    _is_normalised,
    bind_shapes,
    declared_shapes,
    load_model,
    lower,
    outer_scope_names,
    tensor_nbytes,
)
from .partition import ACTIVATION_FACTOR, RUNTIME_BASE_BYTES, RUNTIME_NODE_BYTES, Estimate, node_estimates
from .units import format_bytes, parse_bytes

__all__ = [
    "SplitRecord",
    "split_oversized",
    "split_node",
    "split_lowered",
    "fitting_microbatch",
    "smallest_budget",
    "piece_bounds",
    "crossing_bytes",
]

#: The ways a node can be cut: row shards of a table, column slices or
#: inner-dimension slices of a weight.
HOWS = ("rows", "columns", "inner")
_UNIT = {"rows": "row", "columns": "column", "inner": "inner-dimension slice"}
#: Bytes kept free in every piece for its small constants (clip bounds,
#: slice starts, a zero bias), so a piece never lands exactly on the budget.
_SLACK = 4096
#: Runtime cost of a session that holds a single node.
_ONE_NODE = RUNTIME_BASE_BYTES + RUNTIME_NODE_BYTES
#: Gather splitting uses Clip on integer indices, which needs opset 12.
_GATHER_MIN_OPSET = 12


@dataclass(frozen=True)
class SplitRecord:
    """One node that was rewritten into pieces.

    Attributes
    ----------
    node, op_type:
        Name and op type of the original node (it is gone from the model).
    how:
        ``"rows"`` (table shards), ``"columns"`` or ``"inner"``.
    pieces:
        Number of pieces, each with its own slice of the weight.
    new_nodes:
        Names of the nodes that replace it, in graph order.
    weight:
        The initializer that was cut.
    piece_weight_bytes:
        Weights of the largest piece.
    region:
        For a tiled region (``op_type`` ``"region"``, ``how`` ``"rows"``
        or ``"columns"`` of an image, ``"sequence"`` or ``"features"`` of
        a transformer's chunks, ``pieces`` tiles; :mod:`crowdgraph.tile`):
        the names of the nodes it replaced, ``node`` being the first.
        Empty for a weight split.
    """

    node: str
    op_type: str
    how: str
    pieces: int
    new_nodes: tuple[str, ...]
    weight: str
    piece_weight_bytes: int
    region: tuple[str, ...] = ()

    def __post_init__(self) -> None:  # plans read back from JSON give lists
        object.__setattr__(self, "new_nodes", tuple(self.new_nodes))
        object.__setattr__(self, "region", tuple(self.region))

    def describe(self) -> str:
        """One line for ``crowdgraph inspect``: what was cut, how, into how many pieces."""
        if self.region:
            pieces = "tiles" if self.how in ("rows", "columns") else "chunks"
            return (f"{len(self.region)} nodes ({self.region[0]} .. {self.region[-1]}) "
                    f"in {self.pieces} {pieces} by {self.how}")
        return (f"{self.op_type:<6}  {self.pieces:>3} pieces by {self.how:<7}  "
                f"weights {self.piece_weight_bytes / 1e6:.2f} MB per piece at most")


@dataclass(frozen=True)
class _Target:
    """A node that can be split, with the sizes its pieces' costs depend on."""

    node: str
    op_type: str
    weight: str
    shape: tuple[int, ...]
    itemsize: int
    x: str
    y: str
    x_bytes: int
    y_bytes: int
    y_rank: int
    x_rank: int
    bias: str | None = None
    bias_bytes: int = 0
    bias_constant: bool = True
    trans_a: bool = False
    trans_b: bool = False


# -- pure helpers --------------------------------------------------------------


def piece_bounds(n: int, pieces: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of ``pieces`` near-equal pieces of ``n`` units.

    The first ``n % pieces`` pieces take one unit more, so pieces differ
    by at most one row or column and the largest is ``ceil(n / pieces)``.

    >>> piece_bounds(10, 3)
    [(0, 4), (4, 7), (7, 10)]
    >>> piece_bounds(4, 4)
    [(0, 1), (1, 2), (2, 3), (3, 4)]
    """
    if not 1 <= pieces <= n:
        raise ValueError(f"cannot cut {n} units into {pieces} pieces; use 1 to {n} pieces")
    base, extra = divmod(n, pieces)
    bounds, start = [], 0
    for k in range(pieces):
        stop = start + base + (1 if k < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def crossing_bytes(how: str, pieces: int, x_bytes: int, y_bytes: int) -> int:
    """Bytes sent between partitions when every piece has its own partition.

    ``x_bytes`` is the node's variable input, ``y_bytes`` its output.  A
    column piece (and a table shard) needs the whole input; column slices
    all go to the piece that concatenates them.  Inner pieces each get a
    slice of the input, but pass a full-size partial sum along; so do
    table shards.  The node's own input and output travel either way and
    are left out.

    >>> crossing_bytes("columns", 2, 100, 400)   # expanding layer: columns
    400
    >>> crossing_bytes("inner", 2, 100, 400)
    500
    >>> crossing_bytes("inner", 2, 400, 100) < crossing_bytes("columns", 2, 400, 100)
    True
    """
    if how == "columns":
        return pieces * x_bytes + (pieces - 1) * y_bytes // pieces
    if how == "inner":
        return x_bytes + (pieces - 1) * y_bytes
    if how == "rows":
        return pieces * x_bytes + (pieces - 1) * y_bytes
    raise ValueError(f"unknown split {how!r}; use one of {HOWS}")


def _activation(inputs: int, outputs: int) -> int:
    """A single node's activation estimate (the partition formula for one node).

    Inputs stay live, outputs are made and copied once more on the way out.

    >>> _activation(100, 10)
    180
    """
    return int(ACTIVATION_FACTOR * (inputs + 2 * outputs))


def _extent(t: _Target, how: str) -> tuple[int, int]:
    """Units to cut along for ``how`` and weight bytes per unit."""
    if t.op_type == "Gather":
        return t.shape[0], math.prod(t.shape[1:]) * t.itemsize
    k, n = (t.shape[1], t.shape[0]) if t.trans_b else (t.shape[0], t.shape[1])
    if how == "columns":
        return n, k * t.itemsize
    return k, n * t.itemsize


def _hows(t: _Target) -> tuple[str, ...]:
    return ("rows",) if t.op_type == "Gather" else ("columns", "inner")


def _costs(t: _Target, how: str, pieces: int) -> tuple[int, int, int]:
    """Resident bytes of the largest piece node and of the largest helper node, and the piece's weights.

    Helper nodes are those without a weight slice (Mod, Sub, Clip, Slice,
    Add, Concat); they depend on activations only.
    """
    n, unit = _extent(t, how)
    most = -(-n // pieces)
    bias = t.bias_bytes if t.bias_constant else int(ACTIVATION_FACTOR * t.bias_bytes)
    if how == "rows":
        weights = (most + 1) * unit  # one zero row per shard
        piece = weights + _activation(t.x_bytes, t.y_bytes)
        helpers = _activation(t.x_bytes, t.x_bytes)
        if pieces > 1:
            helpers = max(helpers, _activation(2 * t.y_bytes, t.y_bytes))
    elif how == "columns":
        weights = most * unit
        piece = weights + bias + _activation(t.x_bytes, t.y_bytes // n * most)
        helpers = _activation(t.y_bytes, t.y_bytes) if pieces > 1 else 0
    else:
        weights = most * unit
        part = t.x_bytes // n * most
        piece = weights + bias + _activation(part, t.y_bytes)
        helpers = _activation(t.x_bytes, part)
        if pieces > 1:
            helpers = max(helpers, _activation(2 * t.y_bytes, t.y_bytes))
    return piece + _ONE_NODE + _SLACK, helpers + _ONE_NODE + _SLACK, weights


def _fewest_pieces(t: _Target, how: str, budget: int) -> int | None:
    """Fewest pieces (at least 2) whose every node fits ``budget``, or None."""
    n, _ = _extent(t, how)

    def fits(pieces: int) -> bool:
        piece, helpers, _ = _costs(t, how, pieces)
        return max(piece, helpers) <= budget

    if n < 2 or not fits(n):
        return None
    low, high = 1, n  # the costs only fall as pieces grow: bisect
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            high = mid
        else:
            low = mid
    return high


def _choose(t: _Target, budget: int) -> tuple[str, int] | None:
    """How to split ``t`` and into how many pieces: least crossing bytes, then fewest pieces."""
    options = []
    for how in _hows(t):
        pieces = _fewest_pieces(t, how, budget)
        if pieces is not None:
            options.append((crossing_bytes(how, pieces, t.x_bytes, t.y_bytes), pieces, HOWS.index(how), how))
    if not options:
        return None
    _, pieces, _, how = min(options)
    return how, pieces


def _finest(t: _Target) -> tuple[int, str]:
    """The smallest resident need of any split of ``t`` and its way."""
    best = []
    for how in _hows(t):
        n, _ = _extent(t, how)
        if n >= 2:
            piece, helpers, _ = _costs(t, how, n)
            best.append((max(piece, helpers), how))
    return min(best) if best else (math.inf, _hows(t)[0])  # type: ignore[return-value]


# -- which nodes split ---------------------------------------------------------


def _default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 1


def _attrs(proto: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in proto.attribute}


def _target(og: OpGraph, node: OpNode, inits: Mapping[str, onnx.TensorProto]) -> _Target | str:
    """What splitting ``node`` needs to know, or why it cannot be split."""
    proto = og.node_protos[node.name]
    op = node.op_type
    if proto.domain not in ("", "ai.onnx") or op not in ("Gather", "MatMul", "Gemm"):
        return ("crowdgraph splits only Gather (row lookups in a constant table) and MatMul/Gemm "
                f"with a constant weight, not {op}")
    inputs = list(proto.input)
    weight_at, x_at = (0, 1) if op == "Gather" else (1, 0)
    if len(inputs) <= max(weight_at, x_at):
        return "it lacks inputs"
    weight, x = inputs[weight_at], inputs[x_at]
    role = "table" if op == "Gather" else "weight"
    if weight not in inits:
        if weight in og.constant_bytes:
            return f"its {role} {weight!r} is computed from constants, not stored as an initializer"
        return f"its {role} {weight!r} is not a constant"
    if x in og.constant_bytes:
        return f"it reads a constant {role} and the constant {x!r}; only a variable input splits"
    init = inits[weight]
    shape = tuple(int(d) for d in init.dims)
    if init.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return f"its {role} is not numeric"
    xi, yi = og.tensors.get(x), og.tensors.get(proto.output[0])
    if xi is None or yi is None:
        return "the shapes of its input or output are unknown"
    itemsize = tensor_nbytes(init.data_type, (1,))
    attrs = _attrs(proto)
    common = dict(node=node.name, op_type=op, weight=weight, shape=shape, itemsize=itemsize, x=x,
                  y=proto.output[0], x_bytes=xi.nbytes, y_bytes=yi.nbytes, y_rank=len(yi.shape),
                  x_rank=len(xi.shape))
    if op == "Gather":
        axis = int(attrs.get("axis", 0))
        if axis < 0:
            axis += len(shape)
        if axis != 0:
            return f"it gathers along axis {axis}; only lookups along axis 0 (rows) split"
        if _default_opset(og.model) < _GATHER_MIN_OPSET:
            return f"splitting a Gather needs opset {_GATHER_MIN_OPSET} or later (the model has " \
                   f"{_default_opset(og.model)}); convert it with onnx.version_converter"
        if xi.elem_type not in (onnx.TensorProto.INT32, onnx.TensorProto.INT64):
            return "its indices are neither int32 nor int64"
        if not shape:
            return "its table is a scalar"
        return _Target(**common)
    if len(shape) != 2:
        return f"its weight has rank {len(shape)}; only 2-D weights split"
    if op == "MatMul":
        return _Target(**common)
    bias = inputs[2] if len(inputs) > 2 and inputs[2] else None
    bias_bytes = og.nbytes(bias) if bias is not None else 0
    return _Target(**common, bias=bias, bias_bytes=bias_bytes,
                   bias_constant=bias is None or bias in og.constant_bytes,
                   trans_a=bool(attrs.get("transA", 0)), trans_b=bool(attrs.get("transB", 0)))


def _floors(og: OpGraph, estimates: list[Estimate]) -> list[int]:
    """For each node, the smallest resident need it can have, splitting included."""
    inits = {t.name: t for t in og.model.graph.initializer}
    floors = []
    for node, est in zip(og.nodes, estimates):
        target = _target(og, node, inits) if node.op_type in ("Gather", "MatMul", "Gemm") else None
        finest = _finest(target)[0] if isinstance(target, _Target) else math.inf
        floors.append(int(min(est.resident_bytes, finest)))
    return floors


# -- rewriting -----------------------------------------------------------------


class _Rewriter:
    """Makes the nodes and initializers that replace one node, with fresh names."""

    def __init__(self, used: set[str], prefix: str, opset: int):
        self.used = used
        self.prefix = prefix
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def fresh(self, name: str) -> str:
        candidate, k = name, 1
        while candidate in self.used:
            candidate = f"{name}_{k}"
            k += 1
        self.used.add(candidate)
        return candidate

    def const(self, name: str, value: np.ndarray) -> str:
        name = self.fresh(name)
        self.inits.append(numpy_helper.from_array(np.asarray(value, order="C"), name))  # keeps scalars 0-D
        return name

    def node(self, op: str, inputs: list[str], what: str, output: str | None = None, **attrs) -> str:
        out = output if output is not None else self.fresh(f"{self.prefix}/{what}_output")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.fresh(f"{self.prefix}/{what}"), **attrs))
        return out

    def slice(self, x: str, start: int, stop: int, axis: int, what: str) -> str:
        if self.opset < 10:
            return self.node("Slice", [x], what, starts=[start], ends=[stop], axes=[axis])
        ints = [self.const(f"{self.prefix}/{what}.{k}", np.array([v], np.int64))
                for k, v in (("starts", start), ("ends", stop), ("axes", axis))]
        return self.node("Slice", [x, *ints], what)


def _rewrite_gather(r: _Rewriter, t: _Target, table: np.ndarray, idx_dtype: np.dtype, pieces: int) -> None:
    rows = table.shape[0]
    zero_row = np.zeros((1,) + table.shape[1:], table.dtype)
    index = r.node("Mod", [t.x, r.const(f"{r.prefix}/rows", np.array(rows, idx_dtype))], "normalise", fmod=0)
    below = r.const(f"{r.prefix}/minus_one", np.array(-1, idx_dtype))
    total = None
    for k, (start, stop) in enumerate(piece_bounds(rows, pieces)):
        last = k == pieces - 1
        shard = r.const(f"{t.weight}.rows{start}-{stop}", np.concatenate([table[start:stop], zero_row]))
        local = index if start == 0 else r.node(
            "Sub", [index, r.const(f"{r.prefix}/piece{k}.start", np.array(start, idx_dtype))], f"piece{k}/Sub")
        size = r.const(f"{r.prefix}/piece{k}.size", np.array(stop - start, idx_dtype))
        clipped = r.node("Clip", [local, below, size], f"piece{k}/Clip")
        found = r.node("Gather", [shard, clipped], f"piece{k}/Gather", axis=0,
                       output=t.y if pieces == 1 else None)
        total = found if total is None else r.node("Add", [total, found], f"piece{k}/Add",
                                                   output=t.y if last else None)


def _rewrite_product(r: _Rewriter, t: _Target, proto: onnx.NodeProto, weight: np.ndarray, how: str,
                     pieces: int, bias: np.ndarray | None, bias_shape: tuple[int, ...]) -> None:
    gemm = t.op_type == "Gemm"
    attrs = {k: v for k, v in _attrs(proto).items() if k in ("alpha", "beta", "transA", "transB")}
    n, _ = _extent(t, how)
    bounds = piece_bounds(n, pieces)
    out_axis = t.y_rank - 1
    if how == "columns":
        outs = []
        for k, (start, stop) in enumerate(bounds):
            part = weight[start:stop, :] if t.trans_b else weight[:, start:stop]
            inputs = [t.x, r.const(f"{t.weight}.columns{start}-{stop}", part)]
            if gemm and t.bias is not None:
                if bias_shape and bias_shape[-1] == n and bias is not None:
                    inputs.append(r.const(f"{t.bias}.columns{start}-{stop}", bias[..., start:stop]))
                elif bias_shape and bias_shape[-1] == n:
                    inputs.append(r.slice(t.bias, start, stop, len(bias_shape) - 1, f"piece{k}/bias.Slice"))
                else:
                    inputs.append(t.bias)  # broadcast along the columns: every piece adds it whole
            outs.append(r.node(t.op_type, inputs, f"piece{k}/{t.op_type}", output=t.y if pieces == 1 else None,
                               **attrs))
        if pieces > 1:
            r.node("Concat", outs, "Concat", output=t.y, axis=out_axis)
        return
    x_axis = (0 if t.trans_a else 1) if gemm else t.x_rank - 1
    parts = [r.slice(t.x, start, stop, x_axis, f"piece{k}/Slice") for k, (start, stop) in enumerate(bounds)]
    total = None
    for k, (start, stop) in enumerate(bounds):
        last = k == pieces - 1
        part = weight[:, start:stop] if t.trans_b else weight[start:stop, :]
        inputs = [parts[k], r.const(f"{t.weight}.inner{start}-{stop}", part)]
        if gemm and last and t.bias is not None:
            inputs.append(t.bias)  # the bias is added once, by the last piece
        elif gemm and r.opset < 11:
            inputs.append(r.const(f"{r.prefix}/zero", np.zeros((), weight.dtype)))  # C is required there
        piece_attrs = attrs if (last or not gemm) else {k: v for k, v in attrs.items() if k != "beta"}
        found = r.node(t.op_type, inputs, f"piece{k}/{t.op_type}", output=t.y if pieces == 1 else None,
                       **piece_attrs)
        total = found if total is None else r.node("Add", [total, found], f"piece{k}/Add",
                                                   output=t.y if last else None)


def _all_names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    names = {n.name for n in graph.node} | {o for n in graph.node for o in n.output}
    names |= {i.name for i in graph.initializer} | {i.name for i in graph.input}
    names |= {o.name for o in graph.output} | {v.name for v in graph.value_info}
    return names


def _rewrite(og: OpGraph, plans: Mapping[str, tuple[_Target, str, int]]) -> tuple[onnx.ModelProto, list[SplitRecord]]:
    """A copy of ``og.model`` with every planned node replaced by its pieces."""
    source = og.model
    opset = _default_opset(source)
    used = _all_names(source)
    inits = {t.name: t for t in source.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    records = []
    for proto in source.graph.node:
        plan = plans.get(proto.name)
        if plan is None:
            nodes.append(proto)
            continue
        t, how, pieces = plan
        r = _Rewriter(used, proto.name + "/split", opset)
        weight = numpy_helper.to_array(inits[t.weight])
        if t.op_type == "Gather":
            idx_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(og.tensors[t.x].elem_type))
            _rewrite_gather(r, t, weight, idx_dtype, pieces)
        else:
            bias = numpy_helper.to_array(inits[t.bias]) if t.bias in inits else None
            bias_shape = tuple(bias.shape) if bias is not None else (
                og.tensors[t.bias].shape if t.bias in og.tensors else ())
            _rewrite_product(r, t, proto, weight, how, pieces, bias, bias_shape)
        nodes.extend(r.nodes)
        new_inits.extend(r.inits)
        records.append(SplitRecord(
            node=proto.name, op_type=t.op_type, how=how, pieces=pieces,
            new_nodes=tuple(n.name for n in r.nodes), weight=t.weight,
            piece_weight_bytes=_costs(t, how, pieces)[2],
        ))
    read = {i for n in nodes for i in n.input} | {o.name for o in source.graph.output}
    read |= {name for n in nodes for name in outer_scope_names(n)}
    unused = {t.weight for t, _, _ in plans.values()} | {t.bias for t, _, _ in plans.values() if t.bias}
    unused -= read
    model = onnx.ModelProto()
    model.CopyFrom(source)
    graph = model.graph
    del graph.node[:]
    graph.node.extend(nodes)
    for k in reversed(range(len(graph.initializer))):
        if graph.initializer[k].name in unused:
            del graph.initializer[k]
    graph.initializer.extend(new_inits)
    return model, records


# -- the public functions ----------------------------------------------------------


def split_lowered(og: OpGraph, budget: int) -> tuple[OpGraph, list[SplitRecord]]:
    """Split the nodes of a lowered model that do not fit ``budget`` on their own.

    The form :func:`crowdgraph.compile` uses: it returns the lowered split
    model (so it is not lowered twice) or ``og`` itself when every node
    fits.  Raises :class:`BudgetError` below the true floor.
    """
    from .tile import TILEABLE_OPS, TileError, tile_lowered  # it builds on this module

    estimates = node_estimates(og)
    over = [i for i, est in enumerate(estimates) if est.resident_bytes > budget]
    if not over:
        return og, []
    inits = {t.name: t for t in og.model.graph.initializer}
    plans: dict[str, tuple[_Target, str, int]] = {}
    seeds: dict[str, str] = {}  # activation-bound nodes, to tile, and why they do not split
    for i in over:
        target = _target(og, og.nodes[i], inits)
        choice = _choose(target, budget) if isinstance(target, _Target) else None
        if choice is not None:
            plans[og.nodes[i].name] = (target, *choice)  # type: ignore[assignment]
        elif og.nodes[i].op_type in TILEABLE_OPS:
            seeds[og.nodes[i].name] = target if isinstance(target, str) else ""
        else:
            raise _below_floor(og, estimates, i, target, budget)
    regions: list[SplitRecord] = []
    if seeds:  # tiles first: a weight split inside a region would leave its Slices and joins to tile
        try:
            og, regions = tile_lowered(og, list(seeds), budget)
        except TileError as exc:
            i = next(k for k, node in enumerate(og.nodes) if node.name in seeds)
            raise _below_floor(og, estimates, i, f"{seeds[og.nodes[i].name] or 'it is activation-bound'}; "
                               f"running it in tiles (image rows or columns) or sequence chunks does not fit "
                               f"either: {exc}", budget) from None
        tiled = {name for record in regions for name in record.region}
        plans = {name: plan for name, plan in plans.items() if name not in tiled}
        estimates = node_estimates(og) if plans else estimates
    split, records = _split_weights(og, plans, estimates, budget) if plans else (og, [])
    return split, records + regions


def _split_weights(og: OpGraph, plans: dict[str, tuple[_Target, str, int]], estimates: list[Estimate],
                   budget: int) -> tuple[OpGraph, list[SplitRecord]]:
    """Rewrite the planned weight splits; pieces still too big get more pieces."""
    for _ in range(8):  # the pieces are sized by the formula itself; this only guards it
        model, records = _rewrite(og, plans)
        split = lower(model, og.input_shapes)
        index = {node.name: k for k, node in enumerate(split.nodes)}
        needs = node_estimates(split)
        grow = [rec for rec in records
                if any(n in index and needs[index[n]].resident_bytes > budget for n in rec.new_nodes)]
        if not grow:
            return split, records
        for rec in grow:
            target, how, pieces = plans[rec.node]
            n, _ = _extent(target, how)
            if pieces >= n:
                at = next(k for k, x in enumerate(og.nodes) if x.name == rec.node)
                raise _below_floor(og, estimates, at, target, budget)
            plans[rec.node] = (target, how, min(n, pieces + max(1, pieces // 4)))
    raise BudgetError(  # pragma: no cover - the formula above sizes pieces exactly
        f"could not size the pieces of {[r.node for r in grow]} to fit {format_bytes(budget)}; "
        "raise the budget a little"
    )


def split_oversized(
    model: ModelLike,
    budget: int | str,
    input_shapes: Mapping[str, Iterable[int]] | None = None,
) -> tuple[onnx.ModelProto, list[SplitRecord]]:
    """Rewrite the nodes that do not fit ``budget`` into exact pieces that do.

    Parameters
    ----------
    model:
        An ``onnx.ModelProto`` (or a path or bytes).
    budget:
        Bytes (or a size string, ``"24MB"``) every piece must fit in with
        its activations and the runtime.
    input_shapes:
        The shapes to estimate at, as for :func:`crowdgraph.compile`.

    Returns
    -------
    model, records:
        The rewritten model and one :class:`SplitRecord` per split node.
        A model whose every node fits comes back as the very same object,
        with ``[]``.

    Raises
    ------
    BudgetError
        A node does not fit even split into one row or column per piece,
        or cannot be split; the message names it, the smallest budget that
        works and, when smaller micro-batches would fit, their size.
    """
    og = lower(model, input_shapes)
    split, records = split_lowered(og, parse_bytes(budget))
    if not records:
        return (model if isinstance(model, onnx.ModelProto) else og.model), []
    return split.model, records


def split_node(
    model: ModelLike,
    node: str,
    how: str,
    pieces: int,
    input_shapes: Mapping[str, Iterable[int]] | None = None,
) -> tuple[onnx.ModelProto, SplitRecord]:
    """Split one node into ``pieces`` pieces ``how`` it is asked, whatever the budget.

    For trying the rewrites out and testing them; :func:`split_oversized`
    picks the way and the number of pieces itself.

    >>> from crowdgraph import zoo
    >>> m, rec = split_node(zoo.distilbert("tiny"), "embeddings.word_embeddings.Gather", "rows", 3)
    >>> rec.pieces, rec.how, len(rec.new_nodes)
    (3, 'rows', 11)
    """
    og = lower(model, input_shapes)
    match = [n for n in og.nodes if n.name == node]
    if not match:
        raise ModelError(f"the model has no computing node named {node!r}")
    target = _target(og, match[0], {t.name: t for t in og.model.graph.initializer})
    if isinstance(target, str):
        raise ModelError(f"node {node!r} ({match[0].op_type}) cannot be split: {target}")
    if how not in _hows(target):
        raise ModelError(f"a {target.op_type} splits by {' or '.join(_hows(target))}, not {how!r}")
    n, _ = _extent(target, how)
    if not 1 <= pieces <= n:
        raise ModelError(f"node {node!r} has {n} {_UNIT[how]}s to split; ask for 1 to {n} pieces, not {pieces}")
    split, (record,) = _rewrite(og, {node: (target, how, pieces)})
    return split, record


def _batch_axis_inputs(proto: onnx.ModelProto) -> list[str]:
    """Inputs whose first dim is not fixed: the ones micro-batching cuts."""
    return [name for name, dims in declared_shapes(proto).items()
            if dims and not (isinstance(dims[0], int) and dims[0] > 0)]


def _normalised(model: ModelLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) and _is_normalised(model) else load_model(model)


def smallest_budget(model: ModelLike, input_shapes: Mapping[str, Iterable[int]] | None = None) -> int:
    """The smallest budget that compiles ``model`` at these shapes, splitting and tiling included.

    Every node must fit on its own after the finest split it allows (one
    row or column per piece), so the floor is set by activations and the
    nodes that do not split.  Where those are image ops that tile
    (:mod:`crowdgraph.tile`), the smallest budget at which their regions'
    tiles fit is found by bisection (to 10 kB) over the tiling plan.
    """
    og = lower(_normalised(model), input_shapes)
    return _smallest(og, node_estimates(og))


def _fits(og: OpGraph, floors: list[int], budget: int) -> bool:
    """Whether every node fits ``budget`` after splitting, tiling included."""
    from .tile import TILEABLE_OPS, TileError, plan_regions
    over = [og.nodes[i] for i, floor in enumerate(floors) if floor > budget]
    if not over:
        return True
    if any(node.op_type not in TILEABLE_OPS for node in over):
        return False
    try:
        plan_regions(og, [node.name for node in over], budget)
    except TileError:
        return False
    return True


def _smallest(og: OpGraph, estimates: list[Estimate]) -> int:
    """The smallest budget at which :func:`_fits` holds: exact where a node's own floor sets it, else to 10 kB.

    Nodes that tile may be over the budget, so the floor lies between the
    largest floor of a node that does not tile and the largest of all.  The
    smallest node floor that fits is found first; when even one byte less
    does not fit, it is the answer; otherwise tiles set the floor below it,
    found by bisection.
    """
    from .tile import TILEABLE_OPS
    floors = _floors(og, estimates)
    low = max((f for node, f in zip(og.nodes, floors) if node.op_type not in TILEABLE_OPS), default=0)
    candidates = sorted({low} | {f for f in floors if f > low})
    if _fits(og, floors, candidates[0]):
        return candidates[0]
    below, at = 0, len(candidates) - 1  # the largest floor always fits
    while at - below > 1:
        mid = (below + at) // 2
        if _fits(og, floors, candidates[mid]):
            at = mid
        else:
            below = mid
    low, high = candidates[below], candidates[at]
    if not _fits(og, floors, high - 1):
        return high
    while high - low > 10_000:
        mid = (low + high) // 2
        if _fits(og, floors, mid):
            high = mid
        else:
            low = mid
    return high


def fitting_microbatch(
    model: ModelLike,
    budget: int | str,
    input_shapes: Mapping[str, Iterable[int]] | None = None,
) -> int | None:
    """The largest micro-batch, in rows, at which every node fits ``budget`` after splitting.

    Rows are counted along axis 0 of the inputs whose first dim is not
    fixed (the batch axis, which ``run(..., microbatch=N)`` cuts); the
    answer is at most the rows ``input_shapes`` gives.  None when not even
    one row fits, or when the model has no batch axis.

    Each candidate is lowered at its shapes.  Activations usually grow in
    proportion to the rows, so the first guess comes from the floors at
    one row and at all rows, and a bisection confirms it.
    """
    proto = _normalised(model)
    budget = parse_bytes(budget)
    shapes = bind_shapes(proto, input_shapes)
    batched = [name for name in _batch_axis_inputs(proto) if shapes.get(name)]
    if not batched:
        return None
    total = max(shapes[name][0] for name in batched)

    def lowered(rows: int) -> tuple[OpGraph, list[int]]:
        at = {name: ((rows,) + shape[1:] if name in batched else shape) for name, shape in shapes.items()}
        og = lower(proto, at)
        return og, _floors(og, node_estimates(og))

    full = lowered(total)
    if _fits(*full, budget):
        return total
    if total == 1:
        return None
    one = lowered(1)
    if not _fits(*one, budget):
        return None
    guess = total - 1
    for low, high in zip(one[1], full[1]):
        if high > budget and high > low:
            guess = min(guess, 1 + int((budget - low) * (total - 1) / (high - low)))
    hints = [guess, guess + 1, guess - 1]
    fits_at, fails_at = 1, total
    while fails_at - fits_at > 1:
        mid = next((h for h in hints if fits_at < h < fails_at), (fits_at + fails_at) // 2)
        if _fits(*lowered(mid), budget):
            fits_at = mid
        else:
            fails_at = mid
    return fits_at


def _below_floor(og: OpGraph, estimates: list[Estimate], i: int, target: _Target | str | None,
                 budget: int) -> BudgetError:
    """The error for a node that fits the budget neither whole nor split."""
    node, est = og.nodes[i], estimates[i]
    floor = _smallest(og, estimates)
    if isinstance(target, _Target):
        need, how = _finest(target)
        _, unit = _extent(target, how)
        weight_floor = _costs(target, how, _extent(target, how)[0])[2]
        message = (
            f"node {node.name!r} ({node.op_type}) cannot be split below one {_UNIT[how]} per piece: "
            f"a piece of one {_UNIT[how]} ({format_bytes(unit)} of weights) needs {format_bytes(need)} "
            f"with its activations and the runtime, above the budget of {format_bytes(budget)}"
        )
    else:
        weight_floor = est.weight_bytes
        message = (
            f"node {node.name!r} ({node.op_type}) needs {format_bytes(est.resident_bytes)} on its own "
            f"(weights {format_bytes(est.weight_bytes)}, activations {format_bytes(est.activation_bytes)}, "
            f"runtime {format_bytes(est.overhead_bytes)}), above the budget of {format_bytes(budget)}, "
            f"and cannot be split: {target}"
        )
    message += (f"; the smallest budget that compiles this model at these shapes, splitting included, "
                f"is {format_bytes(floor)} ({floor} bytes)")
    if weight_floor + _ONE_NODE + _SLACK < budget:  # activations are what does not fit
        rows = fitting_microbatch(og.model, budget, og.input_shapes)
        if rows is not None:
            message += (f"; its activations are what does not fit, and a micro-batch of {rows} rows fits: "
                        f"run(..., microbatch={rows}), compiled at {rows} rows (input_shapes= or sample=)")
        else:
            message += "; not even a micro-batch of one row fits: raise the budget or use shorter inputs"
    else:
        message += "; raise the budget"
    return BudgetError(message)
