"""Partition state across runs: where each sequence's key/value cache lives.

A decoder's partitions read, at each step of a generation, the cache they
wrote at the step before (:class:`~crowdgraph.runtime.TaskState`); each
step is one run.  :class:`StateBook` is the driver's ledger of that state,
plain data, kept from one run to the next:

* **On the worker.**  A worker that ``keeps_state`` (its
  :class:`~crowdgraph.schedule.WorkerInfo` says so) keeps the cache its
  task wrote when its budget has room for it (the partition's estimate,
  which counts one sequence's cache in and out at ``max_length``, plus
  one cache at ``max_length`` for every other sequence it keeps) and the
  crowd has a worker for every partition (a smaller crowd swaps
  partitions at every step, and a partition swapped out loses the caches
  its worker kept).  The next step's task of that sequence is pinned to
  it (state affinity, above the four tiers in :mod:`crowdgraph.schedule`)
  and carries no cache.
* **With the driver.**  Otherwise the cache comes back with the task's
  result and the driver sends it with the next task: always so on a
  worker that does not keep state.
* **Rebuilt.**  Every step's other inputs of each partition and sequence
  are kept here (a few kilobytes a token: the hidden state of one token,
  the mask, the positions).  A cache lost with its worker, or dropped when
  its worker unloaded the partition, is rebuilt by replaying the
  partition on them from the first step, in one onnxruntime session on the
  driver, and sent with the task that needs it.  That costs the
  partition's compute for every step so far, on the driver, once per lost
  cache; the tokens do not change.

>>> import numpy as np
>>> book = StateBook({"p1": (("present.0.key", "past.0.key"),)}, {"p1": 1024})
>>> book.add_sequence("s0", {"past.0.key": np.zeros((1, 2, 0, 4), np.float32)})
>>> book.begin(["s0"])
>>> sorted(book.inputs_for("p1", "s0", "w1", None))       # the driver sends the empty cache
['past.0.key']
>>> book.finished("p1", "s0", "w1", {"h": 1}, kept=True)   # the worker kept the new one
{'h': 1}
>>> book.pins(), book.inputs_for("p1", "s0", "w1", None)   # next step: pinned there, nothing sent
({('p1', 0): 'w1'}, {})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .runtime import TaskState, open_session, run_session

__all__ = ["StateBook"]


class StateBook:
    """Where each sequence's state of each partition is, and what rebuilds it.

    Parameters
    ----------
    pairs
        Per partition with state: its ``(output, input)`` pairs, each
        output fed back as that input at the next step.
    state_bytes
        Per partition: the bytes of one sequence's state at the longest
        length, what a worker needs for each state it keeps.
    shared
        State outputs that other partitions also read: a worker that
        keeps them reports them too.
    """

    def __init__(self, pairs: Mapping[str, tuple[tuple[str, str], ...]], state_bytes: Mapping[str, int],
                 shared: frozenset[str] = frozenset()):
        self.pairs = {p: tuple(v) for p, v in pairs.items() if v}
        self.state_bytes = dict(state_bytes)
        self.shared = shared
        #: The state outputs: never model outputs of a run.
        self.outputs = frozenset(o for v in self.pairs.values() for o, _ in v)
        self.inputs = {p: frozenset(i for _, i in v) for p, v in self.pairs.items()}
        self.where: dict[tuple[str, str], str] = {}  # (partition, key) -> the worker that keeps it
        self.held: dict[tuple[str, str], dict[str, Any]] = {}  # (partition, key) -> the state, here
        self.initial: dict[str, dict[str, Any]] = {}  # key -> the state before the first step
        self.history: dict[tuple[str, str], list[dict[str, np.ndarray]]] = {}  # other inputs of each step
        self.keys: list[str] = []  # the key of each micro-batch of the current run
        self.step = -1
        #: ``(step, partition, key, steps replayed)`` of every state rebuilt.
        self.rebuilt: list[tuple[int, str, str, int]] = []

    def add_sequence(self, key: str, initial: Mapping[str, Any]) -> None:
        """A new sequence whose state starts as ``initial`` (input name -> value)."""
        self.initial[key] = dict(initial)
        for p, names in self.inputs.items():
            self.held[(p, key)] = {i: initial[i] for i in names}
            self.history[(p, key)] = []

    def begin(self, keys: Sequence[str]) -> None:
        """A run of the next step starts; micro-batch ``i`` is sequence ``keys[i]``."""
        self.keys = list(keys)
        self.step += 1

    def crowd(self, workers: Sequence[str]) -> None:
        """The run's crowd: what a worker outside it kept is lost (it left between runs)."""
        for worker in set(self.where.values()) - set(workers):
            self.lost(worker)

    def pins(self) -> dict[tuple[str, int], str]:
        """Tasks of this run that read state a worker keeps, and that worker."""
        return {(p, i): self.where[(p, key)] for i, key in enumerate(self.keys) for p in self.pairs
                if (p, key) in self.where}

    def kept_on(self, p: str, i: int) -> bool:
        """Whether task ``(p, i)`` reads state a worker keeps."""
        return p in self.pairs and (p, self.keys[i]) in self.where

    def record(self, p: str, key: str, inputs: Mapping[str, np.ndarray]) -> None:
        """The inputs (arrays, besides the state) of this step's finished task of ``p`` for ``key``, for a replay."""
        steps = self.history[(p, key)]
        assert len(steps) >= self.step, f"step {self.step} of {p} for {key} recorded after {len(steps)} steps"
        del steps[self.step:]  # a task that ran twice replaces its first record
        steps.append({n: np.asarray(v) for n, v in inputs.items() if n not in self.inputs[p]})

    def keep(self, p: str, key: str, worker: str, memory: int, resident_bytes: int) -> bool:
        """Whether ``worker`` (budget ``memory``) has room to keep this task's new state."""
        others = sum(1 for (q, k), w in self.where.items() if w == worker and q == p and k != key)
        return resident_bytes + others * self.state_bytes.get(p, 0) <= memory

    def inputs_for(self, p: str, key: str, worker: str, partition: Any) -> dict[str, Any]:
        """The state to send with the task of ``p`` for ``key`` on ``worker`` (empty: it keeps it).

        A state neither here nor on ``worker`` is rebuilt first, from
        ``partition`` (its model bytes and outputs) and the recorded steps.
        """
        if self.where.get((p, key)) == worker:
            return {}
        self.where.pop((p, key), None)  # kept by another worker: not this task's to read
        if (p, key) not in self.held:
            self._rebuild(p, key, partition)
        return dict(self.held[(p, key)])

    def finished(self, p: str, key: str, worker: str, outputs: Mapping[str, Any], kept: bool) -> dict[str, Any]:
        """Note where the new state of ``p`` for ``key`` is (``kept``: ``worker`` keeps it, else
        the result brought it here); return the outputs other tasks read."""
        if kept:
            self.where[(p, key)] = worker
            self.held.pop((p, key), None)
        else:
            self.held[(p, key)] = {i: outputs[o] for o, i in self.pairs[p]}
            self.where.pop((p, key), None)
        return {n: v for n, v in outputs.items() if n not in self.outputs or n in self.shared}

    def lost(self, worker: str, partition: str | None = None) -> None:
        """``worker`` is gone, or dropped ``partition``: the state it kept (of it) is lost."""
        for pk in [pk for pk, w in self.where.items() if w == worker and partition in (None, pk[0])]:
            del self.where[pk]

    def drop(self, keys: Sequence[str]) -> dict[str, list[str]]:
        """Forget the sequences ``keys``; return, per worker, the keys it keeps to drop."""
        gone = set(keys)
        workers: dict[str, list[str]] = {}
        for (p, key), w in list(self.where.items()):
            if key in gone:
                del self.where[(p, key)]
                if key not in workers.setdefault(w, []):
                    workers[w].append(key)
        for pk in [pk for pk in self.held if pk[1] in gone]:
            del self.held[pk]
        for pk in [pk for pk in self.history if pk[1] in gone]:
            del self.history[pk]
        for key in gone:
            self.initial.pop(key, None)
        return workers

    def task_state(self, p: str, key: str, keep: bool) -> TaskState:
        """What a worker is told about the state of ``p``'s task for ``key``."""
        return TaskState(key, self.pairs[p], keep, tuple(o for o, _ in self.pairs[p] if o in self.shared))

    def _rebuild(self, p: str, key: str, partition: Any) -> None:
        """Replay ``p`` for ``key`` over every recorded step before this one."""
        state = {i: self.initial[key][i] for i in self.inputs[p]}
        steps = self.history[(p, key)][: self.step]
        session = open_session(partition.model_bytes)
        for inputs in steps:
            outputs = run_session(session, {**inputs, **state}, [o for o, _ in self.pairs[p]])
            state = {i: outputs[o] for o, i in self.pairs[p]}
        del session
        self.held[(p, key)] = state
        self.rebuilt.append((self.step, p, key, len(steps)))
