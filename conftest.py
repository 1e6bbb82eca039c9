"""Set-up every test directory shares: the order test files start in, and the run's plan store.

``make test`` runs the suite in pytest-xdist processes that each take one
file at a time (``--dist loadfile --no-loadscope-reorder``), handed out in
the order the files are collected.  The files that take longest start
first (:data:`LONGEST_FIRST`), so that no long file starts last and runs
alone while the other processes have finished.

Plans that several test files compile the same way are compiled once per
run and shared through a folder of the run (:func:`tests.plans.shared`):
this module names the folder in :data:`tests.plans.STORE_ENV` before the
pytest-xdist processes start, and removes it at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests.plans import STORE_ENV

#: Test files in the order they should start, longest first (CPU seconds of one run on a 2-core
#: machine, rounded: 90, 65, 50, 45, 45, 35 ...).  Files not listed follow in the order collected.
#: A stale entry only makes a run less even, never changes what runs.
LONGEST_FIRST = (
    "tests/test_memory.py",
    "tests/test_split.py",
    "tests/test_compile.py",
    "tests/test_zoo.py",
    "executors/tcp/tests/test_memory_instant.py",
    "tests/test_examples.py",
    "tests/test_benchmarks.py",
    "executors/tcp/tests/test_tcp.py",
    "executors/tcp/tests/test_direct.py",
    "tests/test_simulate.py",
    "executors/tcp/tests/test_tiles.py",
    "executors/tcp/tests/test_conformance.py",
    "tests/test_generate.py",
    "tests/test_schedule.py",
    "executors/dask/tests/test_conformance.py",
    "executors/tcp/tests/test_browser.py",
    "executors/tcp/tests/test_full_size.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put the files of :data:`LONGEST_FIRST` first, in its order; the rest keep theirs."""
    rank = {path: k for k, path in enumerate(LONGEST_FIRST)}
    root = config.rootpath

    def key(item: pytest.Item) -> int:
        try:
            path = item.path.relative_to(root).as_posix()
        except ValueError:
            return len(rank)
        return rank.get(path, len(rank))

    items.sort(key=key)  # stable: the tests of a file keep their order


def pytest_configure(config: pytest.Config) -> None:
    """Name the run's plan store (the first pytest process of a run does; its xdist processes inherit it)."""
    if os.environ.get(STORE_ENV):
        return
    folder = tempfile.mkdtemp(prefix="crowdgraph-test-plans-")
    os.environ[STORE_ENV] = folder
    config._crowdgraph_plan_store = folder  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = getattr(config, "_crowdgraph_plan_store", None)
    if folder is not None:
        os.environ.pop(STORE_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)
