"""Lowering: an ONNX model -> an op graph whose every tensor has a size.

This is stage 1 of crowdgraph's flow.  The partitioner needs to know, for
every node, which weights it reads and how many bytes each tensor it makes
or reads takes *at the shapes of the run*.  So lowering

1. reads the model (a path, including weights in external data files next
   to it, raw bytes, or an ``onnx.ModelProto``), checks it and brings old
   IR versions up to date (initializers no longer listed as inputs);
2. binds the symbolic input dims to concrete shapes and runs ONNX shape
   inference with data propagation; tensors whose shape is still unknown
   are measured by one onnxruntime run of the whole model on zero inputs
   with those tensors added as outputs;
3. separates *constant* tensors (initializers and whatever Constant,
   ConstantOfShape, Identity or shape arithmetic builds from constants
   alone) from the computing nodes.  Constants are never sent between
   partitions: every partition that reads one gets its own copy of the
   nodes that build it, and counts it as weights at its built size.

The result, :class:`OpGraph`, is plain data that :mod:`crowdgraph.partition`
cuts without touching onnx again except to assemble the partition models.
"""

from __future__ import annotations

import copy
import math
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Union

import numpy as np
import onnx
from onnx import helper

from .errors import InputError, ModelError

ModelLike = Union[str, os.PathLike, bytes, onnx.ModelProto]

#: Ops whose output is fixed once their inputs are constants.  Random ops
#: are left out on purpose: copying them into several partitions would
#: draw different numbers in each.
CONSTANT_FOLDABLE_OPS = frozenset({
    "Constant", "ConstantOfShape", "Identity", "Shape", "Size", "Gather",
    "Concat", "Reshape", "Unsqueeze", "Squeeze", "Cast", "Slice", "Range",
    "Add", "Sub", "Mul", "Div", "Neg", "Equal", "Where", "Expand", "Transpose",
    "Sqrt", "Pow", "Max", "Min", "Flatten", "Not", "Less", "Greater",
})


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of the lowered model at the concrete shapes of the run."""

    name: str
    elem_type: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes (strings count 64 bytes an element)."""
        return tensor_nbytes(self.elem_type, self.shape)


@dataclass(frozen=True)
class OpNode:
    """One computing node: what it reads, what it makes, which weights it uses.

    ``inputs`` includes the outer-scope names that the bodies of If, Loop
    and Scan nodes read, so the partitioner sees every real dependency.
    ``constants`` are the constant tensors (initializers or folded
    constants) among them.
    """

    index: int
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    constants: frozenset[str]


@dataclass
class OpGraph:
    """The lowered model: computing nodes in topological order, with sizes.

    Attributes
    ----------
    model:
        The normalised source model (unique node names, IR >= 4).
    nodes:
        Computing nodes in a topological order.
    tensors:
        Every tensor with a known concrete shape, by name.
    constant_bytes:
        For each constant tensor, the bytes it takes once built.
    constant_sources:
        For each constant tensor, the initializers and constant nodes
        (by name, in model order) needed to build it in a partition.
    inputs, outputs:
        Names of the model's graph inputs (initializers excluded) and outputs.
    input_shapes:
        The concrete shapes lowering used.
    """

    model: onnx.ModelProto
    nodes: list[OpNode]
    tensors: dict[str, TensorInfo]
    constant_bytes: dict[str, int]
    constant_sources: dict[str, tuple[frozenset[str], tuple[str, ...]]]
    inputs: list[str]
    outputs: list[str]
    input_shapes: dict[str, tuple[int, ...]]
    node_protos: dict[str, onnx.NodeProto] = field(repr=False, default_factory=dict)

    def nbytes(self, tensor: str) -> int:
        """Bytes of ``tensor`` at the lowered shapes (0 if unknown)."""
        info = self.tensors.get(tensor)
        return info.nbytes if info is not None else 0


def tensor_nbytes(elem_type: int, shape: Iterable[int]) -> int:
    """Bytes of a tensor of ONNX element type ``elem_type`` and ``shape``.

    >>> tensor_nbytes(onnx.TensorProto.FLOAT, (8, 128, 768))
    3145728
    >>> tensor_nbytes(onnx.TensorProto.INT64, ())
    8
    """
    count = math.prod(shape)
    if elem_type == onnx.TensorProto.STRING:
        return count * 64
    return count * _itemsize(elem_type)


def _itemsize(elem_type: int) -> int:
    if elem_type in (onnx.TensorProto.BFLOAT16,):
        return 2
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 4


