"""The scheduler: which worker runs which task, and when weights move.

This module is pure logic on plain data.  It does no I/O, reads no clock
(the caller passes its own with each event), starts no thread and draws
no global randomness, so the same inputs and the same events at the same
times always give the same actions; every executor (threads, TCP, Dask)
and the simulated benchmarks share it.

Vocabulary
----------
A model is cut into *partitions* (named by strings); a batch is split into
*micro-batches*.  Task ``(p, i)`` -- a :data:`TaskKey` -- runs partition
``p`` on micro-batch ``i``.  The task graph says which tasks must finish
before which: an edge ``u -> v`` means ``v`` may only run after ``u``
finished, either because ``v`` reads ``u``'s outputs or to keep an order
(a barrier).  Each task has a *priority* (lower runs first).

A *worker* is one machine of the crowd with a memory budget, a relative
speed and the set of partitions it already has on local storage
(:class:`WorkerInfo`).

The execution contract
----------------------
The driver loop feeds :data:`Event` objects to :meth:`Scheduler.handle` on
one thread and hands the returned :data:`Action` objects to an executor.
The executor carries out each worker's actions in the order given (first
in, first out, per worker).  That is why the scheduler can emit
``Unload``, ``Load`` and ``Run`` for one worker in one batch without
waiting for ``LoadFinished``: the worker unloads, loads, then runs.
``LoadFinished`` only updates bookkeeping.  A worker runs one task at a
time; further ``Run`` actions queue on it.

The rules
---------
* **One partition resident per worker.**  A worker holds at most one
  partition; a partition counts as resident from the moment its ``Load``
  is issued.  Switching is ``Unload(old)`` then ``Load(new)``.  A worker
  is only given partitions that fit its budget
  (``partition_memory[p] <= worker.memory``).
* **Just-in-time loading.**  A ``Load`` is only issued in the same batch
  as, and just before, the ``Run`` of a task of that partition whose
  inputs are all finished.  Nothing is preloaded, so no worker holds
  weights that nothing is waiting for.
* **Weights ahead of need, to local storage only.**  A worker whose
  executor can store partitions on its disk while it computes
  (``WorkerInfo.stores``) is sent the partition it is expected to load
  next, as a ``Store``.  The partitions in plan order (lowest task
  priority first) that have unfinished work, no holder and no claim yet
  are expected to go first to the idle workers that do not store, one
  each, then to the storing workers in the order their partitions'
  remaining work drains (unfinished tasks x ``task(p, w)`` / summed speed
  of the holders; a worker holding nothing, or a partition with no work
  left, first): each of those claims the first such partition that fits
  its budget.  A worker has at most one claim; it ends when the worker is
  given a ``Load`` (of that partition or another), when another worker
  loads the partition, when the partition has no work left or when the
  worker is lost.  The stored partition counts as cached (tier 2, a local
  read) once the partition that worker holds has no work left, so it
  never lures a holder away from work still coming its way; memory holds
  only what ``Load`` put there.
* **Placement.**  A task is placed only when it is *ready* (all its
  predecessors finished).  Four tiers rank what a placement costs, best
  first:

  1. a worker whose resident partition is the task's partition (a
     *holder*): no weights move;
  2. an *idle* worker (nothing queued) that has the partition on local
     storage (``cached``): a local read, after unloading what it holds;
  3. an idle worker with nothing resident: a network transfer;
  4. an idle worker holding another partition: unload, then transfer.

  Ready tasks of held partitions are placed first, in priority order;
  an idle holder always takes its partition's next ready task before
  anything else is decided, so no placement ever swaps out a partition
  whose ready tasks a holder could run.  When every holder is busy the
  *policy* decides (``Scheduler(policy=...)``):

  ``"cost"`` (the default): the task goes where it is expected to finish
  first.  A task of ``p`` keeps worker ``w`` busy for
  ``task(p, w) = estimate(p) + tensor bytes(p) x speed(w) / bandwidth(w)``
  seconds at speed 1.0: its compute and its tensors over the worker's own
  link.  Loading a *replica* on the best idle worker of tiers 2 to 4 wins
  when that worker would load and run the task before the holders get
  through the partition's backlog (the *drain*)::

      load(w, p) + task(p, w) / speed(w) + reload(w)
          <  (task(p, h) x (queued + ready tasks of p) + unconfirmed loads)
             / summed speed of p's holders

  (``h`` is the best holder; an unconfirmed load counts as ``speed x load
  seconds`` of its holder's time, and the drain is at least when this
  task would finish behind the queued ones).  ``reload(w)`` is what
  swapping out ``w``'s partition costs the crowd: ``load(w, q)`` when
  ``w`` is the only holder of the partition ``q`` it holds and ``q`` has
  work left (someone must load it again), else 0.  Without it a warm
  pipeline crowd (each worker holding its stage, as after a run) whose
  first stage is all it can run would swap every stage out for replicas
  of the first and end the run in waves, every worker loading every
  partition, run after run.  A replica whose weights
  are on the worker's local storage must also be needed by the tasks as
  they are, whole: the drain spreads the queued tasks over every holder,
  so near the end of a partition's work a slow phone's replica would
  look sooner than a fast holder one task from free.  It is refused when
  the holders, each taking whole tasks at its own speed after its
  unconfirmed load and its queue, finish every ready task of ``p`` by the
  time the replica would finish this one::

      sum over holders x of
          max(0, floor((t x speed(x) - speed x unconfirmed load of x + done(x)) / task(p, x))
                 - tasks queued on x)
          >=  ready tasks of p,    t = load(w, p) + task(p, w) / speed(w)

  ``done(x)`` is what ``x`` did of the task it runs: ``speed(x)`` x the
  seconds since it started, by the clock the caller passes
  (``handle(event, now=...)``), at most ``task(p, x)`` (a task running
  past its estimate is expected to end any moment).  A task starts when
  the one before it on its worker finishes, or when its worker's load is
  confirmed; while a load is unconfirmed ``done(x)`` is 0, since a load
  may wait on links the estimate does not see.  Without a clock it is 0:
  a holder one moment from free would look a whole task away, and a
  slow phone's replica end the run after it.

  Two more conditions hold for a replica whose weights cross the network
  rather than local storage:

  - *It lags the crowd.*  When the crowd has no worker to spare (no more
    live workers than partitions with unfinished work), every worker is
    needed as some partition's holder, and a replica of an average stage
    only turns the pipeline into waves in which every worker loads every
    partition.  ``p``'s holders must then have more than their share of
    the remaining work by speed, the replica's own load counted as work
    the crowd must also do (in a pipeline of equal stages a later stage
    always has a few more tasks left than the one before it, and that
    alone is not worth a load)::

        unfinished tasks of p x task(p, h) / summed speed of p's holders
            >  (sum over unfinished tasks q of task(q, h) + speed(w) x load(w, p))
               / summed speed of the crowd

    And when a stage ``p`` feeds (a partition reading its outputs) has
    unfinished work and no holder, the replica's worker is one that stage
    will need, so the replica must also end ``p`` sooner than the stages
    feeding ``p`` supply its inputs, by more than its own load and the
    loads of those unheld stages on ``w``::

        unfinished tasks of p x task(p, h) / summed speed of p's holders
            - max over held stages q feeding p of
                  unfinished tasks of q x task(q, h) / summed speed of q's holders
            >  load(w, p) + sum over unheld stages r that p feeds of load(w, r)

    (in a pipeline of equal stages the stage after the running one looks
    behind only because its holder is still loading; a replica of it
    would wait for inputs, and the stage after it would get its holder
    late and end the run in a wave of loads).

    Except when the crowd is one partition short of a worker to spare
    (as many live workers as partitions with unfinished work) and ``p``
    is all it can run (no other partition has a task ready or queued):
    the idle workers would only wait for ``p``'s outputs, and once any
    partition is done the crowd has a worker to spare and the stages
    after ``p`` get replicas anyway; loading ``p`` now takes only time
    they would have waited, and moves the crowd on to the next stage in
    step.

  - *The star has room.*  With a shared coordinator link
    (``star_bandwidth``), the bytes it must still carry before the run
    can end (the tensors of every unfinished task, unconfirmed loads, the
    weights of partitions no worker stores yet) plus the replica's
    weights must take less than the drain or than the crowd's remaining
    compute at full use; else the replica's weights would only delay
    everyone's tensors.  Its load is also costed behind the bytes already
    on their way through the link (unconfirmed loads, tensors of queued
    tasks).

  Otherwise the task queues on the best holder if that holder has at
  most :data:`PREFETCH` task queued, else it stays ready and is weighed
  again after the next event.  So a bottleneck partition gets as many
  holders as its backlog pays for, and a bigger crowd is a faster crowd.

  ``"pipeline"``: the task always queues on the holder with the smallest
  ``(queue length + 1) / speed``; a partition only gets a new holder when
  no worker holds it, so the crowd runs the partitions as a pipeline and
  workers beyond the number of partitions stay idle.

  ``"greedy"``: the task goes to the best idle worker by tier order, or
  stays ready; nothing queues behind a busy worker and nothing is costed.

  A ready task of a partition that no worker holds goes to the best
  available tier (2 to 4) among all such tasks, lowest priority first
  among equals.  Within a tier the scheduler prefers the worker that
  produced the most of the task's inputs (their bytes need not travel),
  then the smallest ``(queue length + 1) / speed``, then a fixed
  tie-break: a permutation of the worker ids drawn from ``seed`` at
  construction (workers that join later rank after it, in join order; a
  worker that comes back keeps its rank).  Tier 4 never evicts a
  partition from a worker with queued tasks; under ``"cost"`` it first
  swaps workers whose partition has no task left to run.  A task that cannot be
  placed stays ready and is retried on every event.

  *State affinity* ranks above every tier: a task pinned to a worker
  (``Scheduler(pins=...)``, a task that reads state its worker kept from
  an earlier run, such as a decoder's key/value cache) queues on that
  worker, busy or not, whenever the worker holds the task's partition.
  A pin to a worker that is lost or holds another partition is void: the
  task is placed by the rules above, and the driver sends the state along
  (rebuilding it if its worker is gone, :mod:`crowdgraph.state`).

  The holders invariant: a worker only becomes a new holder of ``p``
  when no other holder could take the task -- under ``"pipeline"`` when
  ``p`` has no holder, under ``"cost"`` and ``"greedy"`` when every holder
  of ``p`` is busy (or a worker started the run holding ``p``, see
  ``WorkerInfo.resident``).  A worker's queue only ever holds tasks of its
  resident partition.
* **Lost workers.**  A lost worker's resident partition and queue are
  gone; its queued and running tasks become ready again.  Results it
  produced are kept (the driver holds them) unless a ``ResultsLost``
  event names them: those tasks are computed again, and their unfinished
  dependents that were ready or queued wait for them again.  A named task
  whose slower copy still runs (see ``TaskOverdue``) takes that copy's
  result when its inputs are all still there, else the copy is dropped
  and the task waits for them too, whatever the order of the names.  After either
  event, if no remaining worker can hold some partition that still has
  work, or no worker remains, :class:`~crowdgraph.errors.WorkerLostError`
  is raised.
* **Late messages are harmless.**  ``TaskFinished`` for a task already
  finished, from a lost worker, or for a task not queued on that worker is
  ignored; so are ``LoadFinished`` that does not name the oldest
  unconfirmed load of that worker, ``WorkerLost`` for a worker already
  lost, ``WorkerJoined`` for a live worker (a repeated announcement) and
  ``TaskOverdue`` for a task not running on that worker, backed up
  already or finished elsewhere.

Estimates
---------
A partition's *estimate* is the seconds one task of it takes on a
speed-1.0 worker.  It starts at ``flops / FLOPS_PER_SECOND`` (0 without
FLOPs, so nothing is worth a load until a task was measured), or at what
earlier runs measured (``Scheduler(estimates=...)``, counted as one
measurement: the FLOPs seed assumes a phone, and a laptop core runs ten
to twenty times faster), and follows the durations ``TaskFinished``
carries, times the worker's speed: the mean of the first four, then a
moving average weighing the newest by a quarter.  Executors measure
those durations around the worker's compute, so queueing on a busy link
never passes for a slow partition; the transfer of a task's tensors is
added from ``tensor_bytes`` and the worker's ``bandwidth`` instead
(``task(p, w)`` above).  Loads cost ``weight_bytes`` over the worker's
``bandwidth`` (``disk_bandwidth`` when cached) plus deserialisation at
:data:`DESERIALIZE_BYTES_PER_SECOND`.  All of it is plain arithmetic on
the events, so it is as deterministic as the rest.

Scheduler CPU
-------------
Every event costs time proportional to the tasks and workers it touches,
not to the size of the run: ready tasks sit in heaps by priority per
partition, idle workers in trees ordered by memory (so "the best idle
worker with at least this budget" is a logarithmic query), and workers
holding each partition in heaps by expected finish time.  A replica over
the network with no worker to spare, or with a busy coordinator link,
sums the remaining work over the partitions (linear in the partitions,
never in the crowd); one from local storage counts the whole tasks of
the partition's holders, stopping at the holder that covers the ready
tasks (linear in its holders at most).  Storing weights ahead of need
costs nothing unless some worker stores and claims nothing; then each
event looks at those workers and at the partitions (linear in both).  A
worker joining rebuilds those trees and a worker lost checks every
partition, both linear in the crowd; they are rare.  On the benchmark chain (20
partitions x 500 or 5,000 micro-batches, 1,000 workers) the scheduler
spends a third to a half of the CPU per task that Dask's threaded
scheduler spends on the same graph of no-op tasks under the cost rule, and
an eighth under the pipeline rule (cost 37-56, pipeline 11-17, Dask 96-119
microseconds in one run on a busy 2-core machine; ``python -m benchmarks
--only scale``).  Under the cost rule it grows with the micro-batches: a
task that waits behind busy holders is weighed again after every event.
"""

