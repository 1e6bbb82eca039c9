"""Replicas on a Dask cluster in barrier mode: every micro-batch of a partition
runs before the next partition starts, so one partition's tasks spread over
several holders and their results cross between workers."""

from __future__ import annotations

import pytest

import crowdgraph
from crowdgraph import zoo
from crowdgraph.testing import assert_one_partition_at_a_time
from tests.oracle import assert_matches, oracle

distributed = pytest.importorskip("distributed")
from crowdgraph_dask import DaskExecutor  # noqa: E402


def test_barrier_replicas_on_dask_match_the_oracle(client):
    model = zoo.distilbert("tiny")
    feeds = zoo.sample_inputs(model, batch=12, sequence=128)
    compiled = crowdgraph.compile(model, partitions=3, input_shapes={"input_ids": (1, 128)})
    with DaskExecutor(client) as executor:
        got = compiled.run(feeds, executor=executor, microbatch=1, mode="barrier")
        report = compiled.last_report
    assert_matches(got, oracle(model, feeds))
    assert max(len(workers) for workers in report.holders.values()) >= 2, report.holders
    assert_one_partition_at_a_time(report, compiled.partitions)