def load_model(model: ModelLike) -> onnx.ModelProto:
    """Read and check a model given as a path, bytes or a ModelProto.

    Weights stored in external data files next to a model file are read
    too.  Models older than IR version 4 are brought up to it (their
    initializers are no longer listed as graph inputs); nothing is refused
    for being old.  Raises :class:`ModelError` saying what is wrong.
    """
    if isinstance(model, onnx.ModelProto):
        proto = copy.deepcopy(model)
    elif isinstance(model, (bytes, bytearray, memoryview)):
        proto = _parse(bytes(model), "the given bytes")
    elif isinstance(model, (str, os.PathLike)):
        path = pathlib.Path(model)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}; pass the path of an .onnx file")
        proto = _parse(path.read_bytes(), str(path))
        try:
            onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"{path}: cannot read the weights in its external data files ({exc}); "
                "keep the .data files next to the .onnx file"
            ) from exc
    else:
        raise ModelError(
            f"cannot read a model from {type(model).__name__}; pass a path, bytes "
            "or an onnx.ModelProto"
        )
    if not proto.graph.node:
        raise ModelError("the model has no nodes; is it an ONNX model?")
    _normalise(proto)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise ModelError(f"the model is not valid ONNX: {first}") from exc
    return proto


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # protobuf raises its own DecodeError
        raise ModelError(f"{where} is not an ONNX model: cannot parse it ({exc})") from exc
    if not proto.HasField("graph"):
        raise ModelError(f"{where} is not an ONNX model: it has no graph")
    return proto


def _normalise(proto: onnx.ModelProto) -> None:
    """IR >= 4, initializers not listed as inputs, unique node names."""
    graph = proto.graph
    if proto.ir_version < 4:
        proto.ir_version = 4
        inits = {i.name for i in graph.initializer}
        keep = [i for i in graph.input if i.name not in inits]
        del graph.input[:]
        graph.input.extend(keep)
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
            while node.name in seen:
                node.name += "_"
        seen.add(node.name)


def graph_input_names(proto: onnx.ModelProto) -> list[str]:
    """Names of the graph inputs a caller feeds (initializers excluded)."""
    inits = {i.name for i in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in inits]


def declared_shapes(proto: onnx.ModelProto) -> dict[str, tuple[int | str | None, ...]]:
    """The declared input shapes: ints, symbolic names, or None for unknown."""
    result = {}
    names = set(graph_input_names(proto))
    for vi in proto.graph.input:
        if vi.name in names:
            dims = vi.type.tensor_type.shape.dim
            result[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims
            )
    return result


