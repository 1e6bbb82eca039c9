"""Partitioning: an op graph -> memory-budgeted partitions, each a valid ONNX model.

This is stage 2 of crowdgraph's flow.

The memory estimate
-------------------
A partition's *resident memory* is what a worker holds while it has the
partition loaded and runs it on one micro-batch::

    resident = weights + ACTIVATION_FACTOR * activations
               + RUNTIME_BASE_BYTES + RUNTIME_NODE_BYTES * (number of nodes)

* ``weights``: bytes of every initializer the partition reads, plus every
  constant it builds at run time (ConstantOfShape, shape arithmetic) at
  its built size, plus the initializers those are built from.  A shared
  initializer counts in every partition that reads it.
* ``activations``: the peak of live tensor bytes while the nodes run in
  order, at the lowered shapes.  Inputs stay live for the whole run (the
  caller holds them); a tensor made inside is freed after its last reader
  in the partition; outputs stay live to the end and are then copied once
  more into the arrays onnxruntime returns.
* ``ACTIVATION_FACTOR``: onnxruntime's allocation plan does not reuse
  freed buffers perfectly and some kernels take scratch space, so the
  estimate takes 1.5 times the live-tensor peak (measured: up to about
  1.3 times, with the allocator set up as :mod:`crowdgraph.runtime` does).
* the runtime's own overhead: a fixed part for a session and a part per
  node (kernels, graph structures), measured on DistilBERT partitions.
  onnxruntime's one-time cost (environment, kernel registries, code
  pages: about 7.5 MB) is not in it: a worker pays it once, with a
  warm-up session before it takes its floor
  (:func:`crowdgraph.runtime.warm_up`).

The estimate is checked against measured peak RSS in fresh processes by
the test suite (see docs/partitioning.md).

How the cut is chosen
---------------------
Nodes are cut into contiguous runs of one topological order.  Any such
cut gives an acyclic partition graph, and a tensor made once and read by
several later partitions goes from its producer straight to each reader,
so branches and skip connections need no special case.  A dynamic
programme over cut positions picks, among cuts whose every partition fits
the budget, the one with the fewest partitions, then the fewest bytes sent
between partitions, then the smallest largest weights.  From each start the
runs are scanned in one linear pass up to the first that does not fit.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator, Sequence

import networkx as nx
import onnx
from onnx import helper, numpy_helper

from .errors import BudgetError, ModelError
from .lower import OpGraph, OpNode, skeleton
from .units import format_bytes

#: Fixed resident cost of one more onnxruntime session in a warmed-up
#: process: a one-node session measures about 1.1 MB above the floor
#: taken after :func:`crowdgraph.runtime.warm_up`; rounded up.
RUNTIME_BASE_BYTES = 3 * 2**20 // 2  # 1.5 MiB
#: Resident cost per node of a session (kernel objects, graph structures).
RUNTIME_NODE_BYTES = 24 * 2**10
#: Measured activation peak over the live-tensor peak, rounded up.
ACTIVATION_FACTOR = 1.5
#: A *fast* session (:func:`crowdgraph.runtime.session_options` with
#: ``fast=True``: memory arena, pre-packed weights, every graph
#: optimisation) holds more than the estimate above.  Its own estimate,
#: measured in fresh processes like the estimate (docs/partitioning.md),
#: counts a weight this many times by the operator that reads it:
#: convolutions' are kept in onnxruntime's blocked layout beside the
#: originals, with BatchNormalization fused into new ones (up to 4.0 times,
#: measured on ResNet-50), Gemm's pre-packed beside them (1.8 times) ...
FAST_WEIGHT_FACTORS = {"Conv": 4.5, "ConvTranspose": 4.5, "ConvInteger": 4.5, "QLinearConv": 4.5, "Gemm": 2.25}
#: ... any other weight this many times (MatMul's pre-packed in place, fusions) ...
FAST_WEIGHT_FACTOR = 1.25
#: ... and the live-tensor peak this many times instead of ACTIVATION_FACTOR
#: (the arena rounds allocations up and keeps them).
FAST_ACTIVATION_FACTOR = 2.0
#: Partition models use at least this IR version.
MIN_IR_VERSION = 4


@dataclass(frozen=True)
class Estimate:
    """Resident-memory estimate of a run of nodes, and its boundary."""

    weight_bytes: int
    activation_bytes: int
    overhead_bytes: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def resident_bytes(self) -> int:
        """The whole estimate: weights + activations + runtime overhead."""
        return self.weight_bytes + self.activation_bytes + self.overhead_bytes


@dataclass(frozen=True)
class RunEstimate:
    """What the cut needs to know of one run ``nodes[i:end]``."""

    end: int
    resident_bytes: int
    fed_bytes: int
    weight_bytes: int


@dataclass
class Partition:
    """One partition: a standalone ONNX model and what it costs.

    ``inputs`` are the tensors it is fed (model inputs and tensors made by
    earlier partitions), ``outputs`` what it hands on (model outputs and
    tensors read by later partitions).
    """

    name: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weight_bytes: int
    activation_bytes: int
    resident_bytes: int
    input_bytes: int
    output_bytes: int
    model: onnx.ModelProto = field(repr=False)
    flops: int = 0
    #: The estimate of a fast session (None: not known, as in plans saved before it was).
    fast_resident_bytes: int | None = None

    def opens_fast(self, memory: int | None) -> bool:
        """Whether a worker with ``memory`` bytes (None: unbounded) opens this partition fast.

        >>> p = Partition("p0", (), (), (), 0, 0, resident_bytes=10, input_bytes=0, output_bytes=0,
        ...               model=onnx.ModelProto(), fast_resident_bytes=25)
        >>> p.opens_fast(24), p.opens_fast(25), p.opens_fast(None)
        (False, True, True)
        """
        return self.fast_resident_bytes is not None and (memory is None or memory >= self.fast_resident_bytes)

    @cached_property
    def model_bytes(self) -> bytes:
        """The partition's model serialised with its weights inline."""
        return self.model.SerializeToString(deterministic=True)

    @cached_property
    def sha256(self) -> str:
        """Content address: sha256 of :attr:`model_bytes`."""
        return hashlib.sha256(self.model_bytes).hexdigest()


