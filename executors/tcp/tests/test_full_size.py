"""Full-size DistilBERT over TCP (slow): the budget promise per worker process, and the exported model."""

from __future__ import annotations

import pytest

import crowdgraph
from crowdgraph import zoo
from crowdgraph_tcp import TcpExecutor
from tests import models
from tests.oracle import assert_matches, oracle

pytestmark = pytest.mark.slow


def test_full_distilbert_at_128mb_keeps_each_worker_within_its_estimate():
    model = zoo.distilbert("full")
    feeds = zoo.sample_inputs(model, batch=1, sequence=128)
    compiled = crowdgraph.compile(model, "128MB", sample=feeds)
    estimates = {p.name: p.resident_bytes for p in compiled.partitions}
    want = oracle(model, feeds)
    with TcpExecutor.local(workers=len(compiled.partitions) + 1, memory="128MB") as ex:
        floors = {w: peer.floor_rss for w, peer in dict(ex.coordinator.workers).items()}
        got = compiled.run(feeds, executor=ex, timeout=300)
        first = compiled.last_report
        assert_matches(got, want)
        assert first.weight_bytes_sent >= sum(len(p.model_bytes) for p in compiled.partitions)
        for task in first.tasks:
            record = first.workers[task.worker]
            above = record.peak_rss - floors[task.worker]
            # The worker's peak above its idle floor stays within the partition's estimate.
            assert 0 < above <= 1.05 * estimates[task.partition], (task.partition, above, estimates[task.partition])
        got = compiled.run(feeds, executor=ex, timeout=300)
        second = compiled.last_report
        assert_matches(got, want)
        assert second.weight_bytes_sent == 0 and set(second.tier_counts) == {1}


def test_exported_transformers_distilbert_matches_the_oracle():
    path = models.exported_distilbert("full")
    feeds = models.exported_distilbert_inputs(2, 64, size="full")
    compiled = crowdgraph.compile(str(path), "128MB", input_shapes={k: (1, 64) for k in feeds})
    with TcpExecutor.local(workers=4, memory="128MB") as ex:
        got = compiled.run(feeds, executor=ex, microbatch=1, mode="barrier", timeout=300)
    assert_matches(got, oracle(str(path), feeds))
