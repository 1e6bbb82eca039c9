"""A compiled model's task graph as a plain Dask graph (no dask import needed).

:func:`to_dask` writes the same task graph :meth:`CompiledModel.run`
builds -- partitions x micro-batches, streaming or barrier -- in Dask's
graph format: a ``dict`` from keys to values or tasks, a task being a
tuple ``(callable, *args)`` whose arguments may name other keys.  Any
Dask scheduler runs it (``dask.get``, ``dask.threaded.get``,
``distributed.Client.get``); this module itself never imports dask.

Keys
----
``("p3", 7)``
    partition ``p3`` run on micro-batch 7: a dict of its output tensors.
``("crowdgraph-input", 7)``
    the model inputs of micro-batch 7 (a dict name -> array).
``("crowdgraph-model", "p3")``
    the partition's serialized ONNX model (bytes).  One key per partition,
    so a distributed scheduler ships it to a worker once, as data.
``("crowdgraph-output", 7)``
    the model outputs of micro-batch 7.
``"crowdgraph-outputs"``
    the model outputs joined over micro-batches: a dict name -> array,
    the same as ``compiled.run`` returns (see :func:`output_keys`).
``("crowdgraph-done", "p3", 7)``, ``("crowdgraph-barrier", "p3")``
    barrier mode only: ``(p, i)`` waits for every micro-batch of its
    producer partitions through these small tokens, so the barrier moves
    no tensors.

What is not the same as ``compiled.run``: Dask's own scheduler places the
tasks.  There is no single-resident rule, no just-in-time loading, no
memory budget and no affinity tier.  Each process opens a partition's
onnxruntime session the first time one of its tasks runs there and keeps
it, cached by the partition's sha256 (:func:`clear_sessions` drops them),
so a process may end up holding every partition of the model.

>>> import crowdgraph
>>> from crowdgraph import zoo
>>> model = zoo.distilbert("tiny")
>>> batch = zoo.sample_inputs(model, batch=4, sequence=8)
>>> compiled = crowdgraph.compile(model, partitions=2, sample=batch)
>>> dsk = to_dask(compiled, batch, microbatch=2)
>>> ("p1", 1) in dsk, output_keys(dsk)
(True, ['crowdgraph-outputs'])
>>> outputs = _get_sync(dsk, "crowdgraph-outputs")   # what dask.get does
>>> outputs["logits"].shape
(4, 2)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Hashable, Mapping

import numpy as np

from .errors import InputError
from .runtime import open_session, run_session
from .taskgraph import MODES, join_outputs, split_batch

__all__ = ["to_dask", "output_keys", "clear_sessions", "OUTPUTS_KEY"]

#: Key of the joined model outputs.
OUTPUTS_KEY = "crowdgraph-outputs"
INPUT = "crowdgraph-input"
MODEL = "crowdgraph-model"
OUTPUT = "crowdgraph-output"
DONE = "crowdgraph-done"
BARRIER = "crowdgraph-barrier"

_SESSIONS: dict[str, Any] = {}
_SESSIONS_LOCK = threading.Lock()


def clear_sessions() -> int:
    """Drop the sessions this process opened for Dask graphs; return how many."""
    with _SESSIONS_LOCK:
        n = len(_SESSIONS)
        _SESSIONS.clear()
    if n:
        from .runtime import release_memory

        release_memory()
    return n


def cached_sessions() -> list[str]:
    """sha256 of the partitions whose sessions this process holds."""
    with _SESSIONS_LOCK:
        return sorted(_SESSIONS)


def _session(sha256: str, model_bytes: Any) -> Any:
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(sha256)
        if session is None:
            data = model_bytes if isinstance(model_bytes, bytes) else bytes(model_bytes)
            session = _SESSIONS[sha256] = open_session(data)
        return session


@dataclass(frozen=True)
class _PartitionTask:
    """What a partition task needs besides its arguments (a literal to Dask)."""

    name: str
    sha256: str
    outputs: tuple[str, ...]
    #: per input tensor: (index of the argument holding it, name in that dict)
    sources: tuple[tuple[str, int, str], ...]

    def __call__(self, model_bytes: Any, *values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {tensor: values[index][name] for tensor, index, name in self.sources}
        return run_session(_session(self.sha256, model_bytes), feeds, self.outputs)


@dataclass(frozen=True)
class _Pick:
    """Collect named tensors from several dicts: ``(name, argument index)``."""

    names: tuple[tuple[str, int], ...]

    def __call__(self, *values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: values[index][name] for name, index in self.names}


@dataclass(frozen=True)
class _Pack:
    """Make the input dict of one micro-batch from its arrays."""

    names: tuple[str, ...]

    def __call__(self, *arrays: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.names, arrays))


@dataclass(frozen=True)
class _Join:
    """Join per-micro-batch output dicts (batched outputs along axis 0)."""

    batched: tuple[str, ...]

    def __call__(self, *parts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return join_outputs(list(parts), list(self.batched))


def _token(*_: Any) -> bool:
    """A barrier token: its arguments finished (it returns no data)."""
    return True


def to_dask(compiled: Any, batch: Mapping[str, Any], microbatch: int | None = None,
            mode: str = "streaming") -> dict[Hashable, Any]:
    """The task graph of ``compiled`` on ``batch`` as a plain Dask graph.

    Parameters
    ----------
    compiled:
        A :class:`~crowdgraph.CompiledModel`.
    batch:
        Input name -> array, checked as :meth:`CompiledModel.run` checks it.
    microbatch:
        Rows per micro-batch (default: the whole batch in one).
    mode:
        ``"streaming"`` or ``"barrier"`` (see :mod:`crowdgraph.taskgraph`).

    Returns
    -------
    dict
        Keys ``("p3", 7)`` and the others listed in the module docstring;
        run it with any Dask scheduler and read :func:`output_keys`.
        Placement is Dask's: see the module docstring for what that means
        for memory.
    """
    if mode not in MODES:
        raise InputError(f"mode must be 'streaming' or 'barrier', not {mode!r}")
    feeds = compiled.check_inputs(batch)
    microbatches = split_batch(feeds, compiled.batched_inputs(), microbatch)
    plan = compiled.at_shapes({k: v.shape for k, v in microbatches[0].items()})
    names = tuple(feeds)
    order = list(plan.partitions)
    producer = {t: p.name for p in order for t in p.outputs}
    dsk: dict[Hashable, Any] = {}
    for part in order:
        dsk[(MODEL, part.name)] = part.model_bytes
    for i, mb in enumerate(microbatches):
        dsk[(INPUT, i)] = (_Pack(names),) + tuple(mb[n] for n in names)
    for part in order:
        upstream = sorted({producer[t] for t in part.inputs if t in producer}, key=[p.name for p in order].index)
        args: list[Hashable] = []
        arg_of: dict[str, int] = {}
        sources = []
        for tensor in part.inputs:
            source = producer.get(tensor)  # None: a model input
            label = source if source is not None else INPUT
            if label not in arg_of:
                arg_of[label] = len(args)
                args.append(label)
            sources.append((tensor, arg_of[label], tensor))
        task = _PartitionTask(part.name, part.sha256, tuple(part.outputs), tuple(sources))
        for i in range(len(microbatches)):
            deps = [(label, i) for label in args]
            barriers = [(BARRIER, q) for q in upstream] if mode == "barrier" and len(microbatches) > 1 else []
            dsk[(part.name, i)] = (task, (MODEL, part.name), *deps, *barriers)
    if mode == "barrier" and len(microbatches) > 1:
        consumed = {producer[t] for p in order for t in p.inputs if t in producer}
        for name in consumed:
            for i in range(len(microbatches)):
                dsk[(DONE, name, i)] = (_token, (name, i))
            dsk[(BARRIER, name)] = (_token, *[(DONE, name, i) for i in range(len(microbatches))])
    out_names = [o.name for o in compiled.outputs]
    out_parts = sorted({producer[n] for n in out_names}, key=[p.name for p in order].index)
    pick = _Pick(tuple((n, out_parts.index(producer[n])) for n in out_names))
    for i in range(len(microbatches)):
        dsk[(OUTPUT, i)] = (pick, *[(p, i) for p in out_parts])
    batched = tuple(t.name for t in compiled.outputs if t.dims and not (isinstance(t.dims[0], int) and t.dims[0] > 0))
    dsk[OUTPUTS_KEY] = (_Join(batched), *[(OUTPUT, i) for i in range(len(microbatches))])
    return dsk


def output_keys(dsk: Mapping[Hashable, Any]) -> list[Hashable]:
    """The key(s) whose values are the model outputs joined over micro-batches.

    ``dask.threaded.get(dsk, output_keys(dsk))`` returns a list with one
    dict, name -> array, equal to what ``compiled.run`` returns.
    """
    if OUTPUTS_KEY not in dsk:
        raise InputError("this is not a graph made by crowdgraph's to_dask (it has no 'crowdgraph-outputs' key)")
    return [OUTPUTS_KEY]


def _get_sync(dsk: Mapping[Hashable, Any], key: Hashable) -> Any:
    """Compute ``key`` of a graph in this thread (for doctests and debugging; no dask needed)."""
    cache: dict[Hashable, Any] = {}

    def value(k: Hashable) -> Any:
        if k not in cache:
            v = dsk[k]
            if isinstance(v, tuple) and v and callable(v[0]):
                v = v[0](*[value(a) if _is_key(dsk, a) else a for a in v[1:]])
            cache[k] = v
        return cache[k]

    return value(key)


def _is_key(dsk: Mapping[Hashable, Any], a: Any) -> bool:
    try:
        return a in dsk
    except TypeError:  # unhashable (an array)
        return False
