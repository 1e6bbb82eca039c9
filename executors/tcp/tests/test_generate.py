"""Generation on a real TCP crowd: a worker keeping caches SIGKILLed mid-generation changes no token."""

from __future__ import annotations

import os
import signal
import threading

import pytest

import crowdgraph
from crowdgraph import zoo
from crowdgraph.generate import decode, left_padded
from crowdgraph.runtime import open_session, run_session
from crowdgraph.testing import watch_notices
from crowdgraph_tcp import TcpExecutor
from tests.models import OPTIMUM_DECODERS, optimum_decoder, whole_model_tokens

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14], [15, 16]]
NEW_TOKENS = 8


def test_a_worker_keeping_caches_killed_mid_generation_changes_no_token():
    model = zoo.gpt2("tiny")
    compiled = crowdgraph.compile(model, partitions=3, max_length=16)
    session = open_session(model.SerializeToString())
    dims = {t.name: (t.dims[1], t.dims[3]) for t in compiled.inputs if t.name.startswith("past_key_values.")}
    ids, mask = left_padded(PROMPTS)
    want = [s.tokens.tolist() for s in decode(lambda feeds: run_session(session, feeds), compiled.decoder_layout,
                                              dims, ids, mask, max_new_tokens=NEW_TOKENS)]

    budget = 2 * max(p.resident_bytes for p in compiled.partitions)  # room for every sequence's cache
    executor = TcpExecutor.local(memory=[budget] * 5, heartbeat=2.0, join_timeout=60)
    keepers: set[str] = set()
    killed: list[str] = []

    def kill_a_keeper(notice):
        # Stopped first, so the tasks placed on it meanwhile are in its hands when it dies.
        if notice.kind == "finished" and notice.worker in keepers and not killed:
            killed.append(notice.worker)
            pid = executor.processes[notice.worker].pid
            os.kill(pid, signal.SIGSTOP)
            threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()

    watch_notices(executor, kill_a_keeper)
    steps = []
    try:
        for step in compiled.generate(PROMPTS, max_new_tokens=NEW_TOKENS, executor=executor, stream=True,
                                      timeout=120):
            steps.append(step)
            if step.index == 2:  # every keeper holds the caches of all five sequences now
                keepers.update(w for w, n in compiled.last_report.kept.items() if n == len(PROMPTS))
    finally:
        executor.close()
    assert [s.tokens.tolist() for s in steps] == want
    report = compiled.last_report
    assert keepers and killed and killed[0] in report.lost_workers
    assert report.replaced, "the killed worker's tasks were run again"
    assert {(p, r) for _, p, r, _ in report.rebuilt} == {(p, r) for p in {p for _, p, _, _ in report.rebuilt}
                                                         for r in range(len(PROMPTS))}, report.rebuilt
    assert f"lost {killed[0]}" in str(report) and "caches rebuilt" in str(report)


def test_workers_stay_within_budget_at_max_length_sampled_from_outside():
    """Generate up to max_length on warm workers that keep caches, polling each worker process's RSS from outside."""
    from crowdgraph.measure import RssSampler

    max_length, budget = 64, 24_000_000
    compiled = crowdgraph.compile(zoo.gpt2("small"), budget, max_length=max_length)
    prompts = [[7] * 40, [8] * 24]  # 40 + 24 new tokens: the last step holds a cache of 63 tokens
    executor = TcpExecutor.local(memory=[budget] * len(compiled.partitions), threads=1, join_timeout=60)
    try:
        floors = {w: peer.floor_rss for w, peer in dict(executor.coordinator.workers).items()}
        compiled.generate(prompts, max_new_tokens=2, executor=executor)  # every partition loaded
        with RssSampler({w: p.pid for w, p in executor.processes.items()}) as sampler:
            compiled.generate(prompts, max_new_tokens=max_length - 40, executor=executor, timeout=120)
    finally:
        executor.close()
    kept = compiled.last_report.kept
    assert any(kept.values()), f"the workers kept caches within their budgets: {kept}"
    above = {w: sampler.peak[w] - floors[w] for w in floors}
    assert all(value <= budget for value in above.values()), f"above floor: {above}, budget {budget}"
    assert max(above.values()) > budget / 4, f"the sampler saw the work: {above}"


@pytest.mark.parametrize("kind", OPTIMUM_DECODERS)
def test_decoders_exported_by_optimum_generate_over_tcp(kind):
    """Three partitions on four workers that keep the caches (tests/test_generate.py runs the
    smallest budget, 115-126 partitions, on thread workers)."""
    path = optimum_decoder(kind)
    compiled = crowdgraph.compile(path, partitions=3, max_length=16)
    budget = 4 * max(p.resident_bytes for p in compiled.partitions)
    with TcpExecutor.local(memory=[budget] * 4, join_timeout=60) as executor:
        out = compiled.generate(PROMPTS, max_new_tokens=NEW_TOKENS, executor=executor, timeout=120)
    assert out[:, -NEW_TOKENS:].tolist() == whole_model_tokens(path, PROMPTS, NEW_TOKENS)
    assert any(compiled.last_report.kept.values()), "the workers kept the caches"
