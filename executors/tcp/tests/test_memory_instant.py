"""The memory promise at every instant, as a phone's out-of-memory killer would see it (slow).

A cold run of the full DistilBERT at 1 x 128 on five real ``crowdgraph-worker``
processes, each polled from outside (``crowdgraph.measure.RssSampler``, this process) at 100 Hz or more
through the whole run, partition loads included: the largest RSS above a
worker's idle floor stays within its announced budget.  And at 128 MB, twice on
one crowd: what each worker reports as its peak stays within the estimate of
the partition it ran, and the second run sends no weights.
"""

from __future__ import annotations

import time

import pytest

import crowdgraph
from crowdgraph import zoo
from crowdgraph.measure import RssSampler
from crowdgraph.units import parse_bytes
from crowdgraph_tcp import TcpExecutor
from tests import plans as shared_plans
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


@pytest.fixture(scope="module")
def plan_at(distilbert):
    """``plan_at(budget)``: the full DistilBERT compiled at ``budget`` for 1 x 128, once in this module
    (runs do not change a plan; each test runs it on a crowd of its own) and once in the run
    (test_simulate reads the 48 MB plan too)."""
    model, feeds, _ = distilbert
    plans: dict[str, crowdgraph.CompiledModel] = {}

    def get(budget: str) -> crowdgraph.CompiledModel:
        if budget not in plans:
            plans[budget] = shared_plans.shared(model, budget, sample=feeds)
        return plans[budget]

    yield get
    plans.clear()


@pytest.mark.parametrize("budget", ["128MB", "48MB", "24MB"])
def test_no_worker_exceeds_its_budget_at_any_sampled_instant_of_a_cold_run(distilbert, plan_at, budget):
    model, feeds, want = distilbert
    compiled = plan_at(budget)
    got, hertz, above = run_polled(compiled, feeds, 5, budget, budget)
    assert_matches(got, want)
    assert hertz >= 100
    assert max(above.values()) <= parse_bytes(budget), above


# Here rather than in test_full_size.py, to share the 128 MB plan and the oracle with the test above.
def test_full_distilbert_at_128mb_keeps_each_worker_within_its_estimate(distilbert, plan_at):
    model, feeds, want = distilbert
    compiled = plan_at("128MB")
    estimates = {p.name: p.resident_bytes for p in compiled.partitions}
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
