"""The executor protocol: how a crowd carries out the scheduler's actions.

An executor knows its workers and does four things, one method each:

========================  ===================================================
``start(job, reporter)``  connect to the crowd; return its workers
``load(worker, part)``    make ``part`` resident on ``worker``
``unload(worker, name)``  drop it again, releasing its memory
``run(worker, key, ...)`` run task ``key`` on ``worker`` with the given inputs
========================  ===================================================

Every method returns at once; the work happens in the background and the
executor tells the driver what happened through the :class:`Reporter` it
was given (``reporter.task_finished(...)`` and so on), from any thread.
The driver applies those notices to the pure scheduler on its own thread
and calls the executor again with the scheduler's next actions.

The contract (checked by :mod:`crowdgraph.testing`):

* actions for one worker are carried out in the order they were given;
  a worker runs one task at a time;
* ``run`` inputs are numpy arrays (model inputs) or whatever values the
  executor itself reported as outputs of earlier tasks (arrays, or handles
  such as Dask futures, which :meth:`Executor.gather` turns into arrays);
* a failure is reported, never raised from a background thread;
* a worker that disappears is reported with ``reporter.worker_lost``, its
  unfinished work is placed again by the scheduler.

See docs/executors.md for a walk-through of writing one.
"""

from __future__ import annotations

import abc
import queue
import time
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from .errors import ExecutorNotFound
from .partition import Partition
from .schedule import TaskKey, WorkerInfo

ENTRY_POINT_GROUP = "crowdgraph.executors"

NoticeKind = Literal["loaded", "load_failed", "unloaded", "finished", "failed", "joined", "lost", "results_lost"]


@dataclass(frozen=True)
class Notice:
    """One thing an executor reports; built by :class:`Reporter`'s methods."""

    kind: NoticeKind
    worker: str | None = None
    partition: str | None = None
    key: TaskKey | None = None
    outputs: Mapping[str, Any] | None = None
    error: str | None = None
    info: WorkerInfo | None = None
    keys: tuple[TaskKey, ...] = ()
    stats: Mapping[str, Any] = field(default_factory=dict)


class Reporter:
    """What an executor calls to tell the driver what happened (thread-safe).

    Times (``start``, ``end``) are in the executor's clock,
    :meth:`Executor.now`.  Byte counts are optional; they fill the report.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[Notice] = queue.Queue()
        self._listeners: list[Callable[[Notice], None]] = []

    def add_listener(self, listener: Callable[[Notice], None]) -> None:
        """Call ``listener(notice)`` for every later notice, on the reporting
        thread, before the driver sees it.  Tests use it to act at a chosen
        moment of a run (see :func:`crowdgraph.testing.watch_notices`)."""
        self._listeners.append(listener)

    def loaded(self, worker: str, partition: str, *, start: float, end: float,
               bytes_sent: int = 0, from_cache: bool = False, rss: int | None = None) -> None:
        """``partition`` is now resident on ``worker``."""
        self._put(Notice("loaded", worker, partition=partition, stats=dict(
            start=start, end=end, bytes_sent=bytes_sent, from_cache=from_cache, rss=rss)))

    def load_failed(self, worker: str, partition: str, error: str) -> None:
        """Loading ``partition`` on ``worker`` failed; the run fails."""
        self._put(Notice("load_failed", worker, partition=partition, error=error))

    def unloaded(self, worker: str, partition: str, *, rss: int | None = None) -> None:
        """``partition`` was dropped from ``worker``."""
        self._put(Notice("unloaded", worker, partition=partition, stats=dict(rss=rss)))

    def task_finished(self, worker: str, key: TaskKey, outputs: Mapping[str, Any], *,
                      start: float, end: float, bytes_in: int = 0, bytes_out: int = 0,
                      wire_in: int | None = None, wire_out: int | None = None,
                      peak_rss: int | None = None, rss: int | None = None) -> None:
        """Task ``key`` finished on ``worker`` with ``outputs`` (tensor name -> value)."""
        self._put(Notice("finished", worker, key=key, outputs=outputs, stats=dict(
            start=start, end=end, bytes_in=bytes_in, bytes_out=bytes_out,
            wire_in=bytes_in if wire_in is None else wire_in,
            wire_out=bytes_out if wire_out is None else wire_out,
            peak_rss=peak_rss, rss=rss)))

    def task_failed(self, worker: str, key: TaskKey, error: str) -> None:
        """Task ``key`` raised on ``worker``; the run fails with ``error``."""
        self._put(Notice("failed", worker, key=key, error=error))

    def worker_joined(self, info: WorkerInfo) -> None:
        """A new worker can take tasks."""
        self._put(Notice("joined", info.id, info=info))

    def worker_lost(self, worker: str, reason: str) -> None:
        """``worker`` is gone; its unfinished tasks are placed again."""
        self._put(Notice("lost", worker, error=reason))

    def results_lost(self, keys: Sequence[TaskKey]) -> None:
        """Outputs of finished tasks ``keys`` are gone (they lived on a lost worker)."""
        self._put(Notice("results_lost", keys=tuple(keys)))

    def _put(self, notice: Notice) -> None:
        for listener in self._listeners:
            listener(notice)
        self._queue.put(notice)

    def next(self, timeout: float) -> Notice | None:
        """The next notice, or None after ``timeout`` seconds (used by the driver)."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def pending(self) -> bool:
        """Whether a notice is waiting."""
        return not self._queue.empty()


