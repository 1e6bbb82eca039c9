"""A complete small executor: one OS process per worker, over multiprocessing pipes.

This is the example of docs/executors.md.  Each worker is a process that
holds at most one onnxruntime session; the executor talks to it over a
pipe and turns its replies into reporter calls on one listener thread per
worker.  It passes crowdgraph's conformance suite (tests/test_examples.py).

Pipes between processes this program started are trusted, so plain
multiprocessing pickling is fine here; never use pickle for data that
arrives from a network.

Run it: ``python examples/process_executor.py``
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any, Literal, Mapping, Sequence

from crowdgraph import Executor, Job, Partition, Reporter, TaskStats, WorkerInfo


def _worker_main(conn: Any) -> None:
    """The worker process: carry out actions in order, one session at most."""
    from crowdgraph.runtime import ResidentSession

    resident = ResidentSession()
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        kind, generation = message[0], message[1]
        if kind == "stop":
            return
        if kind in ("unload", "reset"):
            resident.unload()
            if kind == "unload":
                conn.send(("unloaded", generation, message[2]))
            continue
        start = time.perf_counter()
        try:
            if kind == "load":
                _, _, name, model_bytes, digest, fast = message
                resident.load(model_bytes, name, digest, fast)
                conn.send(("loaded", generation, name, start, time.perf_counter(), len(model_bytes), fast))
            elif kind == "run":
                _, _, key, digest, inputs, outputs = message
                result = resident.run(key[0], inputs, outputs, sha256=digest)
                conn.send(("finished", generation, key, result, start, time.perf_counter(),
                           sum(v.nbytes for v in inputs.values())))
        except Exception as exc:  # reported to the driver, never raised here
            conn.send(("failed", generation, kind, message[2], f"{type(exc).__name__}: {exc}"))


class _Process:
    def __init__(self, info: WorkerInfo, context: Any):
        self.info = info
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.resident: str | None = None  # sha256 resident once queued actions are done


class ProcessExecutor(Executor):
    """One worker process per budget; see the module docstring."""

    name = "processes"

    def __init__(self, budgets: Sequence[int]):
        self._budgets = list(budgets)
        self._workers: dict[str, _Process] = {}
        self._reporter: Reporter | None = None
        self._generation = 0  # replies from an earlier run are dropped
        self._lock = threading.Lock()

    def start(self, job: Job, reporter: Reporter) -> list[WorkerInfo]:
        if not self._workers:
            context = multiprocessing.get_context("spawn")
            for n, budget in enumerate(self._budgets):
                w = _Process(WorkerInfo(f"proc-{n}", memory=budget), context)
                self._workers[w.info.id] = w
                threading.Thread(target=self._listen, args=(w,), daemon=True, name=f"listen-{w.info.id}").start()
        with self._lock:
            self._generation += 1
            self._reporter = reporter
        crowd, clear = self.crowd_for(job, [(w.info, w.resident) for w in self._workers.values()])
        for worker in clear:  # it holds a partition of another plan
            self._send(self._workers[worker], "reset")
            self._workers[worker].resident = None
        return crowd

    def _send(self, w: _Process, kind: Literal["load", "unload", "run", "reset", "stop"], *args: Any) -> None:
        try:
            w.conn.send((kind, self._generation, *args))
        except (OSError, ValueError):
            pass  # the process is gone; _listen reports the loss

    def _listen(self, w: _Process) -> None:
        while True:
            try:
                reply = w.conn.recv()
            except (EOFError, OSError):
                with self._lock:
                    reporter = self._reporter
                if w.info.id in self._workers and reporter is not None:
                    del self._workers[w.info.id]
                    reporter.worker_lost(w.info.id, "worker process ended")
                return
            with self._lock:
                if reply[1] != self._generation or self._reporter is None:
                    continue
                reporter = self._reporter
            kind, wid = reply[0], w.info.id
            if kind == "loaded":
                reporter.loaded(wid, reply[2], start=reply[3], end=reply[4], bytes_sent=reply[5], fast=reply[6])
            elif kind == "unloaded":
                reporter.unloaded(wid, reply[2])
            elif kind == "finished":
                _, _, key, outputs, start, end, bytes_in = reply
                reporter.task_finished(wid, key, outputs, TaskStats(
                    start, end, bytes_in=bytes_in, bytes_out=sum(v.nbytes for v in outputs.values())))
            elif kind == "failed" and reply[2] == "run":
                reporter.task_failed(wid, reply[3], reply[4])
            elif kind == "failed":
                reporter.load_failed(wid, reply[3], reply[4])

    def load(self, worker: str, partition: Partition) -> None:
        if worker in self._workers:
            w = self._workers[worker]
            w.resident = partition.sha256
            # A budget with room for the partition's fast session opens it fast (runtime.session_options).
            self._send(w, "load", partition.name, partition.model_bytes, partition.sha256,
                       partition.opens_fast(w.info.memory))

    def unload(self, worker: str, partition: str) -> None:
        if worker in self._workers:
            self._workers[worker].resident = None
            self._send(self._workers[worker], "unload", partition)

    def run(self, worker: str, key: tuple[str, int], partition: Partition, inputs: Mapping[str, Any]) -> None:
        if worker in self._workers:
            self._send(self._workers[worker], "run", key, partition.sha256, dict(inputs), list(partition.outputs))

    def reset(self) -> None:
        with self._lock:
            self._generation += 1
        for w in self._workers.values():
            w.resident = None
            self._send(w, "reset")

    def kill(self, worker: str) -> None:
        """Kill a worker process abruptly (for tests of worker loss)."""
        self._workers[worker].process.kill()

    def close(self) -> None:
        workers, self._workers = list(self._workers.values()), {}
        for w in workers:
            self._send(w, "stop")
        for w in workers:
            w.process.join(timeout=10)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.conn.close()


def main() -> None:
    import numpy as np

    import crowdgraph
    from crowdgraph import zoo
    from crowdgraph.runtime import open_session, run_session

    model = zoo.distilbert("tiny")
    batch = zoo.sample_inputs(model, batch=8, sequence=32)
    compiled = crowdgraph.compile(model, partitions=3, sample=batch)
    budget = max(p.resident_bytes for p in compiled.partitions)
    with ProcessExecutor([budget] * 3) as executor:
        outputs = compiled.run(batch, executor=executor, microbatch=2)
    expected = run_session(open_session(model.SerializeToString()), batch)
    print(compiled.last_report)
    print(f"max abs difference to the whole model: {np.max(np.abs(outputs['logits'] - expected['logits'])):.2e}")


if __name__ == "__main__":
    main()
