"""The driver loop: scheduler decisions in, executor notices back, on one thread.

This is the glue of stage 5 (dask.local's queue pattern).  The driver

1. splits the batch into micro-batches and builds the task graph;
2. starts the executor, which names its workers, and builds the pure
   :class:`~crowdgraph.schedule.Scheduler` (a crowd that cannot hold some
   partition fails here, before anything runs);
3. hands each scheduler action to the executor, with the input values of
   a task taken from the micro-batch or from earlier task outputs;
4. waits for the executor's notices and feeds them to the scheduler,
   recording everything in a :class:`~crowdgraph.report.RunReport`;
   a task running :data:`BACKUP_AFTER` times longer than its estimate
   gets a backup copy on an idle worker (the first result wins), and a
   run with no notice for ``stall_timeout`` seconds ends with an error
   naming the tasks and workers it waits for;
5. forgets intermediate values once every task that reads them finished,
   and joins the model outputs of all micro-batches at the end.

Only this loop touches the scheduler, so the scheduler needs no locks.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import CrowdgraphError, ExecutionError
from . import executor as notices
from .executor import Executor, Failed, Finished, Job, Joined, Loaded, LoadFailed, Lost, Notice, Reporter, Unloaded
from .report import BackupRecord, LoadRecord, RunReport, TaskRecord
from .schedule import (
    Action, Load, LoadFinished, Policy, ResultsLost, Run, Scheduler, TaskFinished, TaskKey,
    TaskOverdue, Unload, WorkerJoined, WorkerLost,
)
from .taskgraph import Mode, build_task_graph, data_consumers, data_producers

#: How long the driver waits for a notice before checking the clock again.
POLL_SECONDS = 0.05
#: A task is overdue, and gets a backup copy on an idle worker, once it has
#: run this many times its estimate ...
BACKUP_AFTER = 4.0
#: ... and at least this many seconds (short tasks jitter by more than 4x).
BACKUP_MIN_SECONDS = 1.0
#: With no notice from the executor for this long, the run ends with an
#: error naming the stuck tasks and workers (``stall_timeout=``).
STALL_SECONDS = 600.0


class Driver:
    """One run of a compiled model on an executor (see the module docstring)."""

    def __init__(self, compiled: Any, microbatches: Sequence[Mapping[str, np.ndarray]], executor: Executor,
                 *, mode: Mode = "streaming", seed: int = 0, progress: bool = False,
                 timeout: float | None = None, policy: Policy = "cost",
                 stall_timeout: float = STALL_SECONDS, backups: bool = True):
        self.compiled = compiled
        self.microbatches = microbatches
        self.executor = executor
        self.tasks = build_task_graph(compiled.graph, len(microbatches), mode)
        self.partitions = {p.name: p for p in compiled.partitions}
        self.producer = {t: p.name for p in compiled.partitions for t in p.outputs}
        self.output_partition = {name: self.producer[name] for name in compiled.output_names}
        self.keep = set(self.output_partition.values())
        self.reporter = Reporter()
        self.report = RunReport(executor=getattr(executor, "name", type(executor).__name__), mode=mode,
                                microbatches=len(microbatches), partitions=len(compiled.partitions))
        self.values: dict[TaskKey, Mapping[str, Any]] = {}
        self.waiting: dict[TaskKey, set[TaskKey]] = {
            k: set(data_consumers(self.tasks, k)) for k in self.tasks
        }
        self.issued: dict[TaskKey, tuple[str, int]] = {}
        self.seed = seed
        self.policy = policy
        self.progress = progress
        self.timeout = timeout
        self.stall_timeout = stall_timeout
        self.backups = backups
        #: Per worker: the task at the head of its queue and when it was first seen there, loaded.
        self.heads: dict[str, tuple[TaskKey, float]] = {}
        self.backup_records: dict[TaskKey, BackupRecord] = {}
        self.scheduler: Scheduler | None = None

    # -- the loop --------------------------------------------------------

    def run(self) -> tuple[list[dict[str, Any]] | None, RunReport]:
        """Carry the run out; return per-micro-batch outputs (None when simulated) and the report."""
        workers = list(self.executor.start(Job(self.partitions, self.compiled.memory_budget), self.reporter))
        for w in workers:
            self.report.add_worker(w.id, w.memory, w.speed, w.floor)
        rows = _rows_scale(self.compiled, self.microbatches)
        self.scheduler = Scheduler(self.tasks, {p: part.resident_bytes for p, part in self.partitions.items()},
                                   workers, seed=self.seed, policy=self.policy,
                                   weight_bytes={p: part.weight_bytes for p, part in self.partitions.items()},
                                   flops={p: part.flops * rows for p, part in self.partitions.items()},
                                   star_bandwidth=getattr(self.executor, "star_bandwidth", math.inf),
                                   tensor_bytes={p: (part.input_bytes + part.output_bytes) * rows
                                                 for p, part in self.partitions.items()})
        self.report.start = self.executor.now()
        bar = _progress_bar(len(self.tasks)) if self.progress else None
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        last_notice = watched = time.monotonic()
        try:
            self._issue(self.scheduler.start())
            while not self.scheduler.done:
                if not self.reporter.pending():
                    self.executor.idle()
                notice = self.reporter.next(POLL_SECONDS)
                now = time.monotonic()
                if self.backups and now - watched >= POLL_SECONDS:
                    watched = now
                    self._watch_heads()
                if notice is None:
                    if deadline is not None and now > deadline:
                        raise ExecutionError(
                            f"the run did not finish within {self.timeout} s "
                            f"({len(self.scheduler.finished)} of {len(self.tasks)} tasks done); "
                            "check that the workers are alive or raise timeout="
                        )
                    if now - last_notice > self.stall_timeout:
                        raise ExecutionError(self._stalled(now - last_notice))
                    continue
                last_notice = now
                done_before = len(self.scheduler.finished)
                self._issue(self._apply(notice))
                if bar is not None:
                    bar.update(len(self.scheduler.finished) - done_before)
        except BaseException:
            self.executor.reset()
            raise
        finally:
            if bar is not None:
                bar.close()
        self.report.end = self.executor.now()
        self.report.backups.extend(self.backup_records.values())
        return self._outputs(), self.report

    def _watch_heads(self) -> None:
        """Note when each worker started its current task; back up those overdue.

        A task counts as started when it is first seen at the head of its
        worker's queue with the worker's loads confirmed, so a slow load is
        not taken for a slow task.
        """
        sched = self.scheduler
        assert sched is not None
        now = self.executor.now()
        loaded, copies = sched.loaded, sched.copies
        for wid, queue in sched.queues.items():
            if not queue or loaded[wid] is None:
                self.heads.pop(wid, None)
                continue
            key = queue[0]
            seen = self.heads.get(wid)
            if seen is None or seen[0] != key:
                self.heads[wid] = (key, now)
                continue
            if key in copies or key in self.backup_records or key in sched.finished:
                continue
            expected = sched.estimate(key[0]) / sched.workers[wid].speed
            if now - seen[1] > max(BACKUP_AFTER * expected, BACKUP_MIN_SECONDS):
                actions = sched.handle(TaskOverdue(wid, key))
                if actions:
                    backup = copies[key]
                    self.backup_records[key] = BackupRecord(key[0], key[1], wid, backup, now - seen[1])
                    self._issue(actions)

    def _stalled(self, seconds: float) -> str:
        """The error of a run that made no progress for ``seconds``."""
        sched = self.scheduler
        assert sched is not None
        running = [f"{q[0]} on {wid}" for wid, q in sched.queues.items() if q]
        stuck = "; ".join(running[:10]) + (f" and {len(running) - 10} more" if len(running) > 10 else "")
        return (
            f"no progress for {seconds:.0f} s ({len(sched.finished)} of {len(self.tasks)} tasks done): "
            f"waiting for {stuck or 'nothing running'}; {len(sched.ready)} tasks ready with no worker "
            "free. Check that those workers are alive and fast enough, or raise stall_timeout="
        )

    def _apply(self, notice: Notice) -> list[Action]:
        """Record a notice and turn it into scheduler actions."""
        sched = self.scheduler
        assert sched is not None
        match notice:
            case Finished(worker, key, outputs, stats):
                was_done = key in sched.finished
                backup = self.backup_records.get(key)
                if backup is not None:  # the first copy to finish wins, the other is dropped
                    if was_done:
                        backup.dropped = worker
                    else:
                        backup.winner = worker
                actions = sched.handle(TaskFinished(worker, key, stats.duration))
                if was_done or key not in sched.finished:
                    self.executor.forget(list(outputs.values()))  # late duplicate
                    return actions
                self._finished(notice)
                return actions
            case Loaded(worker, partition):
                self.report.record_load(LoadRecord(worker, partition, notice.start, notice.end, notice.bytes_sent,
                                                   notice.from_cache), notice.rss)
                return sched.handle(LoadFinished(worker, partition))
            case Unloaded(worker):
                self.report.record_unload(worker, notice.rss)
                return []
            case Lost(worker, reason):
                if worker not in sched.workers or worker in sched.lost:
                    return []
                self.report.replaced.extend(sched.queue(worker))
                if worker in self.report.workers:
                    self.report.workers[worker].lost = reason or "lost"
                return sched.handle(WorkerLost(worker))
            case Joined(info):
                self.report.add_worker(info.id, info.memory, info.speed, info.floor)
                return sched.handle(WorkerJoined(info))
            case notices.ResultsLost(keys):
                return sched.handle(ResultsLost(self._lost_closure(keys)))
            case Failed(worker, (p, i), error):
                raise ExecutionError(f"partition {p} failed on micro-batch {i} on worker {worker}: {error}")
            case LoadFailed(worker, partition, error):
                raise ExecutionError(f"loading partition {partition} on worker {worker} failed: {error}")
        raise CrowdgraphError(f"the executor reported {notice!r}, which is not a notice; "
                              "report through the Reporter's methods")

    def _finished(self, notice: Finished) -> None:
        key, worker, s = notice.key, notice.worker, notice.stats
        tier = self.issued.get(key, (worker, 0))[1]
        self.report.record_task(TaskRecord(key[0], key[1], worker, tier, s.start, s.end, s.bytes_in, s.bytes_out,
                                           s.wire_in, s.wire_out), s.peak_rss, s.rss)
        self.values[key] = notice.outputs
        self.waiting[key] = {c for c in data_consumers(self.tasks, key) if c not in self.scheduler.finished}  # type: ignore[union-attr]
        for u in data_producers(self.tasks, key):
            self.waiting[u].discard(key)
            if not self.waiting[u] and u[0] not in self.keep and u in self.values:
                self.executor.forget(list(self.values.pop(u).values()))

    def _lost_closure(self, keys: Sequence[TaskKey]) -> tuple[TaskKey, ...]:
        """``keys`` plus any forgotten outputs that their recomputation needs."""
        lost = set(keys)
        frontier = list(keys)
        while frontier:
            k = frontier.pop()
            self.values.pop(k, None)
            for u in data_producers(self.tasks, k):
                self.waiting[u].add(k)
                if u not in self.values and u not in lost:
                    lost.add(u)
                    frontier.append(u)
        return tuple(sorted(lost))

    def _issue(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Run):
                self.issued[action.key] = (action.worker, action.tier)
                part = self.partitions[action.key[0]]
                self.executor.run(action.worker, action.key, part, self._inputs(action.key, part))
            elif isinstance(action, Load):
                self.executor.load(action.worker, self.partitions[action.partition])
            elif isinstance(action, Unload):
                self.executor.unload(action.worker, action.partition)

    def _inputs(self, key: TaskKey, part: Any) -> dict[str, Any]:
        i = key[1]
        inputs = {}
        for name in part.inputs:
            if name in self.producer:
                inputs[name] = self.values[(self.producer[name], i)][name]
            else:
                inputs[name] = self.microbatches[i][name]
        return inputs

    def _outputs(self) -> list[dict[str, Any]] | None:
        result = []
        for i in range(len(self.microbatches)):
            handles = {name: self.values[(p, i)][name] for name, p in self.output_partition.items()}
            if any(v is None for v in handles.values()):
                return None
            result.append(self.executor.gather(handles))
            self.executor.forget(list(handles.values()))
        return result


def _rows_scale(compiled: Any, microbatches: Sequence[Mapping[str, Any]]) -> float:
    """Rows of the first micro-batch over the rows the plan was compiled at.

    A partition's FLOPs are counted at the compiled shapes; the scheduler's
    first estimate of a task's cost scales them to the rows that run.
    """
    batched = compiled.batched_inputs()
    if not batched or not microbatches:
        return 1.0
    name = batched[0]
    compiled_rows = max(1, compiled.input_shapes[name][0])
    return np.shape(microbatches[0][name])[0] / compiled_rows


def _progress_bar(total: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="task", leave=False)


def bound_wire_error(compiled: Any, microbatches: Sequence[Mapping[str, np.ndarray]], executor: Executor,
                     outputs: list[dict[str, Any]] | None, report: RunReport, max_error: float,
                     **options: Any) -> tuple[list[dict[str, Any]] | None, RunReport]:
    """Measure the error a lossy wire put in a finished run's outputs; run exact above ``max_error``.

    ``outputs`` and ``report`` are what the run on ``executor`` gave; its
    ``lossy`` option (None or absent: an exact wire, error 0) is the wire
    it used.  The error is measured on the outputs, not estimated:
    micro-batch 0 runs again with the wire exact, and
    :attr:`RunReport.wire_error` is the largest absolute difference between
    its outputs and the lossy ones.  Micro-batch 0 stands for the run (all
    of it when the batch is one micro-batch); that costs one micro-batch
    more.  Above ``max_error`` the whole batch runs again exact, and the
    report says so.  ``options`` are :class:`Driver`'s.
    """
    lossy = getattr(executor, "lossy", None)
    if lossy is None:
        report.wire_error = 0.0
        return outputs, report
    assert outputs is not None
    executor.lossy = None  # type: ignore[attr-defined]
    try:
        exact, exact_report = Driver(compiled, microbatches[:1], executor, **options).run()
        assert exact is not None
        error = max_abs_difference(outputs[0], exact[0])
        measured = (f"the {lossy} wire put the outputs of micro-batch 0 within {error:.3g} of a lossless run's "
                    f"(max_error={max_error:g})")
        if error <= max_error:
            report.wire_error = error
            report.notes.append(measured)
            return outputs, report
        if len(microbatches) > 1:
            outputs, exact_report = Driver(compiled, microbatches, executor, **options).run()
    finally:
        executor.lossy = lossy  # type: ignore[attr-defined]
    exact_report.wire_error = 0.0
    exact_report.notes.append(f"{measured}: above the bound, so these outputs come from a lossless run")
    return outputs, exact_report  # type: ignore[return-value]


def max_abs_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """Largest absolute difference between same-named arrays (0.0 when all are equal).

    >>> max_abs_difference({"y": np.array([1.0, 2.0])}, {"y": np.array([1.5, 2.0])})
    0.5
    """
    worst = 0.0
    for name, value in a.items():
        x, y = np.asarray(value, np.float64), np.asarray(b[name], np.float64)
        if x.size:
            worst = max(worst, float(np.nanmax(np.abs(x - y))))
    return worst