class _Cutter:
    """Estimates of contiguous node runs ``nodes[i:j]`` of one op graph."""

    def __init__(self, og: OpGraph):
        self.og = og
        self.nodes = og.nodes
        n = len(og.nodes)
        self.producer: dict[str, int] = {}
        for node in og.nodes:
            for out in node.outputs:
                self.producer[out] = node.index
        outputs = set(og.outputs)
        self.last_reader: dict[str, int] = {}
        for node in og.nodes:
            for name in node.inputs:
                if name not in og.constant_bytes:
                    self.last_reader[name] = node.index
        for name in outputs:
            self.last_reader[name] = n  # read "after the end"
        self.node_constants: list[frozenset[str]] = [self._constant_closure(nd) for nd in og.nodes]
        # Per node, computed once: estimate() runs for many overlapping runs.
        self.size = {name: info.nbytes for name, info in og.tensors.items()}
        self.reads: list[tuple[str, ...]] = [
            tuple(dict.fromkeys(r for r in nd.inputs if r not in og.constant_bytes)) for nd in og.nodes]
        self.made: list[tuple[tuple[str, int], ...]] = [
            tuple((o, self.size.get(o, 0)) for o in nd.outputs) for nd in og.nodes]
        # For scan(): bytes each node makes, of those the bytes nothing reads, and
        # (producer, bytes) of the tensors whose last reader it is.
        self.made_bytes = [sum(nbytes for _, nbytes in made) for made in self.made]
        self.unread_bytes = [sum(nbytes for o, nbytes in made if o not in self.last_reader) for made in self.made]
        self.last_read_at: list[list[tuple[int, int]]] = [[] for _ in range(n)]
        for k, made in enumerate(self.made):
            for o, nbytes in made:
                if self.last_reader.get(o, n) < n:
                    self.last_read_at[self.last_reader[o]].append((k, nbytes))

    def _constant_closure(self, node: OpNode) -> frozenset[str]:
        """Constant tensors (built and initializers) a node needs."""
        names: set[str] = set()
        for c in node.constants:
            names.add(c)
            inits, const_nodes = self.og.constant_sources[c]
            names |= inits
            for cn in const_nodes:
                names.update(o for o in self.og.node_protos[cn].output if o)
        return frozenset(names)

    def estimate(self, i: int, j: int) -> Estimate:
        """Resident-memory estimate of ``nodes[i:j]`` (the formula above)."""
        size, producer, last_reader = self.size, self.producer, self.last_reader
        constants: set[str] = set()
        inputs: dict[str, None] = {}
        last_in_run: dict[str, int] = {}
        for k in range(i, j):
            constants |= self.node_constants[k]
            for r in self.reads[k]:
                if producer.get(r, -1) < i:
                    inputs.setdefault(r)
                last_in_run[r] = k
        outputs = tuple(
            out for k in range(i, j) for out, _ in self.made[k] if last_reader.get(out, -1) >= j
        )
        output_set = set(outputs)
        live = sum(size.get(t, 0) for t in inputs)
        peak = live
        for k in range(i, j):
            made = self.made[k]
            live += sum(nbytes for _, nbytes in made)
            peak = max(peak, live)
            for r in self.reads[k]:
                if last_in_run[r] == k and r not in inputs and r not in output_set:
                    live -= size.get(r, 0)
            for o, nbytes in made:  # made but never read
                if o not in last_in_run and o not in output_set:
                    live -= nbytes
        out_bytes = sum(size.get(o, 0) for o in outputs)
        activations = int(ACTIVATION_FACTOR * max(peak, live + out_bytes))
        weights = sum(self.og.constant_bytes.get(c, 0) for c in constants)
        overhead = RUNTIME_BASE_BYTES + RUNTIME_NODE_BYTES * (j - i)
        return Estimate(weights, activations, overhead, tuple(inputs), outputs)

    def scan(self, i: int) -> Iterator[RunEstimate]:
        """The estimates of ``nodes[i:j]`` for j = i+1, i+2, ... in one pass.

        Equal to :meth:`estimate` for every j, in time linear in the run
        rather than quadratic: a tensor made at p is live at step k < j
        exactly when p <= k and its last reader anywhere is at k or later
        (an output of the run is never freed, and an internal tensor's last
        reader is in the run), so the live bytes at each step do not depend
        on where the run ends, only the outputs' copies do.
        """
        size, producer = self.size, self.producer
        constant_bytes = self.og.constant_bytes
        seen_inputs: set[str] = set()
        seen_constants: set[str] = set()
        fed = weights = made_live = live_peak = 0
        for k in range(i, len(self.nodes)):
            for c in self.node_constants[k]:
                if c not in seen_constants:
                    seen_constants.add(c)
                    weights += constant_bytes.get(c, 0)
            for r in self.reads[k]:
                if r not in seen_inputs and producer.get(r, -1) < i:
                    seen_inputs.add(r)
                    fed += size.get(r, 0)
            made_live += self.made_bytes[k]
            live_peak = max(live_peak, made_live)
            made_live -= self.unread_bytes[k]
            made_live -= sum(nbytes for p, nbytes in self.last_read_at[k] if p >= i)
            overhead = RUNTIME_BASE_BYTES + RUNTIME_NODE_BYTES * (k + 1 - i)
            # After node k, the tensors of the run still live are its outputs.
            activations = int(ACTIVATION_FACTOR * max(fed + live_peak, fed + 2 * made_live))
            yield RunEstimate(k + 1, weights + activations + overhead, fed, weights)

    def runs_from(self, i: int, budget: int) -> Iterator[RunEstimate]:
        """The runs ``nodes[i:j]`` that fit ``budget``, shortest first, up to the first that does not.

        A longer run may fit again (the estimate is not monotone: the
        outputs' copies can shrink); a cut that skips to it would pack
        partitions closer to the budget (docs/partitioning.md).
        """
        for run in self.scan(i):
            if run.resident_bytes > budget:
                return
            yield run

    def fast_resident_bytes(self, i: int, j: int, est: Estimate) -> int:
        """The estimate of ``nodes[i:j]`` in a fast session, from its estimate ``est``."""
        factors: dict[str, float] = {}  # a weight read by several operators takes the largest factor
        for k in range(i, j):
            factor = FAST_WEIGHT_FACTORS.get(self.nodes[k].op_type, FAST_WEIGHT_FACTOR)
            for c in self.node_constants[k]:
                factors[c] = max(factors.get(c, factor), factor)
        extra = sum((f - 1) * self.og.constant_bytes.get(c, 0) for c, f in factors.items())
        return int(est.resident_bytes + extra + (FAST_ACTIVATION_FACTOR / ACTIVATION_FACTOR - 1) * est.activation_bytes)

    def smallest_budget(self) -> int:
        """The smallest budget at which every node fits on its own."""
        return max(self.estimate(i, i + 1).resident_bytes for i in range(len(self.nodes)))

    def _too_small(self, budget: int) -> BudgetError:
        i = next(i for i in range(len(self.nodes)) if self.estimate(i, i + 1).resident_bytes > budget)
        node = self.nodes[i]
        need = self.estimate(i, i + 1)
        return BudgetError(
            f"node {node.name!r} ({node.op_type}) needs {format_bytes(need.resident_bytes)} "
            f"on its own (weights {format_bytes(need.weight_bytes)}, activations "
            f"{format_bytes(need.activation_bytes)}, runtime {format_bytes(need.overhead_bytes)}), "
            f"above the budget of {format_bytes(budget)}; the smallest budget that compiles "
            f"this model at these shapes without splitting operators is "
            f"{format_bytes(self.smallest_budget())} (compile() splits large Gather, MatMul and "
            "Gemm nodes first; or use smaller input shapes / micro-batches)"
        )

    def cut(self, budget: int) -> list[tuple[int, int]]:
        """Best cut into runs that fit ``budget`` (fewest, then least traffic)."""
        n = len(self.nodes)
        INF = (float("inf"), float("inf"), float("inf"))
        best: list[tuple[float, float, float]] = [INF] * (n + 1)
        back = [0] * (n + 1)
        best[0] = (0, 0, 0)
        for i in range(n):
            if best[i] == INF:
                continue
            count, traffic, heaviest = best[i]
            for run in self.runs_from(i, budget):
                cand = (count + 1, traffic + run.fed_bytes, max(heaviest, run.weight_bytes))
                if cand < best[run.end]:
                    best[run.end] = cand
                    back[run.end] = i
        if best[n] == INF:
            raise self._too_small(budget)  # when every node fits alone, runs of one reach the end
        runs = []
        j = n
        while j > 0:
            runs.append((back[j], j))
            j = back[j]
        runs.reverse()
        return runs

    def count_at(self, budget: int) -> int:
        """Runs of a greedy cut at ``budget`` (each run as long as fits).

        At least as many as :meth:`cut` gives at this budget: ending a run
        earlier can let the next one reach further.
        """
        i = count = 0
        while i < len(self.nodes):
            ends = [run.end for run in self.runs_from(i, budget)]
            if not ends:
                raise self._too_small(budget)
            i = ends[-1]
            count += 1
        return count


