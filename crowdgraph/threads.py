"""ThreadExecutor: virtual workers in this process, one thread each (the default).

Each worker is a thread with its own action queue, memory budget and
speed, running real onnxruntime sessions.  onnxruntime releases the GIL
while it computes, so two workers really run on two cores.  A worker
holds at most one session; ``unload`` drops it and hands the memory back
to the operating system.

Workers keep their resident partition between runs, so a second run of
the same plan on the same executor starts at tier 1.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np

from .executor import Executor, Job, Reporter, TaskStats
from .partition import Partition
from .runtime import ResidentSession, TaskState
from .schedule import TaskKey, WorkerInfo
from .units import parse_bytes


class _ThreadWorker:
    """One virtual worker: a thread carrying out its actions in order."""

    def __init__(self, info: WorkerInfo, threads: int):
        self.info = info
        self.actions: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.resident = ResidentSession(threads)
        #: What will be resident once the queued actions are done.
        self.queued_sha256: str | None = None
        self.thread = threading.Thread(target=self._loop, name=f"crowdgraph-{info.id}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            action = self.actions.get()
            if action[0] == "stop":
                self.resident.unload()
                return
            if action[0] == "reset":
                self.resident.unload()
                continue
            try:
                getattr(self, "_" + action[0])(*action[1:])
            except Exception as exc:  # reported, never raised from this thread
                self._fail(action, exc)

    def _fail(self, action: tuple[Any, ...], exc: Exception) -> None:
        kind, reporter, subject = action[:3]
        message = f"{type(exc).__name__}: {exc}"
        if kind == "run":
            reporter.task_failed(self.info.id, subject, message)
        elif kind == "load":
            reporter.load_failed(self.info.id, subject.name, message)

    # Each action carries the reporter of the run that issued it, so work
    # still in flight from a failed run never reports into the next one.

    def _load(self, reporter: Reporter, partition: Partition) -> None:
        start = time.perf_counter()
        fast = partition.opens_fast(self.info.memory)
        self.resident.load(partition.model_bytes, partition.name, partition.sha256, fast)
        reporter.loaded(self.info.id, partition.name, start=start, end=time.perf_counter(), fast=fast)

    def _unload(self, reporter: Reporter, name: str) -> None:
        self.resident.unload()
        reporter.unloaded(self.info.id, name)

    def _run(self, reporter: Reporter, key: TaskKey, partition: Partition, inputs: Mapping[str, Any],
             state: TaskState | None = None) -> None:
        start = time.perf_counter()
        outputs = self.resident.run(partition.name, inputs, partition.outputs, sha256=partition.sha256,
                                    state=state)
        reporter.task_finished(self.info.id, key, outputs, TaskStats(
            start, time.perf_counter(), bytes_in=sum(np.asarray(v).nbytes for v in inputs.values()),
            bytes_out=sum(v.nbytes for v in outputs.values())))

    def _forget(self, reporter: Reporter, keys: Sequence[str]) -> None:
        self.resident.forget(keys)

    def cancel_pending(self) -> None:
        """Drop queued actions that have not started."""
        try:
            while True:
                self.actions.get_nowait()
        except queue.Empty:
            pass


class ThreadExecutor(Executor):
    """Virtual workers in this process, each with a budget and a speed.

    Parameters
    ----------
    workers:
        A number of workers (default: one per CPU core), or a list of
        :class:`~crowdgraph.WorkerInfo` specs.
    memory:
        Budget of each numbered worker (default: the plan's budget, or the
        largest partition when the plan was cut by count).
    threads_per_worker:
        onnxruntime intra-op threads each worker's session uses.

    Examples
    --------
    >>> from crowdgraph import ThreadExecutor, WorkerInfo
    >>> ex = ThreadExecutor(workers=[WorkerInfo("a", memory="64MB"), WorkerInfo("b", memory="32MB", speed=0.5)])
    >>> ex.close()
    """

    name = "threads"

    def __init__(self, workers: int | Sequence[WorkerInfo] | None = None, memory: int | str | None = None,
                 threads_per_worker: int = 1):
        self._spec = workers if workers is not None else max(1, os.cpu_count() or 1)
        self._memory = parse_bytes(memory) if memory is not None else None
        self._threads = threads_per_worker
        self._workers: dict[str, _ThreadWorker] = {}
        self._reporter: Reporter | None = None

    def start(self, job: Job, reporter: Reporter) -> list[WorkerInfo]:
        if not self._workers:
            if isinstance(self._spec, int):
                memory = self._memory or job.memory_budget or max(p.resident_bytes for p in job.partitions.values())
                infos = [WorkerInfo(f"thread-{n}", memory=memory) for n in range(self._spec)]
            else:
                infos = list(self._spec)
            infos = [replace(info, keeps_state=True) for info in infos]
            self._workers = {info.id: _ThreadWorker(info, self._threads) for info in infos}
        self._reporter = reporter
        crowd, clear = self.crowd_for(job, [(w.info, w.queued_sha256) for w in self._workers.values()])
        for worker in clear:
            self._reset(self._workers[worker])
        return crowd

    def load(self, worker: str, partition: Partition) -> None:
        w = self._enqueue(worker, ("load", self._reporter, partition))
        if w is not None:
            w.queued_sha256 = partition.sha256

    def unload(self, worker: str, partition: str) -> None:
        w = self._enqueue(worker, ("unload", self._reporter, partition))
        if w is not None:
            w.queued_sha256 = None

    def run(self, worker: str, key: TaskKey, partition: Partition, inputs: Mapping[str, Any], *,
            state: TaskState | None = None) -> None:
        self._enqueue(worker, ("run", self._reporter, key, partition, inputs, state))

    def forget_state(self, worker: str, keys: Sequence[str]) -> None:
        self._enqueue(worker, ("forget", self._reporter, list(keys)))

    def _enqueue(self, worker: str, action: tuple[Any, ...]) -> _ThreadWorker | None:
        w = self._workers.get(worker)
        if w is not None:  # else lost: its loss is reported, the scheduler places the work again
            w.actions.put(action)
        return w

    def lose_worker(self, worker: str) -> None:
        """Make ``worker`` vanish as a crashed phone would: its queued work is
        dropped, it reports nothing more, and the driver is told it is lost."""
        w = self._workers.pop(worker)
        w.cancel_pending()
        w.actions.put(("stop",))
        w.thread.join(timeout=30)
        if self._reporter is not None:
            self._reporter.worker_lost(worker, "removed by lose_worker()")

    def reset(self) -> None:
        for w in self._workers.values():
            w.cancel_pending()
            self._reset(w)

    @staticmethod
    def _reset(w: _ThreadWorker) -> None:
        w.queued_sha256 = None
        w.actions.put(("reset",))

    def close(self) -> None:
        for w in self._workers.values():
            w.cancel_pending()
            w.actions.put(("stop",))
        for w in self._workers.values():
            w.thread.join(timeout=30)
        self._workers.clear()
