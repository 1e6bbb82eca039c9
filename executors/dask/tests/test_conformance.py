"""crowdgraph's executor conformance suite, run against DaskExecutor.

Every executor gets its own cluster: one Nanny-managed worker process per
budget (declared as the ``crowdgraph_memory`` resource), on loopback.
Killing a worker is a SIGKILL of its process (the nanny then starts a new
one, which joins the crowd).
"""

from __future__ import annotations

import os
import signal
from typing import Any, Sequence

import pytest

distributed = pytest.importorskip("distributed")
testing = pytest.importorskip("crowdgraph.testing")

from crowdgraph_dask import MEMORY_RESOURCE, DaskExecutor  # noqa: E402


class _ClusterExecutor(DaskExecutor):
    """A DaskExecutor that also owns the cluster it runs on."""

    cluster: Any = None
    pids: dict[str, int] = {}

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.cluster is not None:
                self.cluster.close()


def _spec_cluster(budgets: Sequence[int]) -> Any:
    workers = {
        f"crowd-{n}": {"cls": distributed.Nanny, "options": {
            "nthreads": 1, "memory_limit": "512MB", "host": "127.0.0.1",
            "resources": {MEMORY_RESOURCE: budget}, "dashboard_address": ":0",
        }}
        for n, budget in enumerate(budgets)
    }
    scheduler = {"cls": distributed.Scheduler,
                 "options": {"host": "127.0.0.1", "port": 0, "dashboard_address": ":0"}}
    return distributed.SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40)


class TestDaskConformance(testing.ExecutorConformance):
    can_lose_workers = True
    # dask.distributed's own pools, made on first use and kept for the process: the offload
    # executor (distributed.utils) and the futures' callback executor (distributed.client).
    process_thread_prefixes = ("Dask-Offload", "Dask-Callback-Thread")

    def make_executor(self, budgets: Sequence[int]) -> DaskExecutor:
        cluster = _spec_cluster(budgets)
        try:
            executor = _ClusterExecutor.from_url("dask://" + cluster.scheduler_address.split("://", 1)[1])
        except BaseException:
            cluster.close()
            raise
        executor.cluster = cluster
        executor.client.wait_for_workers(len(budgets), timeout=60)
        executor.pids = executor.client.run(os.getpid)
        return executor

    def kill_worker(self, executor: Any, worker_id: str) -> None:
        os.kill(executor.pids[worker_id], signal.SIGKILL)

    def assert_stopped(self, executor: Any) -> None:
        assert executor.client.status == "closed"
        assert executor.cluster.status.name == "closed"
        for pid in executor.pids.values():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            raise AssertionError(f"worker process {pid} still runs after close()")