def node_estimates(og: OpGraph) -> list[Estimate]:
    """The estimate of every node of ``og`` on its own, in node order.

    A node whose estimate is above the budget cannot be placed in any
    partition; :mod:`crowdgraph.split` rewrites such nodes into pieces.
    """
    cutter = _Cutter(og)
    return [cutter.estimate(i, i + 1) for i in range(len(og.nodes))]


def partition(og: OpGraph, memory_budget: int | None = None, partitions: int | None = None) -> list[Partition]:
    """Cut ``og`` into partitions that each fit ``memory_budget`` bytes.

    With ``partitions=k`` instead, the smallest budget giving at most ``k``
    partitions is found and used (the cut is then as balanced as the
    model allows).  Raises :class:`BudgetError` naming the node that does
    not fit, with the smallest budget that would work.
    """
    if (memory_budget is None) == (partitions is None):
        raise ValueError("give exactly one of memory_budget= and partitions=")
    cutter = _Cutter(og)
    if partitions is not None:
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {partitions}")
        memory_budget = _budget_for_count(cutter, partitions)
    assert memory_budget is not None
    runs = cutter.cut(memory_budget)
    types = _declared_types(og)
    result = []
    for number, (i, j) in enumerate(runs):
        est = cutter.estimate(i, j)
        name = f"p{number}"
        nodes = og.nodes[i:j]
        model = _build_model(og, name, nodes, est, types)
        result.append(Partition(
            name=name,
            nodes=tuple(n.name for n in nodes),
            inputs=est.inputs,
            outputs=est.outputs,
            weight_bytes=est.weight_bytes,
            activation_bytes=est.activation_bytes,
            resident_bytes=est.resident_bytes,
            input_bytes=sum(og.nbytes(t) for t in est.inputs),
            output_bytes=sum(og.nbytes(t) for t in est.outputs),
            model=model,
            flops=sum(node_flops(og, n) for n in nodes),
            fast_resident_bytes=cutter.fast_resident_bytes(i, j, est),
        ))
    return result


