"""Stragglers on a real crowd: a worker process stopped mid-run (SIGSTOP) for
less than the heartbeat timeout.  Its task gets a backup copy and the run
finishes with the backup's result; with no worker to back up on, the run
ends with an error naming the stuck task and worker.  (Replicas on six TCP
workers are the conformance suite's replica case.)"""

from __future__ import annotations

import os
import re
import signal

import numpy as np
import pytest

import crowdgraph
from crowdgraph import zoo
from crowdgraph.driver import Driver
from crowdgraph.errors import ExecutionError
from crowdgraph.runtime import open_session, run_session
from crowdgraph.taskgraph import split_batch
from crowdgraph.testing import watch_notices
from crowdgraph_tcp import TcpExecutor
from tests.models import chain

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny():
    model = zoo.distilbert("tiny")
    feeds = zoo.sample_inputs(model, batch=4, sequence=16)
    compiled = crowdgraph.compile(model, partitions=3, input_shapes={"input_ids": (1, 16)})
    expected = run_session(open_session(model.SerializeToString()), feeds)
    return compiled, feeds, expected


@pytest.fixture(scope="module")
def slow_tasks():
    """Six 1024-wide layers in 3 partitions, 4 micro-batches of 256 rows: each task takes
    tens of milliseconds, so a worker stopped as it reports its load still has tasks queued."""
    model, feeds = chain(n_layers=6, width=1024, batch=1024)
    compiled = crowdgraph.compile(model, partitions=3, input_shapes={"x": (256, 1024)})
    return compiled, feeds, run_session(open_session(model.SerializeToString()), feeds)


def stop_on_first_load(executor: TcpExecutor, stopped: list[str]) -> None:
    """SIGSTOP the first worker that reports a load: the task queued behind it hangs."""

    def listener(notice):
        if notice.kind == "loaded" and not stopped and notice.worker:
            stopped.append(notice.worker)
            os.kill(executor.processes[notice.worker].pid, signal.SIGSTOP)

    watch_notices(executor, listener)


def resume(executor: TcpExecutor, stopped: list[str]) -> None:
    for wid in stopped:
        os.kill(executor.processes[wid].pid, signal.SIGCONT)


def test_a_stopped_worker_is_backed_up_and_the_backup_result_wins(slow_tasks):
    compiled, feeds, expected = slow_tasks
    budget = max(p.resident_bytes for p in compiled.partitions)
    # The stop must land while the worker still has tasks of its partition queued.  Its
    # tasks take tens of milliseconds, against the stop's few; should the worker still have
    # answered every task first (it is then lost by heartbeat, with nothing to back up),
    # the attempt runs again, at most three times.
    for _ in range(3):
        executor = TcpExecutor.local(memory=[budget] * 3, heartbeat=10.0, join_timeout=60)
        stopped: list[str] = []
        stop_on_first_load(executor, stopped)
        try:
            got = compiled.run(feeds, executor=executor, microbatch=256, timeout=120)
            report = compiled.last_report
        finally:
            resume(executor, stopped)
            executor.close()
        for name, want in expected.items():
            np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-4)
        if not (report.workers[stopped[0]].lost and not report.backups):
            break
    (backup,) = [b for b in report.backups if b.straggler == stopped[0]]
    assert backup.winner == backup.backup != stopped[0]
    assert backup.after >= 1.0  # BACKUP_MIN_SECONDS
    assert not report.workers[stopped[0]].lost, "stopped for less than the heartbeat timeout"
    assert f"was slow on {stopped[0]}" in str(report)


def test_no_progress_ends_the_run_naming_the_stuck_task_and_worker(tiny):
    compiled, feeds, _ = tiny
    budget = max(p.resident_bytes for p in compiled.partitions)
    executor = TcpExecutor.local(memory=[budget], heartbeat=5.0, join_timeout=60)
    stopped: list[str] = []
    stop_on_first_load(executor, stopped)
    microbatches = split_batch(feeds, compiled.batched_inputs(), 1)
    try:
        with pytest.raises(ExecutionError) as info:
            Driver(compiled, microbatches, executor, stall_timeout=2.0).run()
    finally:
        resume(executor, stopped)
        executor.close()
    text = str(info.value)
    # The worker may finish the micro-batch it had begun before the stop reaches it: the stuck task
    # is then a later one of the same partition.
    assert "no progress for" in text and "stall_timeout=" in text
    assert re.search(rf"waiting for \('p0', \d+\) on {stopped[0]}", text), text
