"""The one place crowdgraph opens onnxruntime sessions.

Every executor (threads, TCP workers, Dask workers) and every measurement
opens partitions through :func:`open_session`, so all of them run with the
same options (the memory pattern aside, see below), and the memory
estimate of :mod:`crowdgraph.partition` holds for all of them:

* no CPU memory arena: memory freed by a closed session goes back to the
  allocator (and, with :func:`release_memory`, to the operating system)
  instead of staying reserved in the arena;
* no weight pre-packing: pre-packed MatMul weights would be a second copy
  of the largest tensors of a partition;
* no graph optimisations: fusions build new initializers next to the
  old ones while a session loads; even the basic Conv + BatchNormalization
  fusion raised ResNet-50's last-stage partitions to 1.5 times their
  estimate (measured), where without it they stay within it;
* on glibc, a worker process allocates blocks of 64 KiB and more with
  mmap (a fixed ``M_MMAP_THRESHOLD``, :func:`tune_allocator`): freed
  tensors go straight back to the operating system instead of fragmenting
  the heap, which otherwise keeps resident memory up to twice the live
  tensors (measured).  That is a setting of the whole process, so only
  processes that run partitions for a crowd take it: ``crowdgraph-worker``
  and the measurement process (through :func:`warm_up`) and Dask workers
  when they first hold a partition.  Opening a session does not, and a
  :class:`~crowdgraph.ThreadExecutor` leaves the allocator of the program
  it runs in alone: its workers share that process, so no one worker's
  memory could be told apart in it anyway, and every large array the
  program allocates would pay a fresh mmap and its page faults (compiling
  and checking plans in one process spent twice the time in the kernel
  that way, measured);
* onnxruntime's memory pattern (from its second run on, a session
  allocates the tensors of a run as one block it planned on the first)
  only in such a worker process: there every block is an mmap anyway, and
  one per run costs less than one per tensor (the whole embedded
  DistilBERT at 8x128: 1.08 s with the pattern, 1.52 s without).  In a
  process with glibc's own threshold, such as a ThreadExecutor's, the
  planned block is larger than any block glibc keeps in its heap, so every
  run faults it in afresh (58,000 page faults a run over the seven
  partitions of that model's 128 MB plan), while tensors allocated one by
  one are reused from the heap run after run (none): the warm crowd there
  runs about 10% faster without the pattern, and the heap keeps what the
  partitions' runs freed (about 150 MB more resident for those seven,
  measured).

A worker whose budget has room for it opens a partition as a *fast*
session instead (``open_session(..., fast=True)``: onnxruntime's defaults),
about 1.25x faster on DistilBERT at 8x128; its own estimate is
``Partition.fast_resident_bytes`` and ``Partition.opens_fast`` the rule.

A process's first session costs far more than any later one: onnxruntime
builds its environment and kernel registries and faults in its code pages
(about 7.5 MB, measured), and keeps them after the session closes.  That is
paid once per worker, not once per partition, so a worker calls
:func:`warm_up` before it takes its idle *floor*; the partition estimate
then only carries what each further session costs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import ModelError

#: Options that keep a session's resident memory close to the estimate.
SESSION_CONFIG = {"session.disable_prepacking": "1"}


def session_options(threads: int = 1, fast: bool = False) -> Any:
    """onnxruntime SessionOptions for a partition session.

    ``fast=True`` gives onnxruntime's own defaults (memory arena, pre-packed
    weights, every graph optimisation): faster, and as large as
    :attr:`crowdgraph.Partition.fast_resident_bytes` estimates.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # errors reach users as crowdgraph errors instead
    if fast:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return options
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = _allocator_tuned  # see the module docstring
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for key, value in SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    return options


#: glibc's mallopt parameter number for M_MMAP_THRESHOLD.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 * 2**10
_allocator_tuned = False


