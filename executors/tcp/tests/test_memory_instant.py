"""The memory promise at every instant, as a phone's out-of-memory killer would see it (slow).

A cold run of the full DistilBERT at 1 x 128 on five real ``crowdgraph-worker``
processes, each polled from outside (psutil, this process) at 100 Hz or more
through the whole run, partition loads included: the largest RSS above a
worker's idle floor stays within its announced budget.
"""

from __future__ import annotations

import threading
import time

import psutil
import pytest

import crowdgraph
from crowdgraph import zoo
from crowdgraph.units import parse_bytes
from crowdgraph_tcp import TcpExecutor
from tests.oracle import assert_matches, oracle

pytestmark = pytest.mark.slow

#: Seconds slept between two sweeps over the workers (about 300 Hz each when the machine is idle).
PERIOD = 0.002


class RssSampler:
    """Polls processes' RSS from outside on a thread; keeps each one's largest and its sampling rate."""

    def __init__(self, pids: dict[str, int]):
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = dict.fromkeys(pids, 0)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for name, process in self.processes.items():
                try:
                    self.peak[name] = max(self.peak[name], process.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            self.samples += 1
            time.sleep(PERIOD)

    def __enter__(self) -> "RssSampler":
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.hertz = self.samples / (time.perf_counter() - self.started)


def idle_rss(pids: dict[str, int]) -> dict[str, int]:
    """Each worker's idle floor: the largest of a few samples while it holds no partition."""
    floors = dict.fromkeys(pids, 0)
    for _ in range(20):
        for name, pid in pids.items():
            floors[name] = max(floors[name], psutil.Process(pid).memory_info().rss)
        time.sleep(PERIOD)
    return floors


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
