"""Tiled image models over TCP (slow): equal to the oracle, each worker within the 16 MB budget at every instant.

ResNet-50, Inception v1 and DenseNet-121 at 1x3x224x224 compile at 16 MB only
with spatial tiles.  Each runs once on its own crowd of real
``crowdgraph-worker`` processes, polled from outside at 100 Hz or more
through the whole run, partition loads included (the sampler of
``test_memory_instant``): the largest RSS above a worker's idle floor stays
within the 16 MB it announced.
"""

from __future__ import annotations

import pytest

import crowdgraph
from crowdgraph.units import parse_bytes
from crowdgraph_tcp import TcpExecutor
from executors.tcp.tests.test_memory_instant import RssSampler, idle_rss
from tests import models
from tests.oracle import assert_matches, oracle

pytestmark = pytest.mark.slow

BUDGET = "16MB"


@pytest.mark.parametrize("name", ["resnet50", "inception_v1", "densenet121"])
def test_tiled_cnn_at_16mb_over_tcp_equals_the_oracle_and_no_worker_exceeds_its_budget(name):
    model, feeds = models.light_cnn(name)
    compiled = crowdgraph.compile(model, BUDGET, sample=feeds)
    assert any(r.region for r in compiled.splits)
    want = oracle(model, feeds)
    with TcpExecutor.local(workers=3, memory=BUDGET) as ex:
        pids = {worker: proc.pid for worker, proc in ex.processes.items()}
        floors = idle_rss(pids)
        with RssSampler(pids) as sampler:
            got = compiled.run(feeds, executor=ex, timeout=600)
    assert_matches(got, want)
    above = {worker: sampler.peak[worker] - floors[worker] for worker in pids}
    print(f"\n{name} at {BUDGET}: sampled at {sampler.hertz:.0f} Hz per worker; largest RSS above the idle "
          "floor (MB): " + ", ".join(f"{w} {v / 1e6:.1f}" for w, v in sorted(above.items())))
    assert sampler.hertz >= 100
    assert 0 < max(above.values()) <= parse_bytes(BUDGET), above