def node_flops(og: OpGraph, node: OpNode) -> int:
    """Rough floating-point operations of one node at the lowered shapes.

    Matrix products and convolutions count two operations per
    multiply-add; every other op one per output element.  The simulator
    turns this into compute time.
    """
    out = og.tensors.get(node.outputs[0]) if node.outputs else None
    if out is None:
        return 0
    size = math.prod(out.shape)
    first = og.tensors.get(node.inputs[0]) if node.inputs else None
    if node.op_type in ("MatMul", "Gemm") and first is not None and first.shape:
        return 2 * size * first.shape[-1]
    if node.op_type == "Conv" and len(node.inputs) > 1:
        weight = og.tensors.get(node.inputs[1])
        if weight is not None:
            return 2 * size * math.prod(weight.shape[1:])
    return size


def _budget_for_count(cutter: _Cutter, count: int) -> int:
    low = cutter.smallest_budget()
    high = cutter.estimate(0, len(cutter.nodes)).resident_bytes
    if cutter.count_at(low) <= count:
        return low
    while high - low > max(2**16, low // 200):
        mid = (low + high) // 2
        if cutter.count_at(mid) <= count:
            high = mid
        else:
            low = mid
    return high


def partition_graph(parts: Sequence[Partition]) -> nx.DiGraph:
    """The DAG of partitions; edge attribute ``tensors`` lists what flows.

    A tensor made by one partition and read by several later ones gives an
    edge from its producer to each reader.
    """
    graph = nx.DiGraph()
    producer = {}
    for part in parts:
        graph.add_node(part.name)
        for out in part.outputs:
            producer[out] = part.name
    for part in parts:
        for name in part.inputs:
            src = producer.get(name)
            if src is None:
                continue
            if graph.has_edge(src, part.name):
                graph.edges[src, part.name]["tensors"].append(name)
            else:
                graph.add_edge(src, part.name, tensors=[name])
    return graph


def _declared_types(og: OpGraph) -> dict[str, onnx.TypeProto]:
    """Tensor types with the model's own (symbolic) dims, for partition I/O.

    Shape inference on the unbound model keeps dims such as ``batch`` and
    ``sequence`` symbolic, so partitions run at any size the model does.
    Where it cannot tell a dim, the dim is left unnamed.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(og.model), strict_mode=False)
        infos = list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)
    except Exception:  # an unbound model may not infer; ranks below still hold
        infos = list(og.model.graph.input) + list(og.model.graph.output)
    types: dict[str, onnx.TypeProto] = {}
    for vi in infos:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            types[vi.name] = vi.type
    return types


def _value_info(og: OpGraph, name: str, types: dict[str, onnx.TypeProto]) -> onnx.ValueInfoProto:
    concrete = og.tensors.get(name)
    declared = types.get(name)
    if declared is not None and (concrete is None or len(declared.tensor_type.shape.dim) == len(concrete.shape)):
        vi = onnx.ValueInfoProto(name=name)
        vi.type.CopyFrom(declared)
        if not vi.type.tensor_type.elem_type and concrete is not None:
            vi.type.tensor_type.elem_type = concrete.elem_type
        for dim in vi.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and not dim.dim_param:
                dim.Clear()
        return vi
    if concrete is None:
        raise ModelError(f"the type of tensor {name!r} is unknown; cannot make it a partition boundary")
    return helper.make_tensor_value_info(name, concrete.elem_type, [None] * len(concrete.shape))


def _raw(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """``tensor`` with its values in ``raw_data``, the form a saved plan keeps.

    Saving weights as external data rewrites typed fields (``float_data``
    ...) into raw bytes; storing them that way from the start keeps a
    partition's content hash the same before and after a save.
    """
    if tensor.HasField("raw_data") or tensor.data_type == onnx.TensorProto.STRING:
        return tensor
    return numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name)


def _build_model(og: OpGraph, name: str, nodes: Sequence[OpNode], est: Estimate,
                 types: dict[str, onnx.TypeProto]) -> onnx.ModelProto:
    """A standalone, checked ONNX model for one partition."""
    source = og.model
    wanted_inits: set[str] = set()
    wanted_const_nodes: set[str] = set()
    for node in nodes:
        for c in node.constants:
            inits, const_nodes = og.constant_sources[c]
            wanted_inits |= inits
            wanted_const_nodes.update(const_nodes)
    wanted_nodes = wanted_const_nodes | {node.name for node in nodes}
    proto_nodes = [n for n in source.graph.node if n.name in wanted_nodes]
    graph = helper.make_graph(
        proto_nodes,
        name,
        [_value_info(og, t, types) for t in est.inputs],
        [_value_info(og, t, types) for t in est.outputs],
        initializer=[_raw(i) for i in source.graph.initializer if i.name in wanted_inits],
    )
    model = helper.make_model(
        graph,
        opset_imports=list(source.opset_import),
        producer_name="crowdgraph",
        ir_version=max(source.ir_version, MIN_IR_VERSION),
    )
    model.functions.extend(source.functions)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"partition {name} is not a valid ONNX model: {exc}") from exc
    return model
