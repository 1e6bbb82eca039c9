"""Task graphs: partitions x micro-batches, and splitting/joining batches.

This is stage 3 of crowdgraph's flow.  A batch is split along axis 0 into
micro-batches; task ``(p, i)`` runs partition ``p`` on micro-batch ``i``.
Keys are plain Dask-style tuples such as ``("p3", 7)``.

Two modes order the tasks:

* ``"streaming"`` (1:1): ``(p, i)`` waits only for its producer partitions
  on micro-batch ``i``, so micro-batches flow through the crowd like a
  pipeline;
* ``"barrier"``: ``(p, i)`` waits for every micro-batch of every producer
  partition, so a partition starts only when the previous stage is done
  for the whole batch (CROWDio's synchronisation).

Data always flows between tasks of the same micro-batch; barrier edges
only add waiting.  Each edge says which: ``data=True`` or ``False``.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import networkx as nx
import numpy as np

from .errors import InputError

Mode = Literal["streaming", "barrier"]
TaskKey = tuple[str, int]
MODES = ("streaming", "barrier")


def build_task_graph(partitions: nx.DiGraph, microbatches: int, mode: Mode = "streaming") -> nx.DiGraph:
    """The task graph of ``microbatches`` micro-batches through ``partitions``.

    Each node ``(p, i)`` has attributes ``partition`` and ``priority``
    (earlier micro-batches first when streaming, earlier partitions first
    with a barrier), which the scheduler uses to order ready tasks.

    >>> parts = nx.DiGraph([("p0", "p1")])
    >>> sorted(build_task_graph(parts, 2, "streaming").edges)
    [(('p0', 0), ('p1', 0)), (('p0', 1), ('p1', 1))]
    >>> len(build_task_graph(parts, 2, "barrier").edges)
    4
    """
    if mode not in MODES:
        raise InputError(f"mode must be 'streaming' or 'barrier', not {mode!r}")
    if microbatches < 1:
        raise InputError(f"there must be at least one micro-batch, got {microbatches}")
    order = {p: n for n, p in enumerate(nx.topological_sort(partitions))}
    tasks = nx.DiGraph()
    for p, rank in order.items():
        for i in range(microbatches):
            priority = (i, rank) if mode == "streaming" else (rank, i)
            tasks.add_node((p, i), partition=p, microbatch=i, priority=priority)
    for q, p in partitions.edges:
        for i in range(microbatches):
            tasks.add_edge((q, i), (p, i), data=True)
            if mode == "barrier":
                for j in range(microbatches):
                    if j != i:
                        tasks.add_edge((q, j), (p, i), data=False)
    return tasks


def data_producers(tasks: nx.DiGraph, key: TaskKey) -> list[TaskKey]:
    """The tasks whose outputs ``key`` reads (same micro-batch)."""
    return [u for u in tasks.predecessors(key) if tasks.edges[u, key]["data"]]


def data_consumers(tasks: nx.DiGraph, key: TaskKey) -> list[TaskKey]:
    """The tasks that read the outputs of ``key``."""
    return [v for v in tasks.successors(key) if tasks.edges[key, v]["data"]]


def split_batch(batch: Mapping[str, np.ndarray], batched: Sequence[str], microbatch: int | None) -> list[dict[str, np.ndarray]]:
    """Split the ``batched`` inputs along axis 0 into micro-batches.

    Inputs not in ``batched`` go whole to every micro-batch.  The last
    micro-batch is smaller when ``microbatch`` does not divide the batch.

    >>> parts = split_batch({"x": np.arange(5)}, ["x"], 2)
    >>> [p["x"].tolist() for p in parts]
    [[0, 1], [2, 3], [4]]
    """
    sizes = {name: batch[name].shape[0] for name in batched}
    size = next(iter(sizes.values()), 1)
    if microbatch is None or microbatch >= size:
        return [dict(batch)]
    if microbatch < 1:
        raise InputError(f"microbatch must be a positive number of rows, got {microbatch}")
    result = []
    for start in range(0, size, microbatch):
        part = dict(batch)
        for name in batched:
            part[name] = batch[name][start:start + microbatch]
        result.append(part)
    return result


def join_outputs(parts: Sequence[Mapping[str, Any]], batched: Sequence[str]) -> dict[str, np.ndarray]:
    """Join micro-batch outputs back in order (``batched`` ones along axis 0).

    >>> join_outputs([{"y": np.ones((2, 3))}, {"y": np.zeros((1, 3))}], ["y"])["y"].shape
    (3, 3)
    """
    joined = {}
    for name in parts[0]:
        if name in batched and len(parts) > 1:
            joined[name] = np.concatenate([np.asarray(p[name]) for p in parts], axis=0)
        else:
            joined[name] = np.asarray(parts[0][name])
    return joined
