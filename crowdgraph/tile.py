"""Spatial tiles: activation-bound image-model nodes become exact row (or column) tiles.

Splitting weights (:mod:`crowdgraph.split`) cannot help a node whose
*activations* are too big: in ResNet-50 at 1x3x224x224 the residual ``Sum``
of two 1x256x56x56 tensors needs 20.9 MB on its own, with no weights at
all.  Convolutions, pooling, normalisation and elementwise ops compute each
output row from a few neighbouring input rows, so such a node can run on a
band of rows at a time, as long as each band reads the *halo* of input rows
its receptive field reaches.

A region, not a node
--------------------
Tiling one node alone does not help: the ``Concat`` that joins its tiles
materialises the whole output again, and a node whose inputs and output
are the same size costs exactly as much as that ``Concat``.  So tiles cover
a *region*: the nodes that do not fit, grown along their edges until every
tensor that enters the region is cheap to slice and every tensor that
leaves it is cheap to join (:func:`grow_region`).  In ResNet-50 a region
runs from the 1x1 convolution that expands to 256 channels to the 1x1
convolution that reduces them again, through the residual sums, so the
large tensors only ever exist as tiles; halos of 3x3 convolutions inside
are paid once per region, not once per node.

For each tile, the rows every region output owns (near-equal bands,
:func:`crowdgraph.split.piece_bounds`) are traced back through the region
(:func:`input_rows`): a convolution or pooling window of extent ``e``,
stride ``s`` and begin pad ``p`` needs input rows ``[a*s - p, (b-1)*s - p +
e)`` for output rows ``[a, b)``, clipped to the tensor; the rows clipped
off become that tile's own pad, so border tiles keep the model's pads and
interior tiles pad 0 on that side.  A ``ConvTranspose`` whose kernel equals
its stride (a U-Net's up-convolution) computes whole strides.  Pointwise
ops (BatchNormalization, Relu, Add of a per-channel constant, LRN), the
residual ``Add``/``Sum`` and a channel ``Concat`` need the rows they make.
The region's inputs are cut with ``Slice`` (halo included), each tile runs
a copy of the region's nodes with its own pads, and each region output is
joined by one ``Concat``.  Every output element is computed from exactly
the inputs it reads in the whole model: the result is exact.

Rows (axis 2) or columns (axis 3) are chosen per region by the bytes that
cross partitions when every tile has its own (the inputs' slices with their
halos plus the outputs), and the fewest tiles that fit are used.

Sequence chunks
---------------
Transformer ops that treat each position on its own run in the same
regions, cut along the sequence: axes are counted from the end, so axis
-2 is an image's rows, a ``(N, S, H)`` tensor's positions and a ``(N,
heads, S, d)`` tensor's query positions alike.  Elementwise ops,
``LayerNormalization`` and ``Softmax`` over a later axis, and a ``MatMul``
(each output row comes from one row of its first input) need exactly the
rows they make: a halo of 0.  An input that broadcasts along the axis (an
attention mask) and a ``MatMul``'s second input (a weight, or attention's
keys and values) are read whole by every chunk (:attr:`Window.whole`) and
do not pull their producers into the region.  The last tile of every
region slices "to the end", so a chunked model runs at any sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Sequence

import networkx as nx
import onnx
from onnx import helper

from .errors import BudgetError, ModelError
from .lower import ModelLike, OpGraph, OpNode, _node_reads, lower
from .partition import ACTIVATION_FACTOR, node_estimates
from .split import (
    _ONE_NODE,
    _SLACK,
    SplitRecord,
    _activation,
    _all_names,
    _attrs,
    _default_opset,
    _Rewriter,
    piece_bounds,
)

__all__ = ["Window", "input_rows", "grow_region", "TileError", "tile_lowered", "tile_nodes"]

#: Ops that make each output element from the input elements at the same
#: position (constants broadcast along the tiled axis).
POINTWISE_OPS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Clip", "Elu", "Selu", "HardSigmoid",
    "HardSwish", "Softplus", "Softsign", "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal",
    "Identity", "Erf", "Cast", "BatchNormalization", "LRN", "Add", "Sub", "Mul", "Div", "Sum",
    "Max", "Min", "Mean", "Pow", "Dropout", "Where", "IsNaN", "IsInf", "Not", "And", "Or", "Xor", "Equal",
    "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Gelu",
})
#: Ops with a sliding window along the spatial axes.
WINDOW_OPS = frozenset({"Conv", "MaxPool", "AveragePool"})
#: Transformer ops that treat every position along the sequence on its own:
#: a softmax or layer normalisation over a later axis, and a MatMul, whose
#: rows (axis -2 of its first input) each make one output row from the
#: whole second input.
SEQUENCE_OPS = frozenset({"MatMul", "Softmax", "LogSoftmax", "LayerNormalization"})
#: Every op a region may hold.
TILEABLE_OPS = POINTWISE_OPS | WINDOW_OPS | SEQUENCE_OPS | {"Concat", "ConvTranspose"}
#: The axes a region can be cut along, counted from the end: an image's rows
#: and columns (NCHW), a transformer's sequence and features (N, S, H) or
#: (N, heads, S, d).
AXES = (-2, -1)
AXIS_NAMES = {-2: "rows", -1: "columns"}
CHUNK_NAMES = {-2: "sequence", -1: "features"}


class TileError(BudgetError):
    """Why a node or region cannot be tiled at a budget (the caller names the node and the floor)."""


@dataclass(frozen=True)
class Window:
    """How one node maps output rows to input rows along the tiled axis.

    ``kind`` is ``"point"`` (the same rows), ``"window"`` (extent, stride,
    begin pad) or ``"upsample"`` (a ConvTranspose whose kernel equals its
    stride: output row ``o`` reads input row ``o // stride``).  Inputs in
    ``whole`` are read whole by every tile: one that broadcasts along the
    axis (an attention mask), or a MatMul's second input.
    """

    kind: str
    extent: int = 1
    stride: int = 1
    pad: int = 0
    whole: frozenset[str] = frozenset()


def input_rows(w: Window, rows: tuple[int, int], size: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Input rows a node reads to make output ``rows``, its pads, and the rows it then makes.

    ``size`` is the input's extent along the axis.  Returns ``(read, pads,
    made)``: the input rows ``[lo, hi)`` clipped to ``[0, size)``, the pads
    ``(begin, end)`` that stand in for the rows clipped off, and the
    output rows computed (``rows`` itself, except for an upsampling node,
    which makes whole strides).

    >>> input_rows(Window("window", extent=3, stride=1, pad=1), (0, 10), 56)   # border tile
    ((0, 11), (1, 0), (0, 10))
    >>> input_rows(Window("window", extent=3, stride=1, pad=1), (10, 20), 56)  # interior tile
    ((9, 21), (0, 0), (10, 20))
    >>> input_rows(Window("window", extent=7, stride=2, pad=3), (50, 112), 224)
    ((97, 224), (0, 2), (50, 112))
    >>> input_rows(Window("upsample", stride=2), (3, 8), 8)
    ((1, 4), (0, 0), (2, 8))
    """
    a, b = rows
    if w.kind == "point":
        return rows, (0, 0), rows
    if w.kind == "upsample":
        lo, hi = a // w.stride, min(size, -(-b // w.stride))
        return (lo, hi), (0, 0), (lo * w.stride, hi * w.stride)
    lo = a * w.stride - w.pad
    hi = (b - 1) * w.stride - w.pad + w.extent
    read = (max(0, lo), min(size, hi))
    return read, (read[0] - lo, hi - read[1]), rows


def _hull(a: tuple[int, int] | None, b: tuple[int, int]) -> tuple[int, int]:
    return b if a is None else (min(a[0], b[0]), max(a[1], b[1]))


# -- what tiles ---------------------------------------------------------------------


class Graph:
    """The plain facts about an op graph that tiling decides on."""

    def __init__(self, og: OpGraph):
        self.og = og
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for node in og.nodes:
            for out in node.outputs:
                self.producer[out] = node.index
            for name in dict.fromkeys(node.inputs):
                if name not in og.constant_bytes:
                    self.consumers.setdefault(name, []).append(node.index)
        self.outputs = set(og.outputs)
        self._windows: dict[tuple[int, int], Window | str] = {}

    def variable_inputs(self, node: OpNode) -> list[str]:
        return [name for name in dict.fromkeys(node.inputs) if name not in self.og.constant_bytes]

    def shape(self, name: str) -> tuple[int, ...] | None:
        info = self.og.tensors.get(name)
        return info.shape if info is not None else None

    def extent(self, name: str, axis: int) -> int:
        """Size of ``name`` along ``axis`` (counted from the end); 1 where it has no such axis."""
        shape = self.shape(name) or ()
        return shape[axis] if len(shape) >= -axis else 1

    def window(self, i: int, axis: int) -> Window | str:
        """How node ``i`` maps rows along ``axis``, or why it cannot be tiled."""
        key = (i, axis)
        if key not in self._windows:
            self._windows[key] = self._window(self.og.nodes[i], axis)
        return self._windows[key]

    def _window(self, node: OpNode, axis: int) -> Window | str:
        proto = self.og.node_protos[node.name]
        op = node.op_type
        if proto.domain not in ("", "ai.onnx") or op not in TILEABLE_OPS:
            return ("crowdgraph tiles convolution, pooling, normalisation, elementwise ops, MatMul, "
                    f"Softmax and LayerNormalization, not {op}")
        if len(node.outputs) != 1:
            return f"its {op} has {len(node.outputs)} outputs in use; only one-output nodes tile"
        out = self.shape(node.outputs[0])
        variables = self.variable_inputs(node)
        if out is None or len(out) < 2 or any(self.shape(x) is None for x in variables):
            return "its tensors are not of known shape with at least two axes"
        at = len(out) + axis  # the axis, counted from the front of the output
        attrs = _attrs(proto)
        if op in POINTWISE_OPS or op in ("Concat", "Softmax", "LogSoftmax", "LayerNormalization"):
            return self._pointwise(node, op, attrs, out, at, axis)
        if op == "MatMul":
            a, b = proto.input[0], proto.input[1]
            if axis != -2 or len(self.shape(a) or ()) < 2 or len(self.shape(b) or ()) < 2:
                return "a MatMul runs in chunks of its first input's rows (axis -2) only"
            if a in self.og.constant_bytes or a == b:
                return "its first input is a constant or also its second; only a variable first input chunks"
            return Window("point", whole=frozenset({b}) - set(self.og.constant_bytes))
        if len(out) != 4 or any(len(self.shape(x)) != 4 for x in variables):  # type: ignore[arg-type]
            return "its tensors are not 4-D images (N, C, H, W)"
        if len(variables) != 1 or variables[0] != node.inputs[0]:
            return f"its {op} reads a variable weight; only the image input may vary"
        a = at - 2
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
            return f"it pads with auto_pad={attrs['auto_pad']!r}; only explicit pads tile"
        kernel = attrs.get("kernel_shape") or (self.shape(node.inputs[1]) or ())[2:]
        if len(kernel) != 2:
            return "only 2-D windows of known size tile"
        if op == "ConvTranspose":
            strides = attrs.get("strides", [1, 1])
            if (kernel[a] != strides[a] or any(attrs.get("pads", [0] * 4))
                    or any(attrs.get("output_padding", [0, 0])) or "output_shape" in attrs
                    or any(d != 1 for d in attrs.get("dilations", [1, 1]))):
                return "only a ConvTranspose whose kernel equals its stride, without pads, tiles"
            return Window("upsample", stride=int(strides[a]))
        if attrs.get("ceil_mode", 0):
            return "it pools with ceil_mode=1"
        stride = attrs.get("strides", [1, 1])[a]
        dilation = attrs.get("dilations", [1, 1])[a]
        pads = attrs.get("pads", [0, 0, 0, 0])
        return Window("window", extent=(int(kernel[a]) - 1) * int(dilation) + 1, stride=int(stride),
                      pad=int(pads[a]))

    def _pointwise(self, node: OpNode, op: str, attrs: dict, out: tuple[int, ...], at: int,
                   axis: int) -> Window | str:
        """Ops that make each row from the same row of their inputs, when they do along ``axis``."""
        if op in ("BatchNormalization", "LRN") and (len(out) != 4 or at < 2):
            return "it normalises per channel; only the rows or columns of a 4-D image tile"
        if op == "BatchNormalization" and (attrs.get("spatial", 1) != 1 or attrs.get("training_mode", 0)):
            return "it normalises per position or in training mode"
        if op == "Concat" and int(attrs.get("axis", 0)) % len(out) == at:
            return "it concatenates along the tiled axis"
        if op in ("Softmax", "LogSoftmax", "LayerNormalization"):
            default = -1 if op == "LayerNormalization" or _default_opset(self.og.model) >= 13 else 1
            if int(attrs.get("axis", default)) % len(out) <= at:
                return f"its {op} runs over the tiled axis; it chunks only along an earlier one"
        whole = set()
        for x in self.variable_inputs(node):
            if self.extent(x, axis) == out[at]:
                continue
            if self.extent(x, axis) != 1 or op in ("Concat", "LayerNormalization"):
                return f"its input {x!r} does not line up with its output along the tiled axis"
            whole.add(x)
        if op not in ("BatchNormalization", "LRN", "LayerNormalization", "Concat"):
            for c in node.inputs:
                shape = self.shape(c)
                if c in self.og.constant_bytes and (shape is None or (len(shape) >= -axis and shape[axis] != 1)):
                    return f"its constant {c!r} varies along the tiled axis"
        return Window("point", whole=frozenset(whole))


def grow_region(graph: Graph, seeds: Iterable[int], axis: int, budget: int) -> set[int]:
    """The seeds plus the neighbours needed so that slicing in and joining out fit ``budget``.

    A tensor entering the region is read whole by one ``Slice`` per tile;
    a tensor leaving it is made whole again by a ``Concat`` that holds its
    tiles and its output.  Where that does not fit, the node on the other
    side joins the region, until every edge of the region fits.  Raises
    :class:`TileError` when such a node cannot be tiled.
    """
    og = graph.og
    region = set(seeds)
    for i in region:
        window = graph.window(i, axis)
        if isinstance(window, str):
            raise TileError(window)
    grown = True
    while grown:
        grown = False
        for i in sorted(region):
            node = og.nodes[i]
            out = node.outputs[0]
            outside = [c for c in graph.consumers.get(out, []) if c not in region]
            if (outside or out in graph.outputs) and _join_cost(og.nbytes(out)) > budget:
                if out in graph.outputs:
                    raise TileError(f"the model output {out!r} ({og.nbytes(out) / 1e6:.1f} MB) "
                                    "does not fit whole in the budget")
                grown |= _take(graph, region, outside, axis, f"it reads {out!r}")
            window = graph.window(i, axis)
            for x in graph.variable_inputs(node):
                p = graph.producer.get(x)
                if x in window.whole:  # type: ignore[union-attr]
                    continue  # every tile reads it as it is: no Slice to pay for
                if (p is None or p not in region) and _cut_cost(og.nbytes(x)) > budget:
                    if p is None:
                        raise TileError(f"the model input {x!r} ({og.nbytes(x) / 1e6:.1f} MB) "
                                        "does not fit whole in the budget")
                    grown |= _take(graph, region, [p], axis, f"it makes {x!r}")
    return region


def _take(graph: Graph, region: set[int], nodes: Sequence[int], axis: int, why: str) -> bool:
    for c in nodes:
        window = graph.window(c, axis)
        if isinstance(window, str):
            node = graph.og.nodes[c]
            raise TileError(f"node {node.name!r} ({node.op_type}) would have to join a tiled region "
                            f"({why}, too big to pass whole) but cannot be tiled: {window}")
        region.add(c)
    return bool(nodes)


def _join_cost(nbytes: int) -> int:
    """A Concat that makes a tensor of ``nbytes`` from its tiles."""
    return _ONE_NODE + _SLACK + int(ACTIVATION_FACTOR * 3 * nbytes)


def _cut_cost(nbytes: int) -> int:
    """The least a Slice reading a tensor of ``nbytes`` whole can need."""
    return _ONE_NODE + _SLACK + int(ACTIVATION_FACTOR * nbytes)


def _components(graph: Graph, region: set[int]) -> list[list[int]]:
    """The region's parts connected by tensors, each in node order."""
    parts = nx.utils.UnionFind(region)
    for i in region:
        for x in graph.variable_inputs(graph.og.nodes[i]):
            if graph.producer.get(x) in region:
                parts.union(i, graph.producer[x])
    return sorted(sorted(part) for part in parts.to_sets())


@dataclass(frozen=True)
class Region:
    """A set of nodes tiled together, and how."""

    nodes: tuple[int, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    axis: int
    tiles: int


def _region(graph: Graph, nodes: Sequence[int], axis: int, tiles: int) -> Region:
    inside = set(nodes)
    made = {graph.og.nodes[i].outputs[0] for i in nodes}
    inputs = tuple(dict.fromkeys(x for i in nodes for x in graph.variable_inputs(graph.og.nodes[i]) if x not in made))
    outputs = tuple(
        graph.og.nodes[i].outputs[0] for i in nodes
        if graph.og.nodes[i].outputs[0] in graph.outputs
        or any(c not in inside for c in graph.consumers.get(graph.og.nodes[i].outputs[0], [])))
    return Region(tuple(nodes), inputs, outputs, axis, tiles)


@dataclass
class _Tile:
    """One tile of a region: the rows every tensor is needed, read and made at."""

    need: dict[str, tuple[int, int]]
    reads: dict[int, dict[str, tuple[int, int]]]
    pads: dict[int, tuple[int, int]]
    made: dict[str, tuple[int, int]]
    own: dict[str, tuple[int, int]]


def _tiles(graph: Graph, region: Region) -> list[_Tile] | None:
    """Trace each tile's output bands back through the region; None if a band would be empty."""
    axis = region.axis
    extent = {name: graph.extent(name, axis) for name in region.outputs}
    if region.tiles > min(extent.values()):
        return None
    bands = {name: piece_bounds(n, region.tiles) for name, n in extent.items()}
    result = []
    for k in range(region.tiles):
        own = {name: bands[name][k] for name in region.outputs}
        need: dict[str, tuple[int, int]] = dict(own)
        reads: dict[int, dict[str, tuple[int, int]]] = {}
        pads: dict[int, tuple[int, int]] = {}
        made: dict[str, tuple[int, int]] = {}
        for i in reversed(region.nodes):
            node = graph.og.nodes[i]
            y = node.outputs[0]
            rows = need[y]
            window = graph.window(i, axis)
            assert isinstance(window, Window)
            reads[i] = {}
            for x in graph.variable_inputs(node):
                size = graph.extent(x, axis)
                if x in window.whole:
                    read, pad, out_rows = (0, size), (0, 0), rows
                else:
                    read, pad, out_rows = input_rows(window, rows, size)
                if read[0] >= read[1]:
                    return None
                reads[i][x] = read
                need[x] = _hull(need.get(x), read)
                pads[i], made[y] = pad, out_rows
        result.append(_Tile(need, reads, pads, made, own))
    return result


def _row_bytes(graph: Graph, name: str, axis: int) -> int:
    return graph.og.nbytes(name) // max(1, graph.extent(name, axis))


def _cost(graph: Graph, region: Region, tiles: list[_Tile]) -> tuple[int, int]:
    """The largest need of any node the tiling makes, and the bytes crossing partitions.

    Crossing bytes assume every tile in its own partition: each gets its
    inputs' slices (with their halos) and hands on its output bands.
    """
    og, axis = graph.og, region.axis

    def size(name: str, rows: tuple[int, int]) -> int:
        return (rows[1] - rows[0]) * _row_bytes(graph, name, axis)

    base = _ONE_NODE + _SLACK
    largest = max(_join_cost(og.nbytes(y)) for y in region.outputs)  # the Concats
    crossing = 0
    for t in tiles:
        for x in region.inputs:
            largest = max(largest, base + _activation(og.nbytes(x), size(x, t.need[x])))
            crossing += size(x, t.need[x])
        for y in region.outputs:
            crossing += size(y, t.own[y])
        for i in region.nodes:
            node = og.nodes[i]
            y = node.outputs[0]
            have = {x: t.made.get(x, t.need[x]) for x in t.reads[i]}
            for x, rows in t.reads[i].items():
                if have[x] != rows:  # a Slice of the tile the producer made
                    largest = max(largest, base + _activation(size(x, have[x]), size(x, rows)))
            weights = sum(og.constant_bytes.get(c, 0) for c in node.constants)
            reads = sum(size(x, rows) for x, rows in t.reads[i].items())
            largest = max(largest, base + weights + _activation(reads, size(y, t.made[y])))
    return largest, crossing


def _choose(graph: Graph, nodes: Sequence[int], budget: int) -> Region | None:
    """Rows or columns and the fewest tiles that fit: least crossing bytes, then fewest tiles."""
    options = []
    for axis in AXES:
        if any(isinstance(graph.window(i, axis), str) for i in nodes):
            continue
        cap = min(graph.extent(graph.og.nodes[i].outputs[0], axis) for i in nodes)

        def fits(tiles: int) -> tuple[int, int] | None:
            region = _region(graph, nodes, axis, tiles)
            plan = _tiles(graph, region)
            if plan is None:
                return None
            need, crossing = _cost(graph, region, plan)
            return (crossing, tiles) if need <= budget else None

        if cap < 2 or fits(cap) is None:
            continue
        low, high = 1, cap  # needs fall as tiles grow: bisect
        while high - low > 1:
            mid = (low + high) // 2
            if fits(mid) is not None:
                high = mid
            else:
                low = mid
        crossing, tiles = fits(high)  # type: ignore[misc]
        options.append((crossing, tiles, axis))
    if not options:
        return None
    _, tiles, axis = min(options)
    return _region(graph, nodes, axis, tiles)


def plan_regions(og: OpGraph, seeds: Sequence[str], budget: int) -> list[Region]:
    """The tiled regions that make the ``seeds`` (node names) fit ``budget``.

    Raises :class:`TileError` saying why when they cannot.
    """
    graph = Graph(og)
    index = {node.name: node.index for node in og.nodes}
    errors = []
    for axis in AXES:
        try:
            region = grow_region(graph, [index[s] for s in seeds], axis, budget)
        except TileError as exc:
            errors.append(str(exc))
            continue
        chosen = [_choose(graph, part, budget) for part in _components(graph, region)]
        if all(chosen):
            return chosen  # type: ignore[return-value]
        errors.append(f"even one position along axis {axis} per tile does not fit the budget")
    raise TileError(errors[0])


# -- rewriting -----------------------------------------------------------------------


def _set_pads(proto: onnx.NodeProto, axis: int, pads: tuple[int, int]) -> None:
    attrs = _attrs(proto)
    values = list(attrs.get("pads", [0, 0, 0, 0]))
    values[axis + 2], values[axis + 4] = pads  # axis -2 or -1 of a 4-D image
    keep = [a for a in proto.attribute if a.name not in ("pads", "auto_pad")]
    del proto.attribute[:]
    proto.attribute.extend(keep)
    proto.attribute.append(helper.make_attribute("pads", values))


def _front(graph: Graph, name: str, axis: int) -> int:
    """``axis`` counted from the front of ``name``'s shape, as every opset's Slice and Concat take it."""
    return len(graph.shape(name)) + axis  # type: ignore[arg-type]


#: A Slice end past every tensor: "to the end".
_TO_END = 2**63 - 1


def _slice(r: _Rewriter, graph: Graph, name: str, rows: tuple[int, int], have: tuple[int, int], axis: int,
           what: str, tile: str | None = None) -> str:
    """Slice ``rows`` of tensor ``name`` out of ``tile`` (its rows ``have``; the tensor itself by default).

    A slice that reaches the end of the tensor slices "to the end", so the
    last tile takes whatever is left: a model chunked along its sequence
    still runs, exactly, at any other sequence length.
    """
    stop = _TO_END if rows[1] >= graph.extent(name, axis) else rows[1] - have[0]
    return r.slice(tile or name, rows[0] - have[0], stop, _front(graph, name, axis), what)


def _how(graph: Graph, region: Region) -> str:
    """What a region's tiles are called: rows or columns of an image, or chunks of a sequence.

    A region of 4-D image ops runs in tiles by ``rows`` or ``columns``; one
    that holds a transformer op, or tensors of another rank, runs in chunks
    by ``sequence`` (axis -2: positions) or ``features`` (axis -1).
    """
    og = graph.og
    image = all(og.nodes[i].op_type not in SEQUENCE_OPS and len(graph.shape(og.nodes[i].outputs[0]) or ()) == 4
                for i in region.nodes)
    return (AXIS_NAMES if image else CHUNK_NAMES)[region.axis]


def _rewrite_region(r: _Rewriter, graph: Graph, region: Region) -> list[tuple[onnx.NodeProto, int]]:
    """The nodes that replace ``region``, each with the tile it belongs to (``tiles`` for the joins)."""
    og, axis = graph.og, region.axis
    emitted: list[tuple[onnx.NodeProto, int]] = []
    parts: dict[str, list[str]] = {y: [] for y in region.outputs}
    for k, t in enumerate(_tiles(graph, region) or []):
        start = len(r.nodes)
        name: dict[str, tuple[str, tuple[int, int]]] = {}  # tensor -> (its tile, rows it covers)
        for x in region.inputs:
            lo, hi = t.need[x]
            whole = (lo, hi) == (0, graph.extent(x, axis))
            name[x] = (x if whole else _slice(r, graph, x, (lo, hi), (0, 0), axis, f"tile{k}/{x}.Slice"), t.need[x])
        for i in region.nodes:
            node = og.nodes[i]
            proto = og.node_protos[node.name]
            inputs = []
            for x in proto.input:
                if x not in t.reads[i]:
                    inputs.append(x)
                    continue
                tile_x, have = name[x]
                want = t.reads[i][x]
                if want != have:
                    tile_x = _slice(r, graph, x, want, have, axis, f"tile{k}/{x}.Slice", tile_x)
                inputs.append(tile_x)
            copy = onnx.NodeProto()
            copy.CopyFrom(proto)
            y = node.outputs[0]
            out = r.fresh(f"{r.prefix}/tile{k}/{y}")
            del copy.input[:]
            copy.input.extend(inputs)
            del copy.output[:]
            copy.output.append(out)
            copy.name = r.fresh(f"{r.prefix}/tile{k}/{node.name}")
            if node.op_type in WINDOW_OPS:
                _set_pads(copy, axis, t.pads[i])
            r.nodes.append(copy)
            name[y] = (out, t.made[y])
            if y in parts:
                own, have = t.own[y], t.made[y]
                parts[y].append(out if own == have else
                                _slice(r, graph, y, own, have, axis, f"tile{k}/{y}.own", out))
        emitted.extend((n, k) for n in r.nodes[start:])
    start = len(r.nodes)
    for y in region.outputs:
        r.node("Concat", parts[y], f"{y}.Concat", output=y, axis=_front(graph, y, axis))
    emitted.extend((n, region.tiles) for n in r.nodes[start:])
    return emitted


def _ordered(keyed: list[tuple[tuple, onnx.NodeProto]]) -> list[onnx.NodeProto]:
    """A topological order that takes the smallest key among the ready nodes.

    Keys put each tile's nodes together, so that the partitioner, which
    cuts contiguous runs, keeps a tile's chain in one partition.
    """
    producers = {out: k for k, (_, proto) in enumerate(keyed) for out in proto.output}
    deps = nx.DiGraph()
    deps.add_nodes_from(range(len(keyed)))
    deps.add_edges_from((producers[name], k) for k, (_, proto) in enumerate(keyed)
                        for name in _node_reads(proto) if name in producers)
    return [keyed[k][1] for k in nx.lexicographical_topological_sort(deps, key=lambda k: keyed[k][0])]


def rewrite(og: OpGraph, regions: Sequence[Region]) -> tuple[onnx.ModelProto, list[SplitRecord]]:
    """A copy of ``og.model`` with every region replaced by its tiles, and their records."""
    source = og.model
    used = _all_names(source)
    graph = Graph(og)
    replaced: dict[str, tuple[int, list[tuple[onnx.NodeProto, int]]]] = {}
    records = []
    inits: list[onnx.TensorProto] = []
    for number, region in enumerate(regions):
        names = [og.nodes[i].name for i in region.nodes]
        r = _Rewriter(used, f"{names[0]}/tiles", _default_opset(source))
        emitted = _rewrite_region(r, graph, region)
        inits.extend(r.inits)
        replaced[names[0]] = (number, emitted)
        for n in names[1:]:
            replaced[n] = (number, [])
        weights = max(sum(og.constant_bytes.get(c, 0) for c in og.nodes[i].constants) for i in region.nodes)
        records.append(SplitRecord(
            node=names[0], op_type="region", how=_how(graph, region), pieces=region.tiles,
            new_nodes=tuple(n.name for n, _ in emitted), weight="", piece_weight_bytes=weights,
            region=tuple(names)))
    keyed = []
    for position, proto in enumerate(source.graph.node):
        if proto.name not in replaced:
            keyed.append(((position, 0, 0), proto))
            continue
        for seq, (node, tile) in enumerate(replaced[proto.name][1]):
            keyed.append(((position, tile + 1, seq), node))
    model = onnx.ModelProto()
    model.CopyFrom(source)
    del model.graph.node[:]
    model.graph.node.extend(_ordered(keyed))
    model.graph.initializer.extend(inits)
    return model, records


def tile_lowered(og: OpGraph, seeds: Sequence[str], budget: int) -> tuple[OpGraph, list[SplitRecord]]:
    """Tile the regions that make the nodes named ``seeds`` fit ``budget``; the lowered result and records.

    Tile counts come from the estimate formula itself; the lowered result
    is checked node by node and a region whose nodes still do not fit
    gets more tiles (a guard, as for weight pieces).
    """
    regions = plan_regions(og, seeds, budget)
    graph = Graph(og)
    for _ in range(8):
        model, records = rewrite(og, regions)
        tiled = lower(model, og.input_shapes)
        index = {node.name: k for k, node in enumerate(tiled.nodes)}
        needs = node_estimates(tiled)
        grow = [k for k, rec in enumerate(records)
                if any(n in index and needs[index[n]].resident_bytes > budget for n in rec.new_nodes)]
        if not grow:
            return tiled, records
        for k in grow:
            more = replace(regions[k], tiles=regions[k].tiles + max(1, regions[k].tiles // 4))
            if _tiles(graph, more) is None:
                raise TileError(f"the region from node {records[k].node!r} does not fit even in "
                                f"{regions[k].tiles} tiles")
            regions[k] = more
    raise TileError("could not size the tiles to fit the budget; raise the budget a little")  # pragma: no cover


def tile_nodes(model: ModelLike, nodes: Sequence[str], axis: int, tiles: int,
               input_shapes: Mapping[str, Iterable[int]] | None = None) -> tuple[onnx.ModelProto, SplitRecord]:
    """Tile the named nodes as one region, ``tiles`` tiles along ``axis``, whatever the budget.

    For trying the rewrite out and testing it; :func:`crowdgraph.compile`
    picks regions, the axis and the number of tiles itself.  Returns the
    rewritten model and its :class:`~crowdgraph.split.SplitRecord`.
    """
    og = lower(model, input_shapes)
    graph = Graph(og)
    index = {node.name: node.index for node in og.nodes}
    missing = [n for n in nodes if n not in index]
    if missing:
        raise ModelError(f"the model has no computing nodes named {missing}")
    if axis in (2, 3):
        axis -= 4  # an image's rows and columns, counted from the front
    if axis not in AXES:
        raise ModelError(f"tiles run along axis -2 (rows, the sequence) or -1 (columns, features), not {axis}")
    for n in nodes:
        window = graph.window(index[n], axis)
        if isinstance(window, str):
            raise ModelError(f"node {n!r} cannot be tiled: {window}")
    region = _region(graph, sorted(index[n] for n in nodes), axis, tiles)
    if tiles < 1 or _tiles(graph, region) is None:
        raise ModelError(f"cannot cut the region's outputs into {tiles} tiles of at least one "
                         f"position along axis {axis}; ask for fewer")
    tiled, (record,) = rewrite(og, [region])
    return tiled, record
