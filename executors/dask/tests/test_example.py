"""examples/dask_local.py runs by itself, matches the whole model and loads from the workers' disks."""

from __future__ import annotations

import doctest
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("distributed")
import crowdgraph_dask._cache  # noqa: E402
import crowdgraph_dask._cluster  # noqa: E402
import crowdgraph_dask._lanes  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


def test_the_dask_example_runs_and_loads_from_the_workers_disks_the_second_time():
    done = subprocess.run([sys.executable, str(REPO / "examples" / "dask_local.py")], capture_output=True,
                          text=True, timeout=180, cwd=REPO)
    assert done.returncode == 0, done.stderr
    diffs = [float(x) for x in re.findall(r"max abs difference to the whole model: (\S+)", done.stdout)]
    assert len(diffs) == 2 and max(diffs) <= 1e-4, done.stdout
    sent = [int(x) for x in re.findall(r"partition bytes sent: (\d+)$", done.stdout, re.M)]
    from_disk = [(int(a), int(b)) for a, b in re.findall(r"loads from the workers' disks: (\d+) of (\d+)", done.stdout)]
    assert from_disk[0][0] == 0 and sent[0] > 0, done.stdout
    # A worker may still load a partition it never had (a replica), so not every load need be from disk.
    assert from_disk[1][0] >= 1 and sent[1] < sent[0], done.stdout


def test_doctests_of_the_package():
    for module in (crowdgraph_dask._cache, crowdgraph_dask._cluster, crowdgraph_dask._lanes):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
