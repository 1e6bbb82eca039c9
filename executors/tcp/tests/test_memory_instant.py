"""The memory promise at every instant, as a phone's out-of-memory killer would see it (slow).

A cold run of the full DistilBERT at 1 x 128 on five real ``crowdgraph-worker``
processes, each polled from outside (``crowdgraph.measure.RssSampler``, this process) at 100 Hz or more
through the whole run, partition loads included: the largest RSS above a
worker's idle floor stays within its announced budget.
"""

from __future__ import annotations

import time

import pytest

import crowdgraph
from crowdgraph import zoo
from crowdgraph.measure import RssSampler
from crowdgraph.units import parse_bytes
from crowdgraph_tcp import TcpExecutor
from tests.oracle import assert_matches, oracle

pytestmark = pytest.mark.slow


def idle_rss(pids: dict[str, int]) -> dict[str, int]:
    """Each worker's idle floor: the largest of a few samples while it holds no partition."""
    with RssSampler(pids) as sampler:
        time.sleep(0.05)
    return sampler.peak


def run_polled(compiled, feeds, workers: int, budget: str, label: str) -> tuple[dict, float, dict[str, int]]:
    """Run ``compiled`` on a fresh local crowd polled from outside throughout.

    Returns the outputs, the sampling rate per worker (Hz) and each worker's
    largest RSS above its idle floor; prints the last two under ``label``.
    """
    with TcpExecutor.local(workers=workers, memory=budget) as ex:
        pids = {name: proc.pid for name, proc in ex.processes.items()}
        floors = idle_rss(pids)
        with RssSampler(pids) as sampler:
            got = compiled.run(feeds, executor=ex, timeout=600)
    above = {name: sampler.peak[name] - floors[name] for name in pids}
    print(f"\n{label}: sampled at {sampler.hertz:.0f} Hz per worker; largest RSS above the idle floor (MB): "
          + ", ".join(f"{name} {value / 1e6:.1f}" for name, value in sorted(above.items())))
    return got, sampler.hertz, above


@pytest.fixture(scope="module")
def distilbert():
    model = zoo.distilbert("full")
    feeds = zoo.sample_inputs(model, batch=1, sequence=128)
    return model, feeds, oracle(model, feeds)


@pytest.mark.parametrize("budget", ["128MB", "48MB", "24MB"])
def test_no_worker_exceeds_its_budget_at_any_sampled_instant_of_a_cold_run(distilbert, budget):
    model, feeds, want = distilbert
    compiled = crowdgraph.compile(model, budget, sample=feeds)
    got, hertz, above = run_polled(compiled, feeds, 5, budget, budget)
    assert_matches(got, want)
    assert hertz >= 100
    assert max(above.values()) <= parse_bytes(budget), above
