"""Shared fixtures: a real LocalCluster on loopback (worker processes, one thread each)."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any, Callable

import pytest

distributed = pytest.importorskip("distributed")
import dask  # noqa: E402  (with distributed)


def cluster_kwargs(**kwargs: Any) -> dict[str, Any]:
    """LocalCluster options for tests: loopback, no dashboard, one thread per worker."""
    options = dict(n_workers=3, threads_per_worker=1, processes=True, memory_limit="512MB",
                   host="127.0.0.1", scheduler_port=0, dashboard_address=":0", silence_logs=40)
    options.update(kwargs)
    if not options["processes"]:
        options["protocol"] = "tcp://"  # not inproc://, so scheduler_port=0 and host apply
    return options


#: What the worker processes import before any task: a forkserver imports them once, then forks.
WORKER_IMPORTS = ["numpy", "onnx", "onnxruntime", "distributed", "crowdgraph", "crowdgraph_dask"]


@pytest.fixture(scope="session", autouse=True)
def no_spilling_or_pausing():
    """Workers neither spill nor pause: one in the test process (``processes=False``) would measure
    the whole process (GBs late in the suite), pause itself and stall its cluster's close for 30 s.

    Worker processes start from a forkserver that has imported :data:`WORKER_IMPORTS` (still one
    fresh process per worker, as with dask's default ``spawn``, but each starts in a second, not
    three, and closes without paying its interpreter's start again: most tests start a cluster).
    """
    multiprocessing.get_context("forkserver").set_forkserver_preload(WORKER_IMPORTS)
    config = {f"distributed.worker.memory.{key}": False for key in ("target", "spill", "pause")}
    config["distributed.worker.multiprocessing-method"] = "forkserver"
    with dask.config.set(config):
        yield


@pytest.fixture(scope="session")
def cluster_options() -> Callable[..., dict[str, Any]]:
    """:func:`cluster_kwargs`, as a fixture (test modules cannot import conftest)."""
    return cluster_kwargs


@pytest.fixture(scope="session")
def cluster():
    with distributed.LocalCluster(**cluster_kwargs()) as c:
        yield c


@pytest.fixture(scope="session")
def client(cluster):
    with distributed.Client(cluster, set_as_default=False) as c:
        # On a busy machine the scheduler may list the workers a moment after the cluster is up.
        c.wait_for_workers(len(cluster.workers), timeout=60)
        yield c


@pytest.fixture
def wait_for() -> Callable[..., Any]:
    """The :func:`_wait_for` helper, as a fixture."""
    return _wait_for


def _wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "a condition") -> Any:
    """Poll ``condition`` until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