def tune_allocator() -> None:
    """Fix glibc's mmap threshold for this whole process (once; a no-op elsewhere).

    For processes that run partitions for a crowd (see the module
    docstring), before they take their idle floor.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return
    _allocator_tuned = True
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def warm_up_model() -> bytes:
    """A tiny model whose session faults in what every later session shares.

    One node each of the kernels that carry most partitions (convolution,
    pooling, normalisation, matrix products, attention's softmax, the
    usual elementwise ops) on a 1x4x4x4 image, so their code pages belong
    to the floor rather than to the first partition that uses them.
    """
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: Any) -> TensorProto:
        return numpy_helper.from_array(np.asarray(value, np.float32), name)

    inits = [const("w", np.full((4, 4, 3, 3), 0.1)), const("m", np.eye(4)), const("g", np.ones(4)),
             const("b", np.zeros(4)), const("half", 0.5)]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "b", "g"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["mp"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["mp"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["ap", "x"], ["cat"], axis=1),
        helper.make_node("Slice", ["cat", "starts", "ends", "axes"], ["sl"]),
        helper.make_node("MatMul", ["sl", "m"], ["p"]),
        helper.make_node("LayerNormalization", ["p", "g", "b"], ["ln"], axis=-1),
        helper.make_node("Softmax", ["ln"], ["sm"], axis=-1),
        helper.make_node("Erf", ["sm"], ["e"]),
        helper.make_node("Mul", ["e", "half"], ["mu"]),
        helper.make_node("Add", ["mu", "x"], ["a"]),
        helper.make_node("Sigmoid", ["a"], ["sg"]),
        helper.make_node("Tanh", ["sg"], ["t"]),
        helper.make_node("GlobalAveragePool", ["t"], ["gp"]),
        helper.make_node("Flatten", ["gp"], ["f"]),
        helper.make_node("Gemm", ["f", "m", "b"], ["y"]),
    ]
    ints = [numpy_helper.from_array(np.array([v], np.int64), name) for name, v in
            (("starts", 0), ("ends", 4), ("axes", 1))]
    graph = helper.make_graph(nodes, "warm_up", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits + ints)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="crowdgraph")
    model.ir_version = 8
    return model.SerializeToString()


_warm = False


def warm_up() -> None:
    """Open and run one tiny session, once per process, then free it.

    What stays resident afterwards (onnxruntime's environment, kernel
    registries, code pages) is the once-cost of a worker: take the idle
    floor after this call, and every partition's estimate covers what
    remains above it.  Tunes the allocator too.
    """
    global _warm
    tune_allocator()
    if _warm:
        return
    _warm = True
    session = open_session(warm_up_model())
    run_session(session, {"x": np.ones((1, 4, 4, 4), np.float32)})
    del session
    release_memory()


def open_session(model: bytes | str | os.PathLike, threads: int = 1, fast: bool = False) -> Any:
    """Open an onnxruntime session on serialized model bytes or a model file.

    A file keeps its weights in external data next to it, which
    onnxruntime reads without a second copy in Python.  ``fast`` as in
    :func:`session_options`.  Errors become :class:`ModelError` saying
    which model failed.
    """
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else os.fspath(model)
    try:
        return ort.InferenceSession(source, session_options(threads, fast), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        where = "model bytes" if isinstance(model, bytes) else str(model)
        raise ModelError(f"onnxruntime cannot load {where}: {exc}") from exc


def run_session(session: Any, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Run ``session`` and return its outputs by name (exceptions pass through)."""
    names = list(outputs) if outputs is not None else [o.name for o in session.get_outputs()]
    values = session.run(names, dict(feeds))
    return dict(zip(names, values))