from __future__ import annotations

import heapq
import math
import random
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, Union

import networkx as nx

from .errors import PlanningError, WorkerLostError
from .units import format_bytes, parse_bytes

__all__ = [
    "TaskKey",
    "WorkerInfo",
    "WorkerJoined",
    "WorkerLost",
    "LoadFinished",
    "TaskFinished",
    "ResultsLost",
    "TaskOverdue",
    "Load",
    "Unload",
    "Run",
    "Store",
    "Event",
    "Action",
    "Scheduler",
]

#: A task: ``(partition name, micro-batch index)``.
TaskKey = tuple[str, int]


@dataclass(frozen=True)
class WorkerInfo:
    """What the scheduler knows about one worker of the crowd.

    Parameters
    ----------
    id
        Name of the worker, unique in the crowd.
    memory
        Memory budget in bytes (or a size string such as "64MB"): only
        partitions whose resident memory is at most this are loaded on it.
    speed
        Relative speed, higher is faster; only ratios between workers
        matter.  It weighs queue lengths, so a worker twice as fast is
        given about twice as many queued tasks.
    cached
        Names of partitions already on the worker's local storage; loading
        them costs no network transfer, so idle workers that cache a
        partition are preferred for it.
    resident
        Partition the worker already holds in memory from an earlier run,
        or None.  It counts as resident (and loaded) from the start, so
        tasks of that partition go to it without a ``Load``; if it does not
        fit ``memory`` or the run does not use it, it is only unloaded when
        the worker is given something else.
    bandwidth
        Bytes per second of the worker's link: what a partition's weights
        take to arrive (tiers 3 and 4).  The default is Wi-Fi, 10 MB/s.
    disk_bandwidth
        Bytes per second the worker reads cached partitions at (tier 2).
    floor
        The worker process's resident memory with no partition loaded (its
        idle floor), when it reports one.  Placement ignores it: budgets
        count what a partition adds above the floor, and the run report
        shows peaks next to it.
    stores
        The executor can put partitions on this worker's local storage
        without loading them (``Store`` actions): weights then arrive while
        it computes, ahead of the load that needs them.
    keeps_state
        The worker can keep a partition's state between runs (a decoder's
        key/value cache, :class:`~crowdgraph.runtime.TaskState`): its
        executor's ``run`` takes ``state=`` for it.  Placement ignores it;
        the driver pins the tasks that read what it kept (``pins``).
    """

    id: str
    memory: int
    speed: float = 1.0
    cached: frozenset[str] = frozenset()
    resident: str | None = None
    bandwidth: float = 10e6
    disk_bandwidth: float = 100e6
    floor: int | None = None
    stores: bool = False
    keeps_state: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.memory, str):  # "64MB", as people write budgets
            object.__setattr__(self, "memory", parse_bytes(self.memory))
        if not isinstance(self.memory, int) or isinstance(self.memory, bool) or self.memory < 0:
            raise ValueError(
                f"worker {self.id!r}: memory must be a byte count >= 0, got {self.memory!r}"
            )
        speed = float(self.speed)
        if not (math.isfinite(speed) and speed > 0 and math.isfinite(1.0 / speed)):
            raise ValueError(
                f"worker {self.id!r}: speed must be a finite number > 0, got {self.speed!r}"
            )
        for name in ("bandwidth", "disk_bandwidth"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(
                    f"worker {self.id!r}: {name} must be a finite number of bytes per second > 0, "
                    f"got {value!r}"
                )
        # Accept any iterable of names (a set, a list) and store it frozen.
        if not isinstance(self.cached, frozenset):
            object.__setattr__(self, "cached", frozenset(self.cached))


# -- events: what executors report -----------------------------------------


@dataclass(frozen=True)
class WorkerJoined:
    """A worker joined the crowd; it is a candidate for tasks at once."""

    worker: WorkerInfo


@dataclass(frozen=True)
class WorkerLost:
    """A worker left or died; its resident partition and queue are gone."""

    worker: str


@dataclass(frozen=True)
class LoadFinished:
    """A worker finished loading a partition (bookkeeping only)."""

    worker: str
    partition: str


@dataclass(frozen=True)
class TaskFinished:
    """A worker finished a task; its outputs are available.

    ``duration`` is the seconds the worker spent on it, when the executor
    measured them; the scheduler's estimate of the partition's cost
    follows these measurements (see "Cost" in the module docstring).
    """

    worker: str
    key: TaskKey
    duration: float | None = None


@dataclass(frozen=True)
class TaskOverdue:
    """The task ``worker`` runs has taken much longer than its estimate,
    though the worker still answers (a slow phone, thermal throttling).

    The driver sends it; the scheduler answers with a backup copy of the
    task on an idle worker, if there is one, and places what that new
    holder of the partition can take, as after any event.  Whichever copy finishes
    first wins; the other's result is dropped.
    """

    worker: str
    key: TaskKey


@dataclass(frozen=True)
class ResultsLost:
    """Finished results that are gone (they lived on a lost worker).

    Executors that keep results on workers (Dask) send this after a loss;
    the named tasks are computed again.
    """

    keys: tuple[TaskKey, ...]


# -- actions: what executors carry out, in order per worker -----------------


@dataclass(frozen=True)
class Load:
    """Load a partition's weights on a worker (it holds nothing then)."""

    worker: str
    partition: str


@dataclass(frozen=True)
class Unload:
    """Drop the partition a worker holds, freeing its memory."""

    worker: str
    partition: str


@dataclass(frozen=True)
class Store:
    """Put a partition's weights on a worker's local storage, not in its
    memory, so that its later ``Load`` reads them from there."""

    worker: str
    partition: str


@dataclass(frozen=True)
class Run:
    """Run a task on a worker, after everything given to it before.

    ``tier`` (1 to 4) is the placement tier that chose the worker; see the
    module docstring.  It is reported so that runs can be explained.
    """

    worker: str
    key: TaskKey
    tier: int


Event = Union[WorkerJoined, WorkerLost, LoadFinished, TaskFinished, ResultsLost, TaskOverdue]
Action = Union[Load, Unload, Run, Store]

#: Placement policies; see "Policies" in the module docstring.
Policy = Literal["cost", "pipeline", "greedy"]
POLICIES: tuple[str, ...] = ("cost", "pipeline", "greedy")

#: FLOPs per second of a speed-1.0 worker, for the first estimate of a
#: partition's cost before any task of it was measured (a mid-range phone).
FLOPS_PER_SECOND = 5e9

#: Bytes per second at which a worker turns received weights into a session.
DESERIALIZE_BYTES_PER_SECOND = 200e6

#: Tasks a busy holder may have queued behind the one it runs, so that it
#: starts the next one without waiting a round trip for it.
PREFETCH = 1

# Task states.
_WAITING, _READY, _QUEUED, _FINISHED = 0, 1, 2, 3

# Leaf value of an empty slot in the idle-worker trees; larger than every
# (1 / speed, rank, id) key.
_NONE: tuple[float, float, str] = (math.inf, math.inf, "")


class _Worker:
    """Mutable state of one live worker."""

    __slots__ = (
        "id", "info", "memory", "speed", "inv_speed", "rank", "cached_fit",
        "resident", "loads", "queue", "version", "epoch", "pos", "tree", "loading",
        "stored", "prefetched", "sent", "ahead", "since",
    )

    def __init__(self, info: WorkerInfo, rank: int, need: Mapping[str, int]) -> None:
        self.id = info.id
        self.info = info
        self.memory = info.memory
        self.speed = float(info.speed)
        self.inv_speed = 1 / self.speed  # == (0 + 1) / speed, the idle load
        self.rank = rank
        # Cached partitions this worker can actually hold; sorted so that
        # nothing depends on the iteration order of a set of strings.
        self.cached_fit = sorted(p for p in info.cached if p in need and need[p] <= info.memory)
        self.resident: str | None = None
        self.loads: deque[str] = deque()  # Loads issued, LoadFinished not yet seen
        self.queue: dict[TaskKey, None] = {}  # insertion-ordered set
        self.version = 0  # stamps entries of the holder heaps
        self.epoch = -1  # stamps entries of the caching heaps; -1 when busy
        self.pos = -1  # slot in the idle trees
        self.tree: _MinTree | None = None  # idle tree this worker sits in
        self.loading = 0.0  # speed x seconds of its unconfirmed load, for the cost rule
        # Partitions on its local storage: cached, or loaded in this run.
        self.stored: set[str] = set(info.cached)
        self.sent: deque[int] = deque()  # star bytes of each unconfirmed load
        self.prefetched: set[str] = set()  # partitions stored ahead of need on it (Store)
        self.ahead: str | None = None  # the one it is expected to load next, if claimed
        self.since = 0.0  # when the head of its queue (with its unconfirmed load) started


class _MinTree:
    """Segment tree of idle-worker keys over workers sorted by memory.

    ``suffix_min(i)`` gives the best idle worker among those with the
    ``i``-th smallest budget or more, i.e. the best one that fits a need.
    """

    __slots__ = ("size", "t")

    def __init__(self, n: int) -> None:
        size = 1
        while size < n:
            size *= 2
        self.size = size
        self.t: list[tuple[float, float, str]] = [_NONE] * (2 * size)

    def set(self, i: int, value: tuple[float, float, str]) -> None:
        t = self.t
        i += self.size
        t[i] = value
        i >>= 1
        while i:
            a, b = t[2 * i], t[2 * i + 1]
            new = a if a <= b else b
            if t[i] == new:
                break
            t[i] = new
            i >>= 1

    def suffix_min(self, lo: int) -> tuple[float, float, str]:
        t = self.t
        if lo == 0:
            return t[1]
        best = _NONE
        lo += self.size
        hi = 2 * self.size
        while lo < hi:
            if lo & 1:
                if t[lo] < best:
                    best = t[lo]
                lo += 1
            if hi & 1:
                hi -= 1
                if t[hi] < best:
                    best = t[hi]
            lo >>= 1
            hi >>= 1
        return best


class Scheduler:
    """Place tasks on workers by the rules of this module; pure and deterministic.

    Parameters
    ----------
    tasks
        Task graph.  Nodes are :data:`TaskKey`; node attribute
        ``"partition"`` (str) names the partition the task runs and the
        optional ``"priority"`` (any sortable value, lower first) orders
        ready tasks, by default the key itself.  An edge ``u -> v`` means
        ``v`` may only run after ``u`` finished.
    partition_memory
        Resident memory in bytes of every partition the tasks use.
    workers
        The crowd at the start; more may join later.
    seed
        Seed of the tie-break permutation of worker ids.  Same seed, same
        inputs and same events give the same actions.
    policy
        ``"cost"`` (replicas where they pay), ``"pipeline"`` (one holder
        per partition) or ``"greedy"`` (any idle worker, by tier); see
        "Placement" in the module docstring.
    weight_bytes
        Bytes of each partition's weights, what a load transfers (default:
        its ``partition_memory``).
    flops
        Floating-point operations of one task of each partition, the first
        estimate of its duration (default 0: learnt from ``TaskFinished``).
    star_bandwidth
        Bytes per second of the coordinator's link, when every transfer
        crosses it (a star); loads then queue behind the bytes already on
        their way.  Default: no shared link.
    tensor_bytes
        Bytes one task of each partition receives and sends (default 0),
        what its queued tasks put on the star.
    pins
        Tasks that must run on a given worker while it holds their
        partition (state affinity, see "Placement").
    estimates
        Seconds one task of each partition took on a speed-1.0 worker in
        earlier runs (see :attr:`measured_estimates`); they replace the
        FLOPs seed and count as one measurement (see "Estimates").

    Raises
    ------
    PlanningError
        Before anything runs, if the crowd is empty, two workers share an
        id, the graph has a cycle or lacks a partition name or memory
        figure, or some partition fits no worker's budget.

    Examples
    --------
    Two partitions and one worker that can hold only one of them at a time:

    >>> g = nx.DiGraph()
    >>> g.add_node(("a", 0), partition="a")
    >>> g.add_node(("b", 0), partition="b")
    >>> g.add_edge(("a", 0), ("b", 0))
    >>> s = Scheduler(g, {"a": 100, "b": 100}, [WorkerInfo("w1", memory=150)])
    >>> s.start()
    [Load(worker='w1', partition='a'), Run(worker='w1', key=('a', 0), tier=3)]
    >>> s.handle(LoadFinished("w1", "a"))
    []
    >>> for action in s.handle(TaskFinished("w1", ("a", 0))):
    ...     print(action)
    Unload(worker='w1', partition='a')
    Load(worker='w1', partition='b')
    Run(worker='w1', key=('b', 0), tier=4)
    >>> s.handle(TaskFinished("w1", ("b", 0))), s.done
    ([], True)
    """

    def __init__(
        self,
        tasks: nx.DiGraph,
        partition_memory: Mapping[str, int],
        workers: Iterable[WorkerInfo],
        seed: int = 0,
        *,
        policy: Policy = "cost",
        weight_bytes: Mapping[str, int] | None = None,
        flops: Mapping[str, float] | None = None,
        star_bandwidth: float = math.inf,
        tensor_bytes: Mapping[str, int] | None = None,
        pins: Mapping[TaskKey, str] | None = None,
        estimates: Mapping[str, float] | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise PlanningError(
                f"policy must be one of {', '.join(map(repr, POLICIES))}, not {policy!r}"
            )
        self.policy: Policy = policy
        infos = list(workers)
        if not infos:
            raise PlanningError(
                "the crowd is empty: give the run at least one worker whose budget "
                "fits the largest partition"
            )
        ids = [w.id for w in infos]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise PlanningError(f"worker ids must be unique; repeated: {', '.join(map(repr, dup))}")
        if not nx.is_directed_acyclic_graph(tasks):
            raise PlanningError("the task graph has a cycle, so no order can run it")

        part: dict[TaskKey, str] = {}
        prio: dict[TaskKey, Any] = {}
        for key, attrs in tasks.nodes(data=True):
            p = attrs.get("partition")
            if not isinstance(p, str):
                raise PlanningError(f"task {key!r} has no 'partition' name")
            if p not in partition_memory:
                raise PlanningError(
                    f"partition {p!r} (used by task {key!r}) has no memory figure in "
                    "partition_memory"
                )
            part[key] = p
            prio[key] = attrs.get("priority", key)
        used = sorted(set(part.values()))
        self._need: dict[str, int] = {p: int(partition_memory[p]) for p in used}
        largest = max(w.memory for w in infos)
        for p in sorted(used, key=lambda q: (-self._need[q], q)):
            if self._need[p] > largest:
                raise PlanningError(
                    f"partition {p!r} needs {format_bytes(self._need[p])} of memory but the "
                    f"largest budget in the crowd is {format_bytes(largest)}; give at least "
                    f"one worker a budget of {format_bytes(self._need[p])} or more, or "
                    "recompile the model with a smaller memory_budget"
                )

        # Cost figures (see "Estimates" in the module docstring).
        self._weights: dict[str, float] = {
            p: float((weight_bytes or {}).get(p, self._need[p])) for p in used
        }
        self._estimate: dict[str, float] = {
            p: float((flops or {}).get(p, 0)) / FLOPS_PER_SECOND for p in used
        }
        self._measured: dict[str, int] = {p: 0 for p in used}
        for p, seconds in (estimates or {}).items():
            if p in self._estimate:
                self._estimate[p], self._measured[p] = float(seconds), 1
        self._star_bandwidth = float(star_bandwidth)
        self._tensor_bytes = {p: int((tensor_bytes or {}).get(p, 0)) for p in used}
        # Bytes on their way through the star: the weights of unconfirmed
        # loads and the tensors of queued tasks.
        self._star_bytes = 0
        # Bytes the star must still carry before the run can end: the
        # tensors of every unfinished task, the weights of unconfirmed
        # loads and of partitions with work that no worker stores yet.
        stored = {p for info in infos for p in info.cached} | {info.resident for info in infos}
        self._uncrossed: dict[str, None] = dict.fromkeys(p for p in used if p not in stored)
        self._star_left = sum(int(self._weights[p]) for p in self._uncrossed)

        self._part = part
        self._prio = prio
        self._pins = dict(pins or {})
        self._preds: dict[TaskKey, tuple[TaskKey, ...]] = {
            k: tuple(tasks.predecessors(k)) for k in part
        }
        self._succs: dict[TaskKey, tuple[TaskKey, ...]] = {
            k: tuple(tasks.successors(k)) for k in part
        }
        self._n_tasks = len(part)
        # The stages each partition feeds (partitions reading its outputs)
        # and the stages feeding it, for the cost rule's replicas.
        fed: dict[str, set[str]] = {p: set() for p in used}
        feeds: dict[str, set[str]] = {p: set() for p in used}
        for u, v in tasks.edges:
            if part[u] != part[v]:
                fed[part[u]].add(part[v])
                feeds[part[v]].add(part[u])
        self._fed: dict[str, tuple[str, ...]] = {p: tuple(sorted(fed[p])) for p in used}
        self._feeds: dict[str, tuple[str, ...]] = {p: tuple(sorted(feeds[p])) for p in used}
        # Partitions in plan order (their first task's priority), the order
        # their weights are stored ahead of need.
        first: dict[str, Any] = {}
        for key, p in part.items():
            if p not in first or prio[key] < first[p]:
                first[p] = prio[key]
        self._plan_order = sorted(used, key=lambda p: (first[p], p))

        # Tie-break: a seeded permutation of the sorted ids, independent of
        # the order the crowd was given in.
        order = sorted(ids)
        random.Random(seed).shuffle(order)
        self._rank: dict[str, int] = {wid: r for r, wid in enumerate(order)}

        # Task state.
        self._state: dict[TaskKey, int] = {}
        self._missing: dict[TaskKey, int] = {}  # unfinished predecessors
        self._where: dict[TaskKey, str] = {}  # queued task -> worker
        self._copies: dict[TaskKey, str] = {}  # queued task -> worker of its second copy
        self._audit_runs: set[tuple[str, TaskKey]] = set()  # (worker, finished task) run again as a check
        self._produced_on: dict[TaskKey, str] = {}  # finished task -> worker
        self._unfinished: dict[str, int] = {p: 0 for p in used}
        self._ready_heap: dict[str, list[tuple[Any, TaskKey]]] = {p: [] for p in used}
        self._ready_n: dict[str, int] = {p: 0 for p in used}
        self._ready_parts: dict[str, None] = {}  # partitions with ready tasks
        self._t1_todo: dict[str, None] = {}  # held partitions whose ready tasks to place again

        # Worker state.
        self._now = 0.0  # the caller's clock (handle(now=)), for the cost rule
        self._live: dict[str, _Worker] = {}
        self._crowd_speed = 0.0  # summed over live workers
        self._infos: dict[str, WorkerInfo] = {}  # live views kept in step
        self._resident: dict[str, str | None] = {}
        self._lost: list[str] = []
        self._idle_n = 0
        self._clock = 0  # stamps for lazily deleted heap entries
        self._holders: dict[str, dict[str, None]] = {p: {} for p in used}
        self._holder_heap: dict[str, list[tuple[float, int, int, str]]] = {p: [] for p in used}
        self._idle_holders: dict[str, int] = {p: 0 for p in used}
        self._queued_n: dict[str, int] = {p: 0 for p in used}  # tasks in workers' queues
        self._holder_speed: dict[str, float] = {p: 0.0 for p in used}  # summed over holders
        self._loading: dict[str, float] = {p: 0.0 for p in used}  # speed x load seconds left
        self._deferred: dict[str, None] = {}  # held partitions whose ready tasks wait a turn
        self._caching_heap: dict[str, list[tuple[float, int, int, str]]] = {p: [] for p in used}
        self._ahead_of: dict[str, str] = {}  # partition -> worker it is stored ahead on
        self._unclaimed: dict[str, None] = {}  # live workers that store and claim nothing
        self._mem_sorted: list[int] = []
        self._empty_tree = _MinTree(0)
        self._holding_tree = _MinTree(0)
        self._spent_tree = _MinTree(0)  # holding a partition with no task left (cost rule)

        for info in infos:
            self._add_worker(info)
        self._rebuild_trees()
        for w in sorted(self._live.values(), key=lambda w: w.rank):
            self._become_idle(w)

        for key in part:
            self._unfinished[part[key]] += 1
            self._state[key] = _WAITING
            self._missing[key] = len(self._preds[key])
        self._star_left += sum(n * self._tensor_bytes[p] for p, n in self._unfinished.items())
        self._parts_left = sum(1 for n in self._unfinished.values() if n)  # partitions with work
        for key in part:
            if self._missing[key] == 0:
                self._make_ready(key)

    # -- read-only views ----------------------------------------------------

    @property
    def done(self) -> bool:
        """True when every task has finished."""
        return len(self._produced_on) == self._n_tasks

    @property
    def workers(self) -> Mapping[str, WorkerInfo]:
        """Live workers by id (a live, read-only view)."""
        return MappingProxyType(self._infos)

    @property
    def resident(self) -> Mapping[str, str | None]:
        """Partition each live worker holds or is loading, or None (a live view)."""
        return MappingProxyType(self._resident)

    @property
    def loaded(self) -> Mapping[str, str | None]:
        """Partition each live worker has finished loading and still holds, or None.

        Unlike :attr:`resident`, this waits for ``LoadFinished``.
        """
        return MappingProxyType({
            wid: (w.resident if not w.loads else None) for wid, w in self._live.items()
        })

    @property
    def finished(self) -> AbstractSet[TaskKey]:
        """Finished tasks (a live, read-only view)."""
        return self._produced_on.keys()

    @property
    def produced_on(self) -> Mapping[TaskKey, str]:
        """Worker that produced each finished task (a live, read-only view)."""
        return MappingProxyType(self._produced_on)

    @property
    def queues(self) -> Mapping[str, tuple[TaskKey, ...]]:
        """Tasks issued as ``Run`` but not finished, per live worker, in order."""
        return MappingProxyType({wid: tuple(w.queue) for wid, w in self._live.items()})

    def queue(self, worker: str) -> tuple[TaskKey, ...]:
        """Tasks issued to ``worker`` as ``Run`` but not finished, in order."""
        w = self._live.get(worker)
        return tuple(w.queue) if w is not None else ()

    def estimate(self, partition: str) -> float:
        """Expected seconds of one task of ``partition`` on a speed-1.0 worker."""
        return self._estimate[partition]

    @property
    def measured_estimates(self) -> dict[str, float]:
        """Estimates of the partitions with a measured task, to seed a later
        run's scheduler (``estimates=``) on the same crowd."""
        return {p: e for p, e in self._estimate.items() if self._measured[p]}

    @property
    def pins(self) -> Mapping[TaskKey, str]:
        """Tasks pinned to a worker (state affinity)."""
        return MappingProxyType(self._pins)

    @property
    def copies(self) -> Mapping[TaskKey, str]:
        """Tasks with a backup copy still queued, and the worker of that copy."""
        return MappingProxyType(self._copies)

    @property
    def ready(self) -> tuple[TaskKey, ...]:
        """Ready tasks not yet placed, in priority order.

        It scans every task: meant for tests and reports, not for each event.
        """
        keys = [k for k, s in self._state.items() if s == _READY]
        keys.sort(key=lambda k: (self._prio[k], k))
        return tuple(keys)

    @property
    def lost(self) -> tuple[str, ...]:
        """Ids of the workers lost and not back, in order of (first) loss."""
        return tuple(dict.fromkeys(w for w in self._lost if w not in self._live))

    @property
    def tie_break(self) -> Mapping[str, int]:
        """Rank of every worker seen in the final tie-break (lower wins)."""
        return MappingProxyType(self._rank)

    # -- driving ------------------------------------------------------------

    def start(self, now: float | None = None) -> list[Action]:
        """Return the first actions: place every task that is ready at the start.

        ``now`` is the caller's clock in seconds, as for :meth:`handle`.
        """
        self._advance(now)
        actions = self._place()
        self._store_ahead(actions)
        return actions

    def handle(self, event: Event, now: float | None = None) -> list[Action]:
        """Update the state with one event and return the actions it enables.

        ``now`` is when the event happened, in seconds of the caller's clock
        (any origin, never going back): with it the cost rule counts a
        holder's running task from when it started instead of whole (see
        "The rules").  Without it the clock stands still.

        Raises
        ------
        WorkerLostError
            After a loss, if unfinished work remains and no live worker can
            hold one of the partitions it needs (or no worker is left).
        TypeError
            If ``event`` is not one of the :data:`Event` types.
        """
        self._advance(now)
        if isinstance(event, TaskFinished):
            self._on_task_finished(event.worker, event.key, event.duration)
        elif isinstance(event, LoadFinished):
            # Bookkeeping only: executors run each worker's actions in order,
            # so nothing waits for a load to finish.
            w = self._live.get(event.worker)
            if w is not None and w.loads and w.loads[0] == event.partition:
                w.loads.popleft()
                sent = w.sent.popleft()
                self._star_bytes -= sent
                self._star_left -= sent
                if not w.loads and w.loading:  # its resident partition is loaded now
                    self._loading[w.resident] -= w.loading  # type: ignore[index]
                    w.loading = 0.0
                    w.since = self._now  # (its first task starts now)
        elif isinstance(event, WorkerLost):
            self._on_worker_lost(event.worker)
        elif isinstance(event, WorkerJoined):
            self._on_worker_joined(event.worker)
        elif isinstance(event, ResultsLost):
            self._on_results_lost(event.keys)
        elif isinstance(event, TaskOverdue):
            actions = self._back_up(event.worker, event.key)
            if actions:  # the backup's worker is a new holder: what waits for one is placed too
                actions += self._place()
                self._store_ahead(actions)
            return actions
        else:
            raise TypeError(f"not a scheduler event: {event!r}")
        actions = self._place()
        self._store_ahead(actions)
        return actions

    def _advance(self, now: float | None) -> None:
        if now is not None:
            self._now = max(self._now, float(now))

    # -- events -------------------------------------------------------------

    def _on_task_finished(self, wid: str, key: TaskKey, duration: float | None) -> None:
        w = self._live.get(wid)
        if w is None or key not in w.queue:
            return  # a late duplicate, or from a worker already given up
        if (wid, key) in self._audit_runs:
            self._end_audit_run(w, key)
            return
        slower = self._copies.get(key) if self._where.get(key) == wid else self._where.get(key)
        self._dequeue(w, key)
        if self._state[key] == _FINISHED:
            return  # the slower copy of a task with a backup: its result is dropped
        if duration is not None and math.isfinite(duration) and duration >= 0:
            self._learn(self._part[key], duration * w.speed)
        if slower is not None and slower != wid:
            # The straggler still runs its copy: what waits behind it runs elsewhere.
            s = self._live[slower]
            for behind in list(s.queue)[1:]:
                self._dequeue(s, behind)
                self._make_ready(behind)
        state, missing = self._state, self._missing
        state[key] = _FINISHED
        self._produced_on[key] = wid
        p = self._part[key]
        self._unfinished[p] -= 1
        self._parts_left -= not self._unfinished[p]
        self._star_left -= self._tensor_bytes[p]
        if not self._unfinished[p] and p in self._ahead_of:
            self._end_claim(self._live[self._ahead_of[p]])
        if not self._unfinished[p]:
            for h in self._holders[p]:
                x = self._live[h]
                if x.tree is not None:  # idle: what it stored ahead counts as cached now
                    for q in sorted(x.prefetched):
                        self._offer_cached(x, q)
                    self._retree(x)  # under the cost rule, the first to swap
        for s in self._succs[key]:
            missing[s] -= 1
            if missing[s] == 0 and state[s] == _WAITING:
                self._make_ready(s)

    def _back_up(self, wid: str, key: TaskKey) -> list[Action]:
        """A second copy of ``key``, running on ``wid``, on the best idle worker."""
        w = self._live.get(wid)
        if (w is None or not w.queue or next(iter(w.queue)) != key or key in self._copies
                or self._state[key] == _FINISHED):
            return []  # not running there (any more), backed up already, or done elsewhere
        p = self._part[key]
        if self._idle_holders[p]:
            backup, tier = self._best_idle_holder(p), 1
        else:
            tier, backup = self._best_idle(p)  # type: ignore[assignment]
        if backup is None:
            return []
        actions: list[Action] = []
        self._assign(key, backup, tier, actions)
        self._where[key] = wid  # the first copy stays the task's home
        self._copies[key] = backup.id
        return actions

    # -- audit runs: a finished task run again elsewhere, as a check ------------

    def place_audit(self, key: TaskKey, avoid: Iterable[str]) -> list[Action]:
        """Run finished task ``key`` again on an idle worker not in ``avoid``.

        The copy changes nothing the schedule depends on: the task stays
        finished, its result stays the one first produced, and the copy's
        ``TaskFinished`` only frees its worker.  The idle worker is the one
        expected to finish it first (load, if it does not hold the
        partition, then the task at its speed), then the seeded tie-break;
        a holder of a partition with tasks left is not swapped out for a
        check.  With no such worker idle, the check queues behind the
        current task of a busy holder of the partition with at most
        :data:`PREFETCH` queued.  Returns no actions when neither exists
        now (ask again after a later event).
        """
        if self._state.get(key) != _FINISHED:
            return []
        p, shun = self._part[key], set(avoid)
        best: tuple[float, int, int] | None = None
        chosen: _Worker | None = None
        for w in self._live.values():
            if w.queue or w.id in shun or w.memory < self._need[p]:
                continue
            if w.resident == p:
                tier, load = 1, 0.0
            elif w.resident is not None and self._unfinished.get(w.resident, 0):
                continue
            else:
                tier = 2 if p in w.info.cached else 3 if w.resident is None else 4
                load = self._load_seconds(w, p)
            rank = (load + self._estimate[p] / w.speed, tier, w.rank)
            if best is None or rank < best:
                best, chosen = rank, w
        if chosen is None:  # behind a busy holder's current task, as a prefetched one would be
            holders = [self._live[h] for h in self._holders[p] if h not in shun]
            short = [w for w in holders if len(w.queue) <= PREFETCH and key not in w.queue]
            if short:
                chosen = min(short, key=lambda w: ((len(w.queue) + 1) / w.speed, w.rank))
                best = (0.0, 1, chosen.rank)
        if best is None or chosen is None:
            return []
        actions: list[Action] = []
        home = self._where.get(key)
        self._assign(key, chosen, best[1], actions)
        self._state[key] = _FINISHED
        if home is None:
            del self._where[key]
        else:
            self._where[key] = home
        self._audit_runs.add((chosen.id, key))
        return actions

    def cancel_audit(self, worker: str, key: TaskKey) -> None:
        """Forget the check of ``key`` queued on ``worker`` (its result is no
        longer wanted); the worker counts as free of it at once."""
        w = self._live.get(worker)
        if w is not None and (worker, key) in self._audit_runs:
            self._end_audit_run(w, key)

    @property
    def audit_runs(self) -> AbstractSet[tuple[str, TaskKey]]:
        """(worker, task) of every check queued and not finished."""
        return frozenset(self._audit_runs)

    def _end_audit_run(self, w: _Worker, key: TaskKey) -> None:
        self._audit_runs.discard((w.id, key))
        self._leave_queue(w, key)

    def _learn(self, p: str, seconds: float) -> None:
        """Fold one measured duration (at speed 1.0) into ``p``'s estimate.

        The mean of the first four measurements, then a moving average
        that weighs the newest by a quarter; the FLOPs seed only counts
        until the first measurement.
        """
        n = self._measured[p] = self._measured[p] + 1
        if n == 1:
            self._estimate[p] = seconds
        else:
            self._estimate[p] += (seconds - self._estimate[p]) / min(n, 4)

    def _on_worker_lost(self, wid: str) -> None:
        w = self._live.pop(wid, None)
        if w is None:
            return
        self._lost.append(wid)
        self._crowd_speed = sum(x.speed for x in self._live.values())
        if w.ahead is not None:
            del self._ahead_of[w.ahead]
        self._unclaimed.pop(wid, None)
        del self._infos[wid], self._resident[wid]
        if not w.queue:
            self._idle_n -= 1
            if self._holds(w):
                self._idle_holders[w.resident] -= 1  # type: ignore[index]
        if w.tree is not None:
            w.tree.set(w.pos, _NONE)
            w.tree = None
        w.epoch = -1
        if w.resident is not None and self._holders.get(w.resident, {}).pop(wid, 0) is None:
            self._holder_left(w, w.resident)
        self._star_bytes -= sum(w.sent)
        self._star_left -= sum(w.sent)
        queued = list(w.queue)
        for key in queued:
            self._queued_n[self._part[key]] -= 1
            self._star_bytes -= self._tensor_bytes[self._part[key]]
        w.queue.clear()
        for key in queued:
            if (wid, key) in self._audit_runs:  # a check of a finished task: the driver asks again
                self._audit_runs.discard((wid, key))
            elif self._copies.get(key) == wid:  # a backup copy: the first goes on alone
                del self._copies[key]
            elif key in self._copies:  # the backup copy goes on alone
                self._where[key] = self._copies.pop(key)
            else:
                del self._where[key]
                if self._state[key] != _FINISHED:  # else the slower copy, no longer needed
                    self._make_ready(key)
        self._check_feasible()

    def _on_worker_joined(self, info: WorkerInfo) -> None:
        if info.id in self._live:
            return  # announced twice
        if info.id not in self._rank:
            self._rank[info.id] = len(self._rank)
        w = self._add_worker(info)
        self._rebuild_trees()
        self._become_idle(w)

    def _add_worker(self, info: WorkerInfo) -> _Worker:
        w = _Worker(info, self._rank[info.id], self._need)
        self._live[info.id] = w
        self._crowd_speed += w.speed
        self._infos[info.id] = info
        if info.stores:
            self._unclaimed[info.id] = None
        self._resident[info.id] = w.resident = p = info.resident
        # Warm from an earlier run: a holder of its partition if it fits.
        if p is not None and p in self._need and self._need[p] <= w.memory:
            self._holders[p][info.id] = None
            self._holder_speed[p] += w.speed
        return w

    def _holder_left(self, w: _Worker, p: str) -> None:
        """Take ``w`` out of the sums the cost rule keeps over ``p``'s holders."""
        if self._holders[p]:
            self._holder_speed[p] -= w.speed
            self._loading[p] -= w.loading
        else:  # start again from exact zeros
            self._holder_speed[p] = self._loading[p] = 0.0
        w.loading = 0.0

    def _on_results_lost(self, keys: Iterable[TaskKey]) -> None:
        state, missing = self._state, self._missing
        again: list[TaskKey] = []
        revived: dict[str, None] = {}  # partitions that had no work left and have some again
        for key in keys:
            if state.get(key) != _FINISHED:
                continue
            del self._produced_on[key]
            if not self._unfinished[self._part[key]]:
                revived[self._part[key]] = None
            self._parts_left += not self._unfinished[self._part[key]]
            self._unfinished[self._part[key]] += 1
            self._star_left += self._tensor_bytes[self._part[key]]
            state[key] = _WAITING
            again.append(key)
            for s in self._succs[key]:
                missing[s] += 1
                if state[s] == _READY:
                    self._unready(s)
                elif state[s] == _QUEUED:
                    if s in self._copies:
                        self._dequeue(self._live[self._copies[s]], s)
                    self._dequeue(self._live[self._where[s]], s)
                    state[s] = _WAITING
        # Decided once every key is counted, so the order of the keys does not matter.
        for key in again:
            if key in self._where:  # the slower copy of a backed-up task still runs
                if missing[key] == 0:
                    state[key] = _QUEUED  # it delivers
                    continue
                self._dequeue(self._live[self._where[key]], key)  # its inputs are lost too
            if missing[key] == 0:
                self._make_ready(key)
        # Their idle holders are no longer spent: neither the first to swap
        # nor lured by what they stored ahead (_best_idle skips that offer).
        for p in revived:
            for h in self._holders[p]:
                x = self._live[h]
                if x.tree is not None:
                    self._retree(x)
        # The lost results may belong to a partition no live worker can hold.
        self._check_feasible()

    def _check_feasible(self) -> None:
        if self._n_tasks == len(self._produced_on):
            return
        lost = ", ".join(map(repr, dict.fromkeys(self._lost)))
        if not self._live:
            raise WorkerLostError(
                f"every worker was lost ({lost}) with "
                f"{self._n_tasks - len(self._produced_on)} tasks unfinished; "
                "add workers and run again"
            )
        largest = max(w.memory for w in self._live.values())
        stuck = sorted(
            (p for p, n in self._unfinished.items() if n and self._need[p] > largest),
            key=lambda p: (-self._need[p], p),
        )
        if stuck:
            p = stuck[0]
            raise WorkerLostError(
                f"lost worker(s) {lost}; no remaining worker can hold partition {p!r} "
                f"({format_bytes(self._need[p])}; largest remaining budget "
                f"{format_bytes(largest)}) and it still has tasks to run; add a worker "
                f"with a budget of at least {format_bytes(self._need[p])}, or recompile "
                "the model with a smaller memory_budget"
            )

    # -- task and worker bookkeeping ------------------------------------------

    def _make_ready(self, key: TaskKey) -> None:
        p = self._part[key]
        self._state[key] = _READY
        heapq.heappush(self._ready_heap[p], (self._prio[key], key))
        self._ready_n[p] += 1
        self._ready_parts[p] = None
        if self._holders[p]:
            self._t1_todo[p] = None

    def _unready(self, key: TaskKey) -> None:
        # The heap entry stays and is skipped when met (state is checked).
        p = self._part[key]
        self._state[key] = _WAITING
        self._ready_n[p] -= 1
        if not self._ready_n[p]:
            del self._ready_parts[p]

    def _dequeue(self, w: _Worker, key: TaskKey) -> None:
        # Of a task with two copies, the other one stays queued where it is.
        other = self._copies.pop(key, None)
        if self._where.get(key) == w.id:
            if other is None:
                del self._where[key]
            else:
                self._where[key] = other
        self._leave_queue(w, key)

    def _leave_queue(self, w: _Worker, key: TaskKey) -> None:
        if next(iter(w.queue)) == key:
            w.since = self._now  # (the next in its queue starts now)
        del w.queue[key]
        p = self._part[key]
        self._queued_n[p] -= 1
        self._star_bytes -= self._tensor_bytes[p]
        if w.queue:
            self._push_holder(w)
        else:
            self._become_idle(w)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _push_holder(self, w: _Worker) -> None:
        p = w.resident
        if p is None or w.id not in self._holders.get(p, ()):
            return
        w.version = self._tick()
        heap = self._holder_heap[p]
        heapq.heappush(heap, ((len(w.queue) + 1) / w.speed, w.rank, w.version, w.id))
        if len(heap) > 4 * len(self._holders[p]) + 16:
            # Too many stale entries: rebuild from the live holders.
            live = self._live
            heap[:] = [
                ((len(x.queue) + 1) / x.speed, x.rank, x.version, x.id)
                for x in (live[h] for h in self._holders[p])
            ]
            heapq.heapify(heap)

    def _holds(self, w: _Worker) -> bool:
        """Whether ``w`` counts as a holder of its resident partition."""
        return w.resident is not None and w.id in self._holders.get(w.resident, ())

    def _become_idle(self, w: _Worker) -> None:
        self._idle_n += 1
        if self._holds(w):
            self._idle_holders[w.resident] += 1  # type: ignore[index]
        w.epoch = self._tick()
        tree = self._tree_for(w)
        tree.set(w.pos, (w.inv_speed, w.rank, w.id))
        w.tree = tree
        for p in w.cached_fit:
            if self._caches(w, p):
                self._offer_cached(w, p)
        self._push_holder(w)

    def _offer_cached(self, w: _Worker, p: str) -> None:
        """Put idle ``w`` in ``p``'s caching heap (tier 2), stamped with its idle epoch."""
        heapq.heappush(self._caching_heap[p], (w.inv_speed, w.rank, w.epoch, w.id))

    def _caches(self, w: _Worker, p: str) -> bool:
        """Whether ``w`` counts as caching ``p`` now (tier 2): a partition stored
        ahead of need only counts once the one ``w`` holds has no work left,
        so that it never lures a holder away from work still coming its way."""
        return p not in w.prefetched or w.resident is None or not self._unfinished.get(w.resident, 0)

    def _tree_for(self, w: _Worker) -> _MinTree:
        """The idle tree of ``w``: empty, holding a partition with tasks left,
        or (cost rule) holding one whose tasks are all done, swapped first."""
        if w.resident is None:
            return self._empty_tree
        if self.policy == "cost" and not self._unfinished.get(w.resident, 0):
            return self._spent_tree
        return self._holding_tree

    def _retree(self, w: _Worker) -> None:
        """Move idle ``w`` to the tree :meth:`_tree_for` puts it in now (its partition's work changed)."""
        tree = self._tree_for(w)
        if tree is not w.tree:
            w.tree.set(w.pos, _NONE)  # type: ignore[union-attr]
            w.tree = tree
            tree.set(w.pos, (w.inv_speed, w.rank, w.id))

    def _become_busy(self, w: _Worker) -> None:
        self._idle_n -= 1
        if self._holds(w):
            self._idle_holders[w.resident] -= 1  # type: ignore[index]
        w.epoch = -1
        if w.tree is not None:
            w.tree.set(w.pos, _NONE)
            w.tree = None

    def _rebuild_trees(self) -> None:
        workers = sorted(self._live.values(), key=lambda w: (w.memory, w.rank))
        self._mem_sorted = [w.memory for w in workers]
        self._empty_tree = _MinTree(len(workers))
        self._holding_tree = _MinTree(len(workers))
        self._spent_tree = _MinTree(len(workers))
        for i, w in enumerate(workers):
            w.pos = i
            if w.tree is not None:  # idle: put it back in its tree
                tree = self._tree_for(w)
                tree.set(i, (w.inv_speed, w.rank, w.id))
                w.tree = tree

    # -- placement ----------------------------------------------------------

    def _place(self) -> list[Action]:
        """Place ready tasks until none has a candidate worker."""
        actions: list[Action] = []
        if self._deferred:  # what waited a turn is weighed again after every event
            self._t1_todo.update(self._deferred)
            self._deferred.clear()
        while True:
            if self.policy == "pipeline":
                self._sweep_tier1(actions)
            else:
                self._place_held(actions)
            if not self._idle_n or not self._ready_parts:
                return actions
            # Ready partitions that no worker holds: the best tier (2 to 4)
            # any of them can get, lowest priority among equals.
            best: tuple[int, Any, TaskKey] | None = None
            best_worker: _Worker | None = None
            for p in self._ready_parts:
                if self._holders[p]:
                    continue  # weighed by _place_held
                top = self._peek_ready(p)
                tier, worker = self._best_idle(p)
                if worker is None:
                    continue
                cand = (tier, top[0], top[1])
                if best is None or cand < best:
                    best, best_worker = cand, worker
            if best is None or best_worker is None:
                return actions
            tier, _, key = best
            p = self._part[key]
            heapq.heappop(self._ready_heap[p])  # the top, as peeked
            self._take_ready(key)
            chosen = self._by_inputs(key, p, tier) or best_worker
            self._assign(key, chosen, tier, actions)

    def _place_held(self, actions: list[Action]) -> None:
        """Place the ready tasks of held partitions, in priority order, by
        :meth:`_choose`; a partition whose top task waits is weighed again
        after the next event."""
        todo = self._t1_todo
        if not todo:
            return
        held = [p for p in todo if self._holders[p] and self._ready_n[p]]
        todo.clear()
        # Idle holders first take what is ready for them, so that no later
        # placement swaps out a partition whose ready tasks they could run.
        for p in held:
            while self._idle_holders[p] and self._ready_n[p]:
                key = self._peek_ready(p)[1]
                heapq.heappop(self._ready_heap[p])
                self._take_ready(key)
                self._assign(key, self._pinned(key, p) or self._best_idle_holder(p), 1, actions)
        heap = [(*self._peek_ready(p), p) for p in held if self._ready_n[p]]
        heapq.heapify(heap)
        while heap:
            _, key, p = heapq.heappop(heap)
            pinned = self._pinned(key, p)
            choice = (pinned, 1) if pinned is not None else self._choose(key, p)
            if choice is None:
                self._deferred[p] = None
                continue
            w, tier = choice
            heapq.heappop(self._ready_heap[p])  # the top, as peeked
            self._take_ready(key)
            self._assign(key, w, tier, actions)
            if self._ready_n[p]:
                heapq.heappush(heap, (*self._peek_ready(p), p))

    def _choose(self, key: TaskKey, p: str) -> tuple[_Worker, int] | None:
        """Worker and tier for ready task ``key`` of held partition ``p``,
        or None to leave it ready (policies "cost" and "greedy")."""
        h = self._best_holder(p)
        if not h.queue:
            return h, 1
        if self._idle_holders[p]:  # a slower holder is idle: it starts at once
            return self._best_idle_holder(p), 1
        tier, i = self._best_idle(p)
        if self.policy == "greedy":
            return None if i is None else (self._by_inputs(key, p, tier) or i, tier)
        c = self._task_seconds(p, h)
        # The drain: when the holders, at their combined speed, get through
        # their unconfirmed loads, queued and ready tasks -- and no earlier
        # than this task would finish behind the queued ones (tasks are
        # whole, so the fluid backlog alone undercounts a short one).  A new
        # holder must load and run this task before that.
        queued, speed = self._queued_n[p] * c + self._loading[p], self._holder_speed[p]
        drain = max((queued + self._ready_n[p] * c) / speed, queued / speed + c / h.speed)
        if i is not None:
            load = self._load_seconds(i, p)
            finish = load + self._task_seconds(p, i) / i.speed
            if finish + self._reload_seconds(i) < drain and (
                    not self._absorbed(p, finish) if p in i.stored
                    else self._lags(p, h, i, i.speed * load) and self._star_spare(p, drain)):
                return i, tier
        if len(h.queue) <= PREFETCH and self._state[next(iter(h.queue))] != _FINISHED:
            return h, 1  # (not behind the slower copy of a backed-up task)
        return None

    def _reload_seconds(self, w: _Worker) -> float:
        """``reload(w)`` of the replica rule: seconds to load again the
        partition ``w`` holds when it is that partition's only holder and
        the partition has work left (what swapping it out costs), else 0."""
        q = w.resident
        if q is None or not self._unfinished.get(q) or len(self._holders[q]) > 1:
            return 0.0
        return self._load_seconds(w, q)

    def _absorbed(self, p: str, finish: float) -> bool:
        """Whether ``p``'s holders, each taking whole tasks at its speed
        after its unconfirmed load and its queue (less what it did of them
        since it started, by the caller's clock), finish every ready task of
        ``p`` within ``finish`` seconds.  It stops at the holder that covers
        the last of them."""
        need = self._ready_n[p]
        live, now = self._live, self._now
        for wid in self._holders[p]:
            x = live[wid]
            c = self._task_seconds(p, x)
            if c <= 0:
                return True  # (nothing measured yet: a task costs nothing)
            # Its running task counts from when its load was confirmed (a load
            # may wait on links the estimate does not see); one running past
            # its estimate is expected to end any moment.
            done = min((now - x.since) * x.speed, c) if x.queue and not x.loading else 0.0
            need -= max(0, math.floor((finish * x.speed - x.loading + done) / c) - len(x.queue))
            if need <= 0:
                return True
        return False

    def _task_seconds(self, p: str, w: _Worker) -> float:
        """Seconds at speed 1.0 a task of ``p`` keeps ``w`` busy: its compute
        and its tensors over the worker's own link."""
        return self._estimate[p] + self._tensor_bytes[p] * w.speed / w.info.bandwidth

    def _lags(self, p: str, h: _Worker, w: _Worker, load: float) -> bool:
        """Whether ``p``'s holders have more than their share of the remaining
        work, by their speed, counting the replica's ``load`` (speed x
        seconds on ``w``) as work the crowd must also do (always, when the
        crowd has a worker to spare or is one partition short of it and can
        only run ``p``); and, when a stage ``p`` feeds has work and no holder,
        whether they end ``p`` later than its feeding stages supply its
        inputs by more than ``w``'s loads of ``p`` and of those stages."""
        if len(self._live) > self._parts_left:
            return True
        if (len(self._live) == self._parts_left and len(self._ready_parts) == 1
                and sum(self._queued_n.values()) == self._queued_n[p]):
            return True  # (p is the one partition ready: _ready_parts holds it)
        work = sum(n * self._task_seconds(q, h) for q, n in self._unfinished.items())
        mine = self._unfinished[p] * self._task_seconds(p, h) / self._holder_speed[p]
        if mine <= (work + load) / self._crowd_speed:
            return False
        unheld = [q for q in self._fed[p] if self._unfinished[q] and not self._holders[q]]
        if not unheld:
            return True
        unfinished, speed = self._unfinished, self._holder_speed
        supply = max((unfinished[q] * self._task_seconds(q, h) / speed[q]
                      for q in self._feeds[p] if unfinished[q] and speed[q]), default=0.0)
        loads = load / w.speed + sum(self._load_seconds(w, q) for q in unheld)
        return mine - supply > loads

    def _star_spare(self, p: str, drain: float) -> bool:
        """Whether ``p``'s weights can cross the star without making it what
        ends the run: the bytes it must still carry, with them, take less
        than ``p``'s drain or the crowd's remaining compute at full use."""
        star = (self._star_left + self._weights[p]) / self._star_bandwidth
        if star < drain:
            return True
        estimate = self._estimate
        work = sum(n * estimate[q] for q, n in self._unfinished.items())
        return star < work / self._crowd_speed

    def _best_idle_holder(self, p: str) -> _Worker:
        """The fastest idle holder of ``p`` (there is one)."""
        live = self._live
        return min((live[wid] for wid in self._holders[p] if not live[wid].queue),
                   key=lambda w: (w.inv_speed, w.rank))

    def _load_seconds(self, w: _Worker, p: str) -> float:
        """Expected seconds to make ``p`` resident on ``w`` (not holding it)."""
        wb = self._weights[p]
        if p in w.stored or p in w.prefetched:
            fetch = wb / w.info.disk_bandwidth
        else:  # behind the weights already on their way through the star
            fetch = max(wb / w.info.bandwidth, (self._star_bytes + wb) / self._star_bandwidth)
        return fetch + wb / DESERIALIZE_BYTES_PER_SECOND

    def _sweep_tier1(self, actions: list[Action]) -> None:
        """Queue every ready task whose partition some worker holds."""
        todo = self._t1_todo
        if not todo:
            return
        batch: list[tuple[Any, TaskKey]] = []
        state = self._state
        for p in todo:
            if not self._holders[p] or not self._ready_n[p]:
                continue
            for entry in self._ready_heap[p]:
                key = entry[1]
                if state[key] == _READY:
                    state[key] = _QUEUED  # also skips a duplicate entry
                    batch.append(entry)
            self._ready_heap[p] = []
            self._ready_n[p] = 0
            del self._ready_parts[p]
        todo.clear()
        if len(batch) > 1:
            batch.sort()
        for _, key in batch:
            p = self._part[key]
            w = self._pinned(key, p) or self._by_inputs(key, p, 1) or self._best_holder(p)
            self._assign(key, w, 1, actions)

    def _pinned(self, key: TaskKey, p: str) -> _Worker | None:
        """The worker ``key`` is pinned to, if it holds ``p`` now (state affinity)."""
        if not self._pins:
            return None
        w = self._live.get(self._pins.get(key, ""))
        return w if w is not None and w.id in self._holders[p] else None

    def _peek_ready(self, p: str) -> tuple[Any, TaskKey]:
        heap, state = self._ready_heap[p], self._state
        while state[heap[0][1]] != _READY:
            heapq.heappop(heap)
        return heap[0]

    def _take_ready(self, key: TaskKey) -> None:
        p = self._part[key]
        self._state[key] = _QUEUED
        self._ready_n[p] -= 1
        if not self._ready_n[p]:
            del self._ready_parts[p]

    def _best_holder(self, p: str) -> _Worker:
        heap, live = self._holder_heap[p], self._live
        while True:
            _, _, version, wid = heap[0]
            w = live.get(wid)
            if w is not None and w.version == version and w.resident == p:
                return w
            heapq.heappop(heap)

    def _best_idle(self, p: str) -> tuple[int, _Worker | None]:
        """Best tier from 2 to 4 for partition ``p`` and its best worker."""
        heap, live = self._caching_heap[p], self._live
        while heap:
            _, _, epoch, wid = heap[0]
            w = live.get(wid)
            if w is not None and w.epoch == epoch and w.resident != p and self._caches(w, p):
                return 2, w
            heapq.heappop(heap)
        lo = bisect_left(self._mem_sorted, self._need[p])
        top = self._empty_tree.suffix_min(lo)
        if top is not _NONE:
            return 3, live[top[2]]
        top = self._spent_tree.suffix_min(lo)
        if top is _NONE:
            top = self._holding_tree.suffix_min(lo)
        if top is not _NONE:
            return 4, live[top[2]]
        return 0, None

    def _in_tier(self, w: _Worker, tier: int, p: str) -> bool:
        if tier == 1:
            return w.id in self._holders[p]
        if w.queue or w.resident == p or w.memory < self._need[p]:
            return False
        if p in w.cached_fit and self._caches(w, p):
            return tier == 2
        return tier == (3 if w.resident is None else 4)

    def _by_inputs(self, key: TaskKey, p: str, tier: int) -> _Worker | None:
        """The tier's worker that produced the most of ``key``'s inputs, if any."""
        preds = self._preds[key]
        if not preds:
            return None
        produced_on, live = self._produced_on, self._live
        if len(preds) == 1:
            w = live.get(produced_on[preds[0]])
            return w if w is not None and self._in_tier(w, tier, p) else None
        counts: dict[str, int] = {}
        for u in preds:
            wid = produced_on[u]
            counts[wid] = counts.get(wid, 0) + 1
        best: tuple[int, float, int] | None = None
        chosen: _Worker | None = None
        for wid, n in counts.items():
            w = live.get(wid)
            if w is None or not self._in_tier(w, tier, p):
                continue
            rank = (-n, (len(w.queue) + 1) / w.speed, w.rank)
            if best is None or rank < best:
                best, chosen = rank, w
        return chosen

    def _assign(self, key: TaskKey, w: _Worker, tier: int, actions: list[Action]) -> None:
        p = self._part[key]
        if not w.queue:
            self._become_busy(w)
        if w.resident != p:
            old = w.resident
            if old is not None:
                actions.append(Unload(w.id, old))
                if self._holders.get(old, {}).pop(w.id, 0) is None:
                    self._holder_left(w, old)
            actions.append(Load(w.id, p))
            if w.ahead is not None:  # stored ahead or not, this worker is taken now
                self._end_claim(w)
            if p in self._ahead_of:  # another worker got there first
                self._end_claim(self._live[self._ahead_of[p]])
            loading = w.speed * self._load_seconds(w, p)
            sent = 0 if p in w.stored or p in w.prefetched else int(self._weights[p])
            w.loads.append(p)
            w.sent.append(sent)
            w.stored.add(p)
            self._star_bytes += sent
            self._star_left += sent
            if sent and self._uncrossed.pop(p, 0) is None:  # its first crossing is this load
                self._star_left -= sent
            w.resident = self._resident[w.id] = p
            self._holders[p][w.id] = None
            # Until its load is confirmed, a new holder is about a load late.
            w.loading = loading
            self._holder_speed[p] += w.speed
            self._loading[p] += w.loading
            if self._ready_n[p]:
                self._t1_todo[p] = None
        if not w.queue:
            w.since = self._now
        w.queue[key] = None
        self._queued_n[p] += 1
        self._star_bytes += self._tensor_bytes[p]
        self._where[key] = w.id
        self._state[key] = _QUEUED
        self._push_holder(w)
        actions.append(Run(w.id, key, tier))

    # -- weights ahead of need ----------------------------------------------

    def _store_ahead(self, actions: list[Action]) -> None:
        """Give each worker that stores and claims nothing the partition it is
        expected to load next (see "Weights ahead of need")."""
        if not self._unclaimed:
            return
        wanted = [p for p in self._plan_order
                  if self._unfinished[p] and not self._holders[p] and p not in self._ahead_of]
        if not wanted:
            return
        live = self._live
        storing = [live[wid] for wid in self._unclaimed]
        # Idle workers that do not store take the first of them, when they are ready.
        idle_storing = sum(not w.queue for w in storing) + sum(not live[wid].queue for wid in self._ahead_of.values())
        del wanted[:max(0, self._idle_n - idle_storing)]
        storing.sort(key=lambda w: (self._drain_seconds(w), w.rank))
        for p in wanted:
            w = next((w for w in storing if w.memory >= self._need[p]), None)
            if w is None:
                continue
            storing.remove(w)
            del self._unclaimed[w.id]
            w.ahead, self._ahead_of[p] = p, w.id
            if p not in w.stored and p not in w.prefetched:
                actions.append(Store(w.id, p))
                w.prefetched.add(p)
                w.cached_fit.insert(bisect_left(w.cached_fit, p), p)
                if w.tree is not None and self._caches(w, p):  # idle: tier 2 for it at once
                    self._offer_cached(w, p)
            if not storing:
                return

    def _drain_seconds(self, w: _Worker) -> float:
        """When ``w``'s resident partition is expected to run out of work: its
        unfinished tasks at the summed speed of its holders (0 with none)."""
        p = w.resident
        if p is None or not self._unfinished.get(p, 0):
            return 0.0
        return self._unfinished[p] * self._task_seconds(p, w) / max(self._holder_speed[p], w.speed)

    def _end_claim(self, w: _Worker) -> None:
        """``w`` no longer stands ready to load the partition stored ahead on it."""
        del self._ahead_of[w.ahead]  # type: ignore[arg-type]
        w.ahead = None
        self._unclaimed[w.id] = None
