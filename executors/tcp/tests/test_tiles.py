"""Tiled image models over TCP (slow): equal to the oracle, each worker within the 16 MB budget at every instant.

ResNet-50, Inception v1 and DenseNet-121 at 1x3x224x224 compile at 16 MB only
with spatial tiles.  Each runs once on its own crowd of real
``crowdgraph-worker`` processes, polled from outside at 100 Hz or more
through the whole run, partition loads included (``test_memory_instant``'s
sampler): the largest RSS above a worker's idle floor stays
within the 16 MB it announced.
"""

from __future__ import annotations

import pytest

import crowdgraph
from crowdgraph.units import parse_bytes
from executors.tcp.tests.test_memory_instant import run_polled
from tests import models
from tests.oracle import assert_matches, oracle

pytestmark = pytest.mark.slow

BUDGET = "16MB"


@pytest.mark.parametrize("name", ["resnet50", "inception_v1", "densenet121"])
def test_tiled_cnn_at_16mb_over_tcp_equals_the_oracle_and_no_worker_exceeds_its_budget(name):
    model, feeds = models.light_cnn(name)
    compiled = crowdgraph.compile(model, BUDGET, sample=feeds)
    assert any(r.region for r in compiled.splits)
    got, hertz, above = run_polled(compiled, feeds, 3, BUDGET, f"{name} at {BUDGET}")
    assert_matches(got, oracle(model, feeds))
    assert hertz >= 100
    assert 0 < max(above.values()) <= parse_bytes(BUDGET), above
