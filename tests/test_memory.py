"""The budget is a promise: measured peak RSS above the floor never exceeds the estimate.

Each partition is loaded from its plan file and run once in a fresh
process (crowdgraph.measure); its peak RSS minus the RSS after importing
numpy and onnxruntime must be at most its estimated resident memory.
"""

from __future__ import annotations

import pytest

import crowdgraph
from crowdgraph import zoo
from crowdgraph.measure import measure_plan
from tests import models


def assert_within_estimates(compiled, feeds, tmp_path):
    rows = measure_plan(compiled, feeds, tmp_path / "plan")
    assert len(rows) == len(compiled.partitions)
    for row in rows:
        assert row["above_floor"] > 0
        assert row["above_floor"] <= row["estimate"], (
            f"{row['partition']}: measured {row['above_floor'] / 1e6:.1f} MB above the floor, "
            f"estimate {row['estimate'] / 1e6:.1f} MB")
        if compiled.memory_budget is not None:
            assert row["estimate"] <= compiled.memory_budget


def smallest_budget(model, feeds) -> int:
    """The budget at which every node fits on its own (layer granularity)."""
    finest = crowdgraph.compile(model, partitions=10**6, sample=feeds)
    return max(p.resident_bytes for p in finest.partitions)


def test_tiny_model_partitions_stay_within_estimates(tmp_path):
    model = zoo.distilbert("tiny")
    feeds = zoo.sample_inputs(model, batch=8, sequence=64)
    assert_within_estimates(crowdgraph.compile(model, partitions=3, sample=feeds), feeds, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 8])
def test_embedded_distilbert_at_128mb(tmp_path, batch):
    model = zoo.distilbert("full")
    feeds = zoo.sample_inputs(model, batch=batch, sequence=128)
    assert_within_estimates(crowdgraph.compile(model, "128MB", sample=feeds), feeds, tmp_path)


@pytest.mark.slow
def test_exported_distilbert_at_128mb_and_at_the_smallest_budget(tmp_path):
    path = models.exported_distilbert("full")
    feeds = models.exported_distilbert_inputs(1, 128, size="full")
    assert_within_estimates(crowdgraph.compile(path, "128MB", sample=feeds), feeds, tmp_path / "a")
    budget = smallest_budget(path, feeds)
    compiled = crowdgraph.compile(path, budget, sample=feeds)
    assert max(p.weight_bytes for p in compiled.partitions) > 89 * 2**20, "the word embeddings set the floor"
    assert_within_estimates(compiled, feeds, tmp_path / "b")