def bind_shapes(
    proto: onnx.ModelProto,
    input_shapes: Mapping[str, Iterable[int]] | None = None,
    default_dim: int = 1,
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every model input.

    Shapes given in ``input_shapes`` win; elsewhere symbolic dims take the
    value the same symbol has in a given shape (so ``sequence`` bound by
    ``input_ids`` binds ``attention_mask`` too), else ``default_dim``.
    Unknown names and wrong ranks raise :class:`InputError`.

    >>> m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])],
    ...     "g", [helper.make_tensor_value_info("x", 1, ["batch", 4])],
    ...     [helper.make_tensor_value_info("y", 1, ["batch", 4])]))
    >>> bind_shapes(m, {"x": (8, 4)})
    {'x': (8, 4)}
    >>> bind_shapes(m)
    {'x': (1, 4)}
    """
    declared = declared_shapes(proto)
    given = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise InputError(
            f"input_shapes names {unknown}, which the model does not have; "
            f"its inputs are {sorted(declared)}"
        )
    symbols: dict[str, int] = {}
    for name, shape in given.items():
        dims = declared[name]
        if len(dims) != len(shape):
            raise InputError(
                f"input {name!r} has rank {len(dims)} (shape {_show(dims)}) but "
                f"input_shapes gives rank {len(shape)} {shape}; give one size per dim"
            )
        for want, got in zip(dims, shape):
            if isinstance(want, int) and want > 0 and want != got:
                raise InputError(
                    f"input {name!r} has fixed shape {_show(dims)} but input_shapes gives "
                    f"{shape}; only symbolic dims can change"
                )
            if isinstance(want, str):
                symbols.setdefault(want, got)
    bound = {}
    for name, dims in declared.items():
        if name in given:
            bound[name] = given[name]
        else:
            bound[name] = tuple(_dim_value(d, symbols, default_dim) for d in dims)
    return bound


def _dim_value(dim: Any, symbols: Mapping[str, int], default_dim: int) -> int:
    """A declared dim's size: fixed, bound by name, a sum of those, or ``default_dim``.

    Exporters name a decoder's mask and cache dims as sums
    (``past_sequence + sequence``, ``past_sequence_length + 1``); each term
    takes its own value, so the mask agrees with the cache it masks.

    >>> _dim_value("past_sequence + sequence", {"sequence": 8}, 1)
    9
    >>> _dim_value("past_sequence_length + 1", {}, 1), _dim_value(4, {}, 1), _dim_value(None, {}, 1)
    (2, 4, 1)
    """
    if isinstance(dim, int) and dim > 0:
        return dim
    if dim in symbols:
        return symbols[dim]
    if isinstance(dim, str) and "+" in dim:
        terms = [term.strip() for term in dim.split("+")]
        return sum(int(term) if term.isdigit() else symbols.get(term, default_dim) for term in terms)
    return default_dim


def _show(dims: Iterable[Any]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def lower(
    model: ModelLike,
    input_shapes: Mapping[str, Iterable[int]] | None = None,
) -> OpGraph:
    """Lower ``model`` at concrete input shapes into an :class:`OpGraph`."""
    proto = model if isinstance(model, onnx.ModelProto) and _is_normalised(model) else load_model(model)
    shapes = bind_shapes(proto, input_shapes)
    tensors = _infer_concrete(proto, shapes)
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    protos = {n.name: n for n in graph.node}

    # Constant folding by reachability: a node is constant when every input
    # (outer-scope names included) is constant and its op is deterministic.
    constant_bytes = {name: tensor_nbytes(t.data_type, t.dims) for name, t in inits.items()}
    constant_sources: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
        name: (frozenset({name}), ()) for name in inits
    }
    order = _topological(graph)
    nodes: list[OpNode] = []
    for node in order:
        reads = _node_reads(node)
        if node.op_type in CONSTANT_FOLDABLE_OPS and not node.domain and all(r in constant_bytes for r in reads):
            init_names: set[str] = set()
            const_nodes: list[str] = []
            for r in reads:
                i_names, n_names = constant_sources[r]
                init_names |= i_names
                const_nodes.extend(n for n in n_names if n not in const_nodes)
            const_nodes.append(node.name)
            for out in node.output:
                if out:
                    constant_bytes[out] = tensors[out].nbytes if out in tensors else 0
                    constant_sources[out] = (frozenset(init_names), tuple(const_nodes))
            continue
        nodes.append(OpNode(
            index=len(nodes),
            name=node.name,
            op_type=node.op_type,
            inputs=reads,
            outputs=tuple(o for o in node.output if o),
            constants=frozenset(r for r in reads if r in constant_bytes),
        ))
    if not nodes:
        raise ModelError("every node of the model is constant; there is nothing to partition")
    return OpGraph(
        model=proto,
        nodes=nodes,
        tensors=tensors,
        constant_bytes=constant_bytes,
        constant_sources=constant_sources,
        inputs=graph_input_names(proto),
        outputs=[o.name for o in graph.output],
        input_shapes=shapes,
        node_protos=protos,
    )


def _is_normalised(proto: onnx.ModelProto) -> bool:
    names = [n.name for n in proto.graph.node]
    return proto.ir_version >= 4 and all(names) and len(set(names)) == len(names)


def _node_reads(node: onnx.NodeProto) -> tuple[str, ...]:
    """Inputs of ``node`` plus the outer-scope names its subgraphs read."""
    reads = [i for i in node.input if i]
    for name in sorted(outer_scope_names(node)):
        if name not in reads:
            reads.append(name)
    return tuple(reads)


def outer_scope_names(node: onnx.NodeProto) -> set[str]:
    """Names that the subgraphs (If/Loop/Scan bodies) of ``node`` read from outside."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for sub in graphs:
            names |= _free_names(sub)
    return names


def _free_names(graph: onnx.GraphProto) -> set[str]:
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    defined |= {i.name for i in graph.sparse_initializer}
    free: set[str] = set()
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                free.add(name)
        for name in outer_scope_names(node):
            if name not in defined:
                free.add(name)
        defined.update(o for o in node.output if o)
    return free


