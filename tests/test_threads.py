"""The thread executor passes the executor conformance suite and really runs in parallel."""

from __future__ import annotations

import time

import numpy as np

import crowdgraph
from crowdgraph import ThreadExecutor, WorkerInfo
from crowdgraph.testing import ExecutorConformance
from tests import models


class TestThreadExecutor(ExecutorConformance):
    can_lose_workers = True

    def make_executor(self, budgets):
        return ThreadExecutor(workers=[WorkerInfo(f"w{n}", memory=b) for n, b in enumerate(budgets)])

    def kill_worker(self, executor, worker_id):
        executor.lose_worker(worker_id)


def test_two_workers_run_on_two_cores():
    """onnxruntime releases the GIL: two busy workers overlap in time."""
    model, feeds = models.chain(n_layers=8, width=1024, batch=256)
    compiled = crowdgraph.compile(model, partitions=1, sample=feeds)
    # Two copies of the same single-partition plan, fed together: one per worker.
    ex = ThreadExecutor(workers=[WorkerInfo("a", memory="4GB"), WorkerInfo("b", memory="4GB")])
    try:
        from crowdgraph.executor import Job, Reporter

        reporter = Reporter()
        part = compiled.partitions[0]
        ex.start(Job({part.name: part}), reporter)
        for w in ("a", "b"):
            ex.load(w, part)
        for _ in range(2):
            assert reporter.next(60).kind == "loaded"
        for i in range(3):
            for w in ("a", "b"):
                ex.run(w, (part.name, i), part, feeds)
        spans = {}
        for _ in range(6):
            notice = reporter.next(120)
            assert notice.kind == "finished"
            spans.setdefault(notice.worker, []).append((notice.stats.start, notice.stats.end))
        a0, a1 = min(s for s, _ in spans["a"]), max(e for _, e in spans["a"])
        b0, b1 = min(s for s, _ in spans["b"]), max(e for _, e in spans["b"])
        overlap = min(a1, b1) - max(a0, b0)
        assert overlap > 0.5 * min(a1 - a0, b1 - b0), "the two workers' runs overlap in time"
    finally:
        ex.close()