def release_memory() -> None:
    """Give freed heap memory back to the operating system where possible.

    glibc keeps freed blocks for reuse; ``malloc_trim`` returns them, so a
    worker that unloads a partition really shrinks.  A no-op elsewhere.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim(0)


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (0 where unknown).

    Linux's ``VmHWM`` first: ``ru_maxrss`` survives ``exec``, so a worker
    process started by another would report its parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if os.uname().sysname == "Darwin" else int(peak) * 1024


def current_rss(pid: int | None = None) -> int:
    """Current resident set size in bytes of this process, or of process ``pid`` (0 where unknown)."""
    return _statm_bytes(1, pid)


def file_backed_rss() -> int:
    """The part of :func:`current_rss` backed by files: library code, mapped files (0 where unknown)."""
    return _statm_bytes(2, None)


def _statm_bytes(field: int, pid: int | None) -> int:
    try:
        with open(f"/proc/{'self' if pid is None else pid}/statm") as f:
            return int(f.read().split()[field]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True)
class TaskState:
    """The state a task reads and leaves on its worker: a decoder's key/value cache.

    A partition with state reads, at each step of a generation, what it
    wrote at the step before: each ``(output, input)`` of ``pairs`` is an
    output fed back as that input.  ``key`` names whose state it is (one
    sequence of one generation).  A task whose inputs lack a pair's input
    takes it from what its worker kept under ``key``; with ``keep`` the
    worker keeps the pair's outputs under ``key`` and leaves them out of
    the task's result, but for those in ``shared`` (other partitions read
    them too).  Without ``keep`` they are reported, and the driver keeps
    the state (:mod:`crowdgraph.state`).

    >>> TaskState("g1.s0", (("present.0.key", "past_key_values.0.key"),), keep=True).inputs
    ('past_key_values.0.key',)
    """

    key: str
    pairs: tuple[tuple[str, str], ...]
    keep: bool = True
    shared: tuple[str, ...] = ()

    @property
    def inputs(self) -> tuple[str, ...]:
        """The inputs the state is fed as."""
        return tuple(i for _, i in self.pairs)


class ResidentSession:
    """The one partition a worker holds in memory: load, unload, run.

    Every worker (a thread, a Dask worker, a ``crowdgraph-worker`` agent, a
    process) keeps its partition in one of these, so all of them keep the
    single-resident rule the same way: loading drops the session held
    before it, unloading hands its memory back to the operating system,
    and a task of any other partition is refused rather than run.  Callers
    that share one between threads hold :attr:`lock` around each call.

    Parameters
    ----------
    threads:
        onnxruntime intra-op threads of the session.
    collect_garbage:
        Run the cycle collector before handing memory back: for a worker
        process of its own, where a cycle can keep a tensor alive.
    where:
        How refusals name this worker ("this worker", "Dask worker ...").

    Examples
    --------
    >>> resident = ResidentSession()
    >>> resident.load(warm_up_model(), "p0", sha256="ab12")
    >>> resident.run("p0", {"x": np.ones((1, 4, 4, 4), np.float32)}, ["y"])["y"].shape
    (1, 4)
    >>> resident.run("p1", {}, ["y"])
    Traceback (most recent call last):
    RuntimeError: partition p1 is not loaded on this worker (it holds p0); loads and runs for one worker must come in order
    >>> resident.unload(), resident.unload()
    (True, False)

    A partition with state (:class:`TaskState`) keeps it here between
    tasks, per key, until it is forgotten or the session is unloaded.
    """

    def __init__(self, threads: int = 1, *, collect_garbage: bool = False, where: str = "this worker"):
        self.threads = threads
        self.collect_garbage = collect_garbage
        self.where = where
        self.lock = threading.Lock()
        self.session: Any = None
        #: Name and sha256 of the partition held (None: nothing).
        self.name: str | None = None
        self.sha256: str | None = None
        #: State kept per TaskState key: input name -> the output fed back as it.
        self.states: dict[str, dict[str, np.ndarray]] = {}

    def load(self, model: bytes | str | os.PathLike, name: str, sha256: str, fast: bool = False) -> None:
        """Make ``model`` (bytes or a file) the resident partition, dropping the one held first.

        ``fast`` opens it as a fast session (:func:`session_options`).
        """
        self.unload()
        self.session = open_session(model, self.threads, fast)
        self.name, self.sha256 = name, sha256

    def unload(self) -> bool:
        """Drop the session and release its memory; whether one was held."""
        self.states.clear()
        if self.session is None:
            return False
        self.session = self.name = self.sha256 = None
        if self.collect_garbage:
            gc.collect()
        release_memory()
        return True

    def run(self, name: str, feeds: Mapping[str, np.ndarray], outputs: Sequence[str], *,
            sha256: str | None = None, state: TaskState | None = None) -> dict[str, np.ndarray]:
        """Run partition ``name`` on ``feeds``; refuse if another is held.

        With ``sha256`` the content decides (names are per plan: a later
        plan may call the same partition otherwise), else the name.  With
        ``state``, inputs of its pairs missing from ``feeds`` come from the
        state kept under its key, and with ``state.keep`` the pairs'
        outputs are kept there instead of returned.
        """
        held = self.sha256 == sha256 if sha256 is not None else self.name == name
        if self.session is None or not held:
            raise RuntimeError(f"partition {name} is not loaded on {self.where} (it holds {self.name or 'nothing'}); "
                               "loads and runs for one worker must come in order")
        if state is None:
            return run_session(self.session, feeds, outputs)
        missing = [i for i in state.inputs if i not in feeds]
        kept = self.states.get(state.key, {})
        if any(i not in kept for i in missing):
            raise RuntimeError(f"{self.where} keeps no state {state.key!r} of partition {name} (it keeps "
                               f"{len(self.states)}); the driver must send it with the task")
        result = run_session(self.session, {**feeds, **{i: kept[i] for i in missing}}, outputs)
        self.states.pop(state.key, None)
        if state.keep:
            self.states[state.key] = {i: result[o] if o in state.shared else result.pop(o) for o, i in state.pairs}
        return result

    def forget(self, keys: Sequence[str]) -> None:
        """Drop the state kept under ``keys`` (those it does not keep are ignored)."""
        for key in keys:
            self.states.pop(key, None)