def _topological(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes in a topological order (the model's own order when it is one)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(r in available for r in _node_reads(node)):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({r for n in rest for r in _node_reads(n) if r not in available})
            raise ModelError(
                f"the model's graph has a cycle or reads undefined tensors {missing[:5]} "
                f"(first at node {rest[0].name!r}); check the model with onnx.checker"
            )
        pending = rest
    return ordered


def _infer_concrete(proto: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, TensorInfo]:
    """Shape and dtype of every tensor at the bound input shapes."""
    bound = skeleton(proto)
    for vi in bound.graph.input:
        if vi.name in shapes:
            shape = vi.type.tensor_type.shape
            for dim, size in zip(shape.dim, shapes[vi.name]):
                dim.Clear()
                dim.dim_value = size
    try:
        inferred = onnx.shape_inference.infer_shapes(bound, strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx raises several types here
        raise ModelError(f"shape inference failed on the model: {exc}") from exc
    infos: dict[str, TensorInfo] = {}
    graph = inferred.graph
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        info = _concrete_info(vi)
        if info is not None:
            infos[vi.name] = info
    for init in graph.initializer:
        infos[init.name] = TensorInfo(init.name, init.data_type, tuple(init.dims))
    missing = [o for n in graph.node for o in n.output if o and o not in infos]
    if missing:
        infos.update(_measure(proto, shapes, missing, inferred))
    return infos


def skeleton(proto: onnx.ModelProto, keep_bytes: int = 1024) -> onnx.ModelProto:
    """A copy of ``proto`` without the values of initializers above ``keep_bytes``.

    Shape inference needs the shapes of weights, not their values (small
    integer initializers, which may be shapes, are kept), and runs far
    faster on a model that is not hundreds of megabytes.  The large values
    are never copied, so this costs a fraction of copying the model.

    >>> from onnx import numpy_helper
    >>> x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 512])
    >>> big = numpy_helper.from_array(np.ones((512, 512), np.float32), "w")
    >>> shape = helper.make_tensor("s", onnx.TensorProto.INT64, [2], [2, 512])
    >>> graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [], [big, shape])
    >>> light = skeleton(helper.make_model(graph))
    >>> [(t.name, list(t.dims), len(t.raw_data), list(t.int64_data)) for t in light.graph.initializer]
    [('w', [512, 512], 0, []), ('s', [2], 0, [2, 512])]
    """
    light = onnx.ModelProto()
    _copy_fields(proto, light, skip=("graph",))
    _copy_fields(proto.graph, light.graph, skip=("initializer",))
    for init in proto.graph.initializer:
        if tensor_nbytes(init.data_type, init.dims) > keep_bytes:
            shell = light.graph.initializer.add()
            shell.name, shell.data_type = init.name, init.data_type
            shell.dims.extend(init.dims)
        else:
            light.graph.initializer.add().CopyFrom(init)
    return light


def _copy_fields(source: Any, target: Any, skip: tuple[str, ...] = ()) -> None:
    """Copy the set fields of protobuf message ``source`` into ``target``, but those named in ``skip``."""
    from google.protobuf.message import Message

    for descriptor, value in source.ListFields():
        if descriptor.name in skip:
            continue
        if isinstance(value, Message):
            getattr(target, descriptor.name).CopyFrom(value)
        elif isinstance(value, (bool, int, float, str, bytes)):
            setattr(target, descriptor.name, value)
        else:  # a repeated field
            getattr(target, descriptor.name).extend(value)


def _concrete_info(vi: onnx.ValueInfoProto) -> TensorInfo | None:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.HasField("shape") or not tt.elem_type:
        return None
    dims = []
    for d in tt.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(d.dim_value)
    return TensorInfo(vi.name, tt.elem_type, tuple(dims))


def _measure(
    proto: onnx.ModelProto,
    shapes: Mapping[str, tuple[int, ...]],
    names: list[str],
    inferred: onnx.ModelProto,
) -> dict[str, TensorInfo]:
    """Shapes inference could not tell, measured by running once, on zero
    inputs, the nodes they depend on.

    Those are few (a ``Range`` over an input's length, and what it feeds):
    only their part of the model is copied and run, not every weight.
    """
    import onnxruntime as ort

    from .runtime import session_options

    graph = proto.graph
    producer = {out: index for index, node in enumerate(graph.node) for out in node.output if out}
    inits = {i.name: i for i in graph.initializer}
    nodes: set[int] = set()
    reads: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name in reads:
            continue
        reads.add(name)
        if name in producer and name not in inits:
            nodes.add(producer[name])
            pending.extend(_node_reads(graph.node[producer[name]]))
    probe = onnx.ModelProto()
    _copy_fields(proto, probe, skip=("graph",))
    _copy_fields(graph, probe.graph, skip=("node", "initializer", "input", "output", "value_info"))
    probe.graph.node.extend(graph.node[i] for i in sorted(nodes))
    probe.graph.initializer.extend(inits[n] for n in sorted(reads & inits.keys()))
    probe.graph.input.extend(vi for vi in graph.input if vi.name in reads and vi.name not in inits)
    known_types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    for name in names:
        vi = probe.graph.output.add()
        vi.name = name
        if known_types.get(name):
            vi.type.tensor_type.elem_type = known_types[name]
    feeds = {}
    for vi in probe.graph.input:
        if vi.name in shapes:
            dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
            feeds[vi.name] = np.zeros(shapes[vi.name], dtype=dtype)
    try:
        session = ort.InferenceSession(
            probe.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
        )
        values = session.run(names, feeds)
    except Exception as exc:  # onnxruntime raises its own types
        raise ModelError(
            f"could not determine the shapes of {len(names)} tensors (first {names[0]!r}) "
            f"by inference or by running the model on zero inputs: {exc}"
        ) from exc
    result = {}
    for name, value in zip(names, values):
        value = np.asarray(value)
        elem = helper.np_dtype_to_tensor_dtype(value.dtype) if value.dtype != object else onnx.TensorProto.STRING
        result[name] = TensorInfo(name, elem, tuple(value.shape))
    return result