@dataclass(frozen=True)
class Job:
    """What an executor is told about a run when it starts."""

    partitions: Mapping[str, Partition]
    memory_budget: int | None = None


class Executor(abc.ABC):
    """Base class of executors; see the module docstring for the contract."""

    #: Name used in reports.
    name = "executor"

    @abc.abstractmethod
    def start(self, job: Job, reporter: Reporter) -> Sequence[WorkerInfo]:
        """Get ready for a run and return the crowd's workers.

        ``WorkerInfo.cached`` names partitions of ``job`` a worker holds on
        local storage, ``WorkerInfo.resident`` the one it holds in memory
        from an earlier run.
        """

    @abc.abstractmethod
    def load(self, worker: str, partition: Partition) -> None:
        """Make ``partition`` resident on ``worker``; report ``loaded``."""

    @abc.abstractmethod
    def unload(self, worker: str, partition: str) -> None:
        """Drop ``partition`` from ``worker`` and release its memory; report ``unloaded``."""

    @abc.abstractmethod
    def run(self, worker: str, key: TaskKey, partition: Partition, inputs: Mapping[str, Any]) -> None:
        """Run ``partition`` on ``inputs`` on ``worker``; report ``task_finished``
        with every name in ``partition.outputs``, or ``task_failed``."""

    def gather(self, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Turn reported output values into numpy arrays (they already are, by default)."""
        return {k: np.asarray(v) for k, v in values.items()}

    def forget(self, values: Sequence[Any]) -> None:
        """The driver no longer needs these output values (default: nothing to do)."""

    def idle(self) -> None:
        """Called when the driver waits for notices; a simulator advances its clock here."""

    def now(self) -> float:
        """The executor's clock, in seconds."""
        return time.perf_counter()

    def quarantine(self, worker: str, reason: str) -> None:
        """Spot checks found ``worker``'s results wrong (``reason``): the run gives
        it nothing more; an executor may also disconnect it and refuse it for
        a while (default: nothing to do)."""

    def reset(self) -> None:
        """After a failed run: unload everything so no session stays open."""

    def close(self) -> None:
        """Release the crowd (threads, connections, processes)."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def installed_executors() -> dict[str, Any]:
    """Executors registered in the ``crowdgraph.executors`` entry-point group."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def resolve_executor(spec: Any) -> tuple[Executor, bool]:
    """The executor for ``executor=``, and whether the caller owns (closes) it.

    ``spec`` is an :class:`Executor`, a registered name (``"threads"``), a
    URL whose scheme is a registered name (``"tcp://host:8786"`` ->
    ``Executor.from_url``), or an object some registered executor class
    accepts (``cls.accepts(obj)``, such as a dask ``Client``).
    """
    if isinstance(spec, Executor):
        return spec, False
    installed = installed_executors()
    if isinstance(spec, str):
        scheme, sep, _ = spec.partition("://")
        name = scheme if sep else spec
        if name in installed:
            cls = installed[name].load()
            return (cls.from_url(spec) if sep else cls()), True
    else:
        for ep in installed.values():
            cls = ep.load()
            accepts = getattr(cls, "accepts", None)
            if accepts is not None and accepts(spec):
                return cls(spec), True
    names = ", ".join(sorted(installed)) or "none"
    raise ExecutorNotFound(
        f"no executor for {spec!r}; installed executors: {names}. Pass one of these names, "
        "a URL such as 'tcp://127.0.0.1:8786', or an Executor instance "
        "(pip install crowdgraph-tcp / crowdgraph-dask for more)"
    )
