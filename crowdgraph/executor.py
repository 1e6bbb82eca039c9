"""The executor protocol: how a crowd carries out the scheduler's actions.

An executor knows its workers and does four things, one method each:

========================  ===================================================
``start(job, reporter)``  connect to the crowd; return its workers
``load(worker, part)``    make ``part`` resident on ``worker``
``unload(worker, name)``  drop it again, releasing its memory
``run(worker, key, ...)`` run task ``key`` on ``worker`` with the given inputs
========================  ===================================================

A fifth is optional: ``store(worker, part)`` puts ``part`` on the
worker's local storage without loading it, while the worker computes, so
that its later ``load`` reads it from there.  The scheduler only asks it
of workers whose :class:`~crowdgraph.schedule.WorkerInfo` says ``stores``.

Workers that can keep a partition's state between runs (a decoder's
key/value cache, :class:`~crowdgraph.runtime.TaskState`) say so in
``WorkerInfo.keeps_state``: ``run`` then gets ``state=`` for their tasks
of partitions with state, and ``forget_state(worker, keys)`` drops what
they keep.

Every method returns at once; the work happens in the background and the
executor tells the driver what happened through the :class:`Reporter` it
was given (``reporter.task_finished(...)`` and so on), from any thread.
Each call becomes one typed notice (:class:`Loaded`, :class:`Finished`,
:class:`Lost` ...: one frozen dataclass per kind, each mirroring the
scheduler event it becomes); the driver applies them to the pure
scheduler on its own thread and calls the executor again with the
scheduler's next actions.

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
from dataclasses import dataclass, replace
from importlib.metadata import entry_points
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping, Sequence, Union

import numpy as np

from .errors import ExecutorNotFound, InputError
from .partition import Partition
from .runtime import TaskState
from .schedule import TaskKey, WorkerInfo

ENTRY_POINT_GROUP = "crowdgraph.executors"

NoticeKind = Literal["loaded", "load_failed", "unloaded", "finished", "failed", "joined", "lost", "results_lost"]


@dataclass(frozen=True)
class TaskStats:
    """What an executor measured of one finished task; it fills the run report.

    ``start`` and ``end`` are in the executor's clock (:meth:`Executor.now`).
    ``bytes_in``/``bytes_out`` are the raw tensor bytes a task read and
    wrote; ``wire_in``/``wire_out`` what crossed a link for them
    (compressed, or 0 when the tensors stayed in place), the raw bytes when
    not given.  ``peak_rss``/``rss`` are the worker process's resident
    memory, when it reports them.

    >>> TaskStats(start=1.0, end=1.5, bytes_in=400).wire_in
    400
    >>> TaskStats(start=1.0, end=1.5, bytes_in=400, wire_in=90).duration
    0.5
    """

    start: float
    end: float
    bytes_in: int = 0
    bytes_out: int = 0
    wire_in: int | None = None
    wire_out: int | None = None
    peak_rss: int | None = None
    rss: int | None = None

    def __post_init__(self) -> None:
        if self.wire_in is None:
            object.__setattr__(self, "wire_in", self.bytes_in)
        if self.wire_out is None:
            object.__setattr__(self, "wire_out", self.bytes_out)

    @property
    def duration(self) -> float:
        """Seconds the worker spent on the task."""
        return self.end - self.start


# -- notices: what an executor reports, one type per kind ---------------------
# Each mirrors the scheduler event the driver makes of it (schedule.py's
# LoadFinished, TaskFinished, WorkerJoined, WorkerLost, ResultsLost) and
# carries what the report records besides.  ``kind`` names the type in words.


@dataclass(frozen=True)
class Loaded:
    """``partition`` is resident on ``worker`` (loading took ``start`` to ``end``)."""

    kind: ClassVar[NoticeKind] = "loaded"
    worker: str
    partition: str
    start: float
    end: float
    bytes_sent: int = 0
    from_cache: bool = False
    rss: int | None = None
    fast: bool = False  #: opened as a fast session


@dataclass(frozen=True)
class LoadFailed:
    """Loading ``partition`` on ``worker`` failed; the run fails with ``error``."""

    kind: ClassVar[NoticeKind] = "load_failed"
    worker: str
    partition: str
    error: str


@dataclass(frozen=True)
class Unloaded:
    """``partition`` was dropped from ``worker``."""

    kind: ClassVar[NoticeKind] = "unloaded"
    worker: str
    partition: str
    rss: int | None = None


@dataclass(frozen=True)
class Finished:
    """Task ``key`` finished on ``worker`` with ``outputs`` (tensor name -> value)."""

    kind: ClassVar[NoticeKind] = "finished"
    worker: str
    key: TaskKey
    outputs: Mapping[str, Any]
    stats: TaskStats


@dataclass(frozen=True)
class Failed:
    """Task ``key`` raised on ``worker``; the run fails with ``error``."""

    kind: ClassVar[NoticeKind] = "failed"
    worker: str
    key: TaskKey
    error: str


@dataclass(frozen=True)
class Joined:
    """A new worker can take tasks."""

    kind: ClassVar[NoticeKind] = "joined"
    info: WorkerInfo

    @property
    def worker(self) -> str:
        return self.info.id


@dataclass(frozen=True)
class Lost:
    """``worker`` is gone (``reason`` says why); its unfinished tasks are placed again."""

    kind: ClassVar[NoticeKind] = "lost"
    worker: str
    reason: str


@dataclass(frozen=True)
class ResultsLost:
    """Outputs of the finished tasks ``keys`` are gone (they lived on a lost worker)."""

    kind: ClassVar[NoticeKind] = "results_lost"
    keys: tuple[TaskKey, ...]


#: Anything an executor reports.
Notice = Union[Loaded, LoadFailed, Unloaded, Finished, Failed, Joined, Lost, ResultsLost]


class Reporter:
    """What an executor calls to tell the driver what happened (thread-safe).

    Each method builds one notice; :meth:`notify` takes one ready-made
    (a simulator that holds notices back until their virtual time).
    Times are in the executor's clock, :meth:`Executor.now`.  Byte counts
    and RSS are optional; they fill the report.
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
               bytes_sent: int = 0, from_cache: bool = False, rss: int | None = None, fast: bool = False) -> None:
        """``partition`` is now resident on ``worker`` (``fast``: as a fast session)."""
        self.notify(Loaded(worker, partition, start, end, bytes_sent, from_cache, rss, fast))

    def load_failed(self, worker: str, partition: str, error: str) -> None:
        """Loading ``partition`` on ``worker`` failed; the run fails."""
        self.notify(LoadFailed(worker, partition, error))

    def unloaded(self, worker: str, partition: str, *, rss: int | None = None) -> None:
        """``partition`` was dropped from ``worker``."""
        self.notify(Unloaded(worker, partition, rss))

    def task_finished(self, worker: str, key: TaskKey, outputs: Mapping[str, Any], stats: TaskStats) -> None:
        """Task ``key`` finished on ``worker`` with ``outputs`` (tensor name -> value)."""
        self.notify(Finished(worker, key, outputs, stats))

    def task_failed(self, worker: str, key: TaskKey, error: str) -> None:
        """Task ``key`` raised on ``worker``; the run fails with ``error``."""
        self.notify(Failed(worker, key, error))

    def worker_joined(self, info: WorkerInfo) -> None:
        """A new worker can take tasks."""
        self.notify(Joined(info))

    def worker_lost(self, worker: str, reason: str) -> None:
        """``worker`` is gone; its unfinished tasks are placed again."""
        self.notify(Lost(worker, reason))

    def results_lost(self, keys: Sequence[TaskKey]) -> None:
        """Outputs of finished tasks ``keys`` are gone (they lived on a lost worker)."""
        self.notify(ResultsLost(tuple(keys)))

    def notify(self, notice: Notice) -> None:
        """Hand ``notice`` to the listeners, then to the driver."""
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

    @classmethod
    def accepts(cls, obj: Any) -> bool:
        """Whether ``executor=obj`` means this executor, made as ``cls(obj)``.

        ``compiled.run(batch, executor=obj)`` offers an object that is not
        an executor, a name or a URL to every registered class; override
        this to take one (``DaskExecutor`` takes a dask ``Client``).
        """
        return False

    @classmethod
    def from_url(cls, url: str) -> "Executor":
        """The executor ``executor="NAME://..."`` means, NAME being this class's entry point."""
        raise InputError(f"{cls.__name__} takes no URL ({url!r}); pass its registered name or an instance")

    @staticmethod
    def crowd_for(job: Job, holding: Iterable[tuple[WorkerInfo, str | None]]) -> tuple[list[WorkerInfo], list[str]]:
        """The crowd as a run of ``job`` starts, and the workers to clear first.

        ``holding`` pairs each worker with the sha256 of the partition it
        holds in memory from an earlier run (None: nothing).  A partition
        of this plan stays resident (by its name in ``job``); a worker
        holding one of another plan is named in the second list: unload
        it before the run, without reporting that.

        >>> from crowdgraph.schedule import WorkerInfo
        >>> part = type("Part", (), {"sha256": "ab"})()
        >>> crowd, clear = Executor.crowd_for(Job({"p0": part}), [
        ...     (WorkerInfo("a", 1), "ab"), (WorkerInfo("b", 1), "cd"), (WorkerInfo("c", 1), None)])
        >>> [w.resident for w in crowd], clear
        (['p0', None, None], ['b'])
        """
        by_sha = {p.sha256: name for name, p in job.partitions.items()}
        crowd, clear = [], []
        for info, sha256 in holding:
            resident = by_sha.get(sha256) if sha256 else None
            if sha256 and resident is None:
                clear.append(info.id)
            crowd.append(replace(info, resident=resident))
        return crowd, clear

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

    def store(self, worker: str, partition: Partition) -> None:
        """Put ``partition`` on ``worker``'s local storage, not in its memory;
        nothing is reported.  Only asked of workers started with
        ``WorkerInfo.stores``; a later :meth:`load` there may read it from
        storage, and must still work if the worker did not keep it."""

    @abc.abstractmethod
    def run(self, worker: str, key: TaskKey, partition: Partition, inputs: Mapping[str, Any]) -> None:
        """Run ``partition`` on ``inputs`` on ``worker``; report ``task_finished``
        with every name in ``partition.outputs``, or ``task_failed``.

        For a worker started with ``WorkerInfo.keeps_state`` it also takes
        ``state: TaskState`` (a keyword) on tasks of partitions with state:
        the worker fills the state's inputs missing from ``inputs`` from
        what it keeps under ``state.key``, and with ``state.keep`` keeps the
        state's outputs there and leaves them out of the reported outputs
        (but for ``state.shared``)."""

    def forget_state(self, worker: str, keys: Sequence[str]) -> None:
        """Drop the state ``worker`` keeps under ``keys``, in order with its
        other actions (asked only of workers with ``keeps_state``)."""

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
            if cls.accepts(spec):
                return cls(spec), True
    names = ", ".join(sorted(installed)) or "none"
    raise ExecutorNotFound(
        f"no executor for {spec!r}; installed executors: {names}. Pass one of these names, "
        "a URL such as 'tcp://127.0.0.1:8786', or an Executor instance "
        "(pip install crowdgraph-tcp / crowdgraph-dask for more)"
    )
