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

from .executor import Executor, Job, Reporter
from .partition import Partition
from .runtime import open_session, release_memory, run_session
from .schedule import TaskKey, WorkerInfo
from .units import parse_bytes


class _ThreadWorker:
    """One virtual worker: a thread carrying out its actions in order."""

    def __init__(self, info: WorkerInfo, threads: int):
        self.info = info
        self.threads = threads
        self.actions: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.session: Any = None
        self.sha256: str | None = None
        self.reporter: Reporter | None = None
        self.thread = threading.Thread(target=self._loop, name=f"crowdgraph-{info.id}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            action = self.actions.get()
            if action[0] == "stop":
                self._drop()
                return
            try:
                getattr(self, "_" + action[0])(*action[1:])
            except Exception as exc:  # reported, never raised from this thread
                self._fail(action, exc)

    def _fail(self, action: tuple[Any, ...], exc: Exception) -> None:
        assert self.reporter is not None
        message = f"{type(exc).__name__}: {exc}"
        if action[0] == "run":
            self.reporter.task_failed(self.info.id, action[1], message)
        elif action[0] == "load":
            self.reporter.load_failed(self.info.id, action[1].name, message)

    def _load(self, partition: Partition) -> None:
        assert self.reporter is not None
        start = time.perf_counter()
        self._drop()
        self.session = open_session(partition.model_bytes, self.threads)
        self.sha256 = partition.sha256
        self.reporter.loaded(self.info.id, partition.name, start=start, end=time.perf_counter())

    def _unload(self, name: str) -> None:
        assert self.reporter is not None
        self._drop()
        self.reporter.unloaded(self.info.id, name)

    def _reset(self) -> None:
        self._drop()

    def _drop(self) -> None:
        if self.session is not None:
            self.session = None
            self.sha256 = None
            release_memory()

    def _run(self, key: TaskKey, partition: Partition, inputs: Mapping[str, Any]) -> None:
        assert self.reporter is not None
        if self.sha256 != partition.sha256:
            raise RuntimeError(f"partition {partition.name} is not loaded on this worker")
        start = time.perf_counter()
        outputs = run_session(self.session, inputs, partition.outputs)
        end = time.perf_counter()
        self.reporter.task_finished(
            self.info.id, key, outputs, start=start, end=end,
            bytes_in=sum(np.asarray(v).nbytes for v in inputs.values()),
            bytes_out=sum(v.nbytes for v in outputs.values()),
        )

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
        :class:`~crowdgraph.Worker` specs.
    memory:
        Budget of each numbered worker (default: the plan's budget, or the
        largest partition when the plan was cut by count).
    threads_per_worker:
        onnxruntime intra-op threads each worker's session uses.

    Examples
    --------
    >>> from crowdgraph import ThreadExecutor, Worker
    >>> ex = ThreadExecutor(workers=[Worker("a", memory="64MB"), Worker("b", memory="32MB", speed=0.5)])
    >>> ex.close()
    """

    name = "threads"

    def __init__(self, workers: int | Sequence[WorkerInfo] | None = None, memory: int | str | None = None,
                 threads_per_worker: int = 1):
        self._spec = workers if workers is not None else max(1, os.cpu_count() or 1)
        self._memory = parse_bytes(memory) if memory is not None else None
        self._threads = threads_per_worker
        self._workers: dict[str, _ThreadWorker] = {}

    def start(self, job: Job, reporter: Reporter) -> list[WorkerInfo]:
        if not self._workers:
            if isinstance(self._spec, int):
                memory = self._memory or job.memory_budget or max(p.resident_bytes for p in job.partitions.values())
                infos = [WorkerInfo(f"thread-{n}", memory=memory) for n in range(self._spec)]
            else:
                infos = list(self._spec)
            self._workers = {info.id: _ThreadWorker(info, self._threads) for info in infos}
        by_sha = {p.sha256: name for name, p in job.partitions.items()}
        crowd = []
        for w in self._workers.values():
            w.reporter = reporter
            resident = by_sha.get(w.sha256) if w.sha256 else None
            if w.sha256 and resident is None:
                w.actions.put(("reset",))
            crowd.append(replace(w.info, resident=resident))
        return crowd

    def load(self, worker: str, partition: Partition) -> None:
        self._workers[worker].actions.put(("load", partition))

    def unload(self, worker: str, partition: str) -> None:
        self._workers[worker].actions.put(("unload", partition))

    def run(self, worker: str, key: TaskKey, partition: Partition, inputs: Mapping[str, Any]) -> None:
        self._workers[worker].actions.put(("run", key, partition, inputs))

    def reset(self) -> None:
        for w in self._workers.values():
            w.cancel_pending()
            w.actions.put(("reset",))

    def close(self) -> None:
        for w in self._workers.values():
            w.cancel_pending()
            w.actions.put(("stop",))
        for w in self._workers.values():
            w.thread.join(timeout=30)
        self._workers.clear()
