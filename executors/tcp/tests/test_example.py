"""examples/tcp_local.py runs by itself and matches the whole model."""

from __future__ import annotations

import doctest
import re
import subprocess
import sys

from pathlib import Path

import crowdgraph_tcp.common
import crowdgraph_tcp.bridge
import crowdgraph_tcp.peers
import crowdgraph_tcp.worker

REPO = Path(__file__).resolve().parents[3]


def test_the_tcp_example_runs_and_matches_the_oracle(tcp_helpers):
    done = subprocess.run([sys.executable, str(REPO / "examples" / "tcp_local.py")], env=tcp_helpers.child_env(),
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    diffs = [float(x) for x in re.findall(r"max abs difference to the whole model: (\S+)", done.stdout)]
    assert len(diffs) == 2 and max(diffs) <= 1e-4, done.stdout
    sent = [int(x) for x in re.findall(r"partition bytes sent: (\d+)$", done.stdout, re.M)]
    assert sent[0] > 0 and sent[1] < sent[0], done.stdout  # held or cached; a new replica may still load
    assert "peak RSS" in done.stdout


def test_doctests_of_the_package():
    for module in (crowdgraph_tcp.common, crowdgraph_tcp.worker, crowdgraph_tcp.peers, crowdgraph_tcp.bridge):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
