"""Run: outputs equal the oracle on the thread executor, for every model, mode and crowd."""

from __future__ import annotations

import functools
import threading

import numpy as np
import pytest

import crowdgraph
from crowdgraph import ThreadExecutor, WorkerInfo, zoo
from crowdgraph.testing import watch_notices
from tests import models, plans
from tests.oracle import assert_matches, oracle

CASES = {
    "chain": models.chain,
    "diamond": models.diamond,
    "skip": models.skip,
    "multi_io": models.multi_io,
    "shared_initializer": models.shared_initializer,
    "if": models.if_model,
    "loop": models.loop_model,
    "constant_subgraphs": models.constant_subgraphs,
    "squeezenet": lambda: models.light_cnn("squeezenet"),
    "tiny_distilbert": lambda: (zoo.distilbert("tiny"), zoo.sample_inputs("tiny", batch=5, sequence=12)),
}


def batched(model_feeds, rows):
    """The case's feeds repeated to ``rows`` rows (so micro-batches exist)."""
    model, feeds = model_feeds
    big = {}
    for name, value in feeds.items():
        reps = -(-rows // value.shape[0])
        big[name] = np.concatenate([value] * reps)[:rows] if value.ndim else value
    return model, big


def crowds(budget):
    """One worker; more workers than partitions; mixed budgets forcing swaps."""
    return {
        "one": [WorkerInfo("solo", memory=budget)],
        "many": [WorkerInfo(f"w{n}", memory=budget) for n in range(6)],
        "mixed": [WorkerInfo("big", memory=budget), WorkerInfo("small", memory=1),
                  WorkerInfo("mid", memory=budget, speed=0.5)],
    }


@functools.cache
def case(name: str):
    """``(model, feeds, rows)`` of case ``name``, built once: six tests share each."""
    model, feeds = CASES[name]()
    rows = 1 if name == "squeezenet" else 5
    if rows > 1:
        model, feeds = batched((model, feeds), rows)
    for value in feeds.values():
        value.flags.writeable = False  # shared: no run may change another test's inputs
    return model, feeds, rows


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("mode", ["streaming", "barrier"])
@pytest.mark.parametrize("crowd", ["one", "many", "mixed"])
def test_outputs_match_the_oracle(name, mode, crowd):
    model, feeds, rows = case(name)
    compiled = plans.compiled(model, partitions=3, sample=feeds)
    budget = max(p.resident_bytes for p in compiled.partitions)
    want = plans.expected(model, feeds)
    for microbatch in ([None] if rows == 1 else [2, 5]):  # 2 does not divide 5
        with ThreadExecutor(workers=crowds(budget)[crowd]) as ex:
            got = compiled.run(feeds, executor=ex, microbatch=microbatch, mode=mode)
            report = compiled.last_report
        assert_matches(got, want)
        assert len(report.tasks) == len(compiled.partitions) * report.microbatches


def test_mixed_budgets_force_tier_4_swaps():
    model, feeds = batched(models.chain(), 6)
    compiled = crowdgraph.compile(model, partitions=3, sample=feeds)
    budget = max(p.resident_bytes for p in compiled.partitions)
    with ThreadExecutor(workers=[WorkerInfo("only-one-fits", memory=budget), WorkerInfo("tiny", memory=1)]) as ex:
        got = compiled.run(feeds, executor=ex, microbatch=2)
        report = compiled.last_report
    assert_matches(got, oracle(model, feeds))
    assert report.workers["tiny"].tasks == 0
    assert report.tier_counts.get(4, 0) >= 2


def test_report_agrees_with_events(tmp_path):
    model, feeds = batched(models.chain(), 8)
    compiled = crowdgraph.compile(model, partitions=3, sample=feeds)
    with ThreadExecutor(workers=2) as ex:
        compiled.run(feeds, executor=ex, microbatch=2)
        report = compiled.last_report
    assert len(report.tasks) == 3 * 4
    assert sorted((t.partition, t.microbatch) for t in report.tasks) == sorted(
        (p.name, i) for p in compiled.partitions for i in range(4))
    assert sum(w.tasks for w in report.workers.values()) == len(report.tasks)
    assert sum(w.loads for w in report.workers.values()) == len(report.loads)
    assert sum(report.tier_counts.values()) == len(report.tasks)
    for w in report.workers.values():
        assert sum(w.tiers.values()) == w.tasks
        assert w.bytes_in == sum(t.wire_in for t in report.tasks if t.worker == w.id)
    first = next(t for t in report.tasks if t.partition == "p0")
    assert first.bytes_in == 2 * feeds["x"].nbytes // 8
    assert all(t.end >= t.start >= report.start for t in report.tasks)
    text = str(report)
    assert "tiers 1/2/3/4" in text and "12 tasks" in text
    data = report.to_json(tmp_path / "run.json")
    assert (tmp_path / "run.json").read_text() == data and '"tier_counts"' in data
    report.plot_timeline(tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_run_on_the_same_crowd_starts_resident():
    model, feeds = batched(models.chain(), 4)
    compiled = crowdgraph.compile(model, partitions=1, sample=feeds)
    with ThreadExecutor(workers=2) as ex:
        compiled.run(feeds, executor=ex, microbatch=2)
        before = compiled.last_report
        got = compiled.run(feeds, executor=ex, microbatch=2)
        report = compiled.last_report
    assert_matches(got, oracle(model, feeds))
    # Every worker that ran the one partition still holds it: its tasks in
    # the second run come at tier 1, with no load before them.
    held = {t.worker: t.partition for t in sorted(before.tasks, key=lambda t: t.end)}
    firsts = {}
    for t in sorted(report.tasks, key=lambda t: t.start):
        firsts.setdefault(t.worker, t)
    resident_first = [t for w, t in firsts.items() if t.partition == held.get(w)]
    assert resident_first and all(t.tier == 1 for t in resident_first)
    for t in resident_first:
        assert not any(load.worker == t.worker and load.end <= t.start for load in report.loads)


def test_a_later_run_on_the_same_executor_starts_from_the_durations_measured_before(monkeypatch):
    # The FLOPs seed assumes a phone; what the crowd measured is better.  It
    # is kept per executor and per row the plan was compiled at, so a run at
    # another micro-batch size starts from it scaled.
    import crowdgraph.driver as driver

    seeds = []

    class Recording(driver.Scheduler):
        def __init__(self, *args, estimates=None, **kwargs):
            seeds.append(dict(estimates or {}))
            super().__init__(*args, estimates=estimates, **kwargs)

    monkeypatch.setattr(driver, "Scheduler", Recording)
    model, feeds = batched(models.chain(), 4)
    compiled = crowdgraph.compile(model, partitions=2, sample=feeds)  # at 4 rows
    names = [p.name for p in compiled.partitions]
    with ThreadExecutor(workers=2) as ex:
        compiled.run(feeds, executor=ex, microbatch=1)
        per_row = {p.name: driver._measured_on(ex)[p.sha256] for p in compiled.partitions}
        got = compiled.run(feeds, executor=ex, microbatch=2)
    assert_matches(got, oracle(model, feeds))
    assert seeds[0] == {} and sorted(seeds[1]) == names
    assert all(per_row[p] > 0 for p in names)
    assert seeds[1] == pytest.approx({p: per_row[p] * 2 / 4 for p in names})  # 2 of the 4 rows
    with ThreadExecutor(workers=2) as fresh:  # another crowd starts from the FLOPs again
        compiled.run(feeds, executor=fresh, microbatch=1)
    assert seeds[2] == {}


def test_worker_lost_mid_run_its_tasks_are_placed_again():
    model, feeds = batched(models.chain(), 12)
    compiled = crowdgraph.compile(model, partitions=3, sample=feeds)
    ex = ThreadExecutor(workers=3)
    lost = []

    def lose_after_first_tasks(notice):
        if notice.kind == "finished" and notice.key == ("p0", 1) and not lost:
            lost.append(notice.worker)
            threading.Thread(target=ex.lose_worker, args=(notice.worker,)).start()

    watch_notices(ex, lose_after_first_tasks)
    with ex:
        got = compiled.run(feeds, executor=ex, microbatch=1)
        report = compiled.last_report
    assert_matches(got, oracle(model, feeds))
    lost = [w for w in report.workers.values() if w.lost]
    assert len(lost) == 1
    assert len({(t.partition, t.microbatch) for t in report.tasks}) == len(report.tasks) == 36


def test_losing_every_capable_worker_is_a_clear_error():
    model, feeds = batched(models.chain(), 4)
    compiled = crowdgraph.compile(model, partitions=2, sample=feeds)
    ex = ThreadExecutor(workers=1)
    original = ex.start

    def start(job, reporter):
        crowd = original(job, reporter)
        threading.Thread(target=ex.lose_worker, args=(crowd[0].id,)).start()
        return crowd

    ex.start = start
    with ex, pytest.raises(crowdgraph.WorkerLostError, match="thread-0"):
        compiled.run(feeds, executor=ex, microbatch=1)


def test_larger_micro_batches_than_compiled_are_repartitioned():
    model = zoo.distilbert("tiny")
    small = zoo.sample_inputs(model, batch=1, sequence=8)
    compiled = crowdgraph.compile(model, "16MB", sample=small)
    feeds = zoo.sample_inputs(model, batch=8, sequence=64)
    got = compiled.run(feeds, microbatch=8)
    assert_matches(got, oracle(model, feeds))
    plan = compiled.at_shapes({k: v.shape for k, v in feeds.items()})
    assert plan is not compiled and plan.input_shapes["input_ids"] == (8, 64)
    assert all(p.resident_bytes <= compiled.memory_budget for p in plan.partitions)


def test_run_from_a_loaded_plan(tmp_path):
    model, feeds = batched(models.skip(), 4)
    crowdgraph.compile(model, partitions=3, sample=feeds).save(tmp_path / "plan")
    got = crowdgraph.load(tmp_path / "plan").run(feeds, executor="threads", microbatch=2, mode="barrier")
    assert_matches(got, oracle(model, feeds))


# -- clear errors ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    model = zoo.distilbert("tiny")
    feeds = zoo.sample_inputs(model, batch=2, sequence=8)
    return model, crowdgraph.compile(model, partitions=2, sample=feeds), feeds


@pytest.fixture(scope="module")
def tiny(tiny_model):
    _, compiled, feeds = tiny_model
    return compiled, feeds


def test_wrong_input_names(tiny):
    compiled, feeds = tiny
    with pytest.raises(crowdgraph.InputError, match=r"missing \['attention_mask'\]"):
        compiled.run({"input_ids": feeds["input_ids"]})
    with pytest.raises(crowdgraph.InputError, match=r"unknown \['mask'\]"):
        compiled.run({**feeds, "mask": feeds["attention_mask"]})


def test_wrong_dtype_rank_and_batch(tiny):
    compiled, feeds = tiny
    with pytest.raises(crowdgraph.InputError, match=r"astype\(np.int64\)"):
        compiled.run({**feeds, "input_ids": feeds["input_ids"].astype(np.int32)})
    with pytest.raises(crowdgraph.InputError, match="shape"):
        compiled.run({**feeds, "input_ids": feeds["input_ids"][0]})
    with pytest.raises(crowdgraph.InputError, match="batch size"):
        compiled.run({**feeds, "input_ids": np.concatenate([feeds["input_ids"]] * 2)})
    with pytest.raises(crowdgraph.InputError, match="mode"):
        compiled.run(feeds, mode="sideways")


def test_empty_crowd_and_crowd_that_fits_nothing(tiny):
    compiled, feeds = tiny
    with pytest.raises(crowdgraph.PlanningError):
        compiled.run(feeds, executor=ThreadExecutor(workers=[]))
    need = max(p.resident_bytes for p in compiled.partitions)
    with pytest.raises(crowdgraph.PlanningError, match=crowdgraph.format_bytes(need - 1)[:3]):
        compiled.run(feeds, executor=ThreadExecutor(workers=[WorkerInfo("phone", memory=need - 1)]))


def test_unknown_executor_lists_installed(tiny):
    compiled, feeds = tiny
    with pytest.raises(crowdgraph.ExecutorNotFound, match="threads"):
        compiled.run(feeds, executor="carrier-pigeon")


@pytest.mark.parametrize("policy", ["cost", "pipeline", "greedy"])
def test_every_placement_policy_matches_the_oracle(tiny_model, policy):
    model, compiled, feeds = tiny_model
    with ThreadExecutor(workers=4) as ex:
        got = compiled.run(feeds, executor=ex, microbatch=1, policy=policy)
        report = compiled.last_report
    assert_matches(got, oracle(model, feeds))
    assert len(report.tasks) == len(compiled.partitions) * 2


def test_unknown_policy_names_the_policies(tiny):
    compiled, feeds = tiny
    with pytest.raises(crowdgraph.PlanningError, match="'cost', 'pipeline', 'greedy'"):
        compiled.run(feeds, policy="fastest")
