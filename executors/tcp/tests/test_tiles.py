"""Tiled image models over TCP (slow): equal to the oracle, each worker within the 16 MB budget."""

from __future__ import annotations

import pytest

import crowdgraph
from crowdgraph_tcp import TcpExecutor
from tests import models
from tests.oracle import assert_matches, oracle

pytestmark = pytest.mark.slow


def test_resnet50_at_16mb_over_tcp_keeps_each_worker_within_the_budget():
    model, feeds = models.light_cnn("resnet50")
    compiled = crowdgraph.compile(model, "16MB", sample=feeds)
    assert any(r.region for r in compiled.splits)
    with TcpExecutor.local(workers=3, memory="16MB") as ex:
        floors = {w: peer.floor_rss for w, peer in dict(ex.coordinator.workers).items()}
        got = compiled.run(feeds, executor=ex, timeout=300)
        report = compiled.last_report
    assert_matches(got, oracle(model, feeds))
    for worker in {task.worker for task in report.tasks}:
        above = report.workers[worker].peak_rss - floors[worker]
        assert 0 < above <= 16_000_000, (worker, above)
