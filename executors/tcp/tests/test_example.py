"""examples/tcp_local.py runs by itself and matches the whole model."""

from __future__ import annotations

import doctest
import re

import crowdgraph_tcp.common
import crowdgraph_tcp.bridge
import crowdgraph_tcp.peers
import crowdgraph_tcp.worker


def test_the_tcp_example_runs_and_matches_the_oracle(tcp_helpers):
    out = tcp_helpers.run_example("tcp_local.py", timeout=120)
    diffs = [float(x) for x in re.findall(r"max abs difference to the whole model: (\S+)", out)]
    assert len(diffs) == 2 and max(diffs) <= 1e-4, out
    sent = [int(x) for x in re.findall(r"partition bytes sent: (\d+)$", out, re.M)]
    assert sent[0] > 0 and sent[1] < sent[0], out  # held or cached; a new replica may still load
    assert "peak RSS" in out


def test_doctests_of_the_package():
    for module in (crowdgraph_tcp.common, crowdgraph_tcp.worker, crowdgraph_tcp.peers, crowdgraph_tcp.bridge):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
