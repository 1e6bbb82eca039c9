"""TcpExecutor passes crowdgraph's executor conformance suite with real worker processes."""

from __future__ import annotations

import threading

from crowdgraph.testing import ExecutorConformance
from crowdgraph_tcp import TcpExecutor


class TestTcpExecutor(ExecutorConformance):
    can_lose_workers = True

    def make_executor(self, budgets):
        return TcpExecutor.local(memory=list(budgets), join_timeout=60)

    def kill_worker(self, executor, worker_id):
        executor.processes[worker_id].kill()

    def assert_stopped(self, executor):
        for proc in executor.processes.values():
            assert proc.poll() is not None, "worker processes exit on close()"
        assert not any(t.name.startswith("crowdgraph-tcp") for t in threading.enumerate())
