"""Spot checks: the pure decisions of crowdgraph.audit, and runs with lying thread workers."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import crowdgraph
from crowdgraph import ThreadExecutor, WorkerInfo, zoo
from crowdgraph.audit import (
    FLOAT_TOLERANCE, Reputation, arrays_agree, audit_rate, chosen_for_audit, results_agree, tainted, vote,
)
from crowdgraph.errors import ExecutionError, InputError
from crowdgraph.runtime import open_session, run_session
from crowdgraph.schedule import Run, Scheduler, TaskFinished, WorkerLost
from tests.models import chain
from tests.oracle import assert_matches, oracle

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

# ------------------------------------------------------------ which tasks


@settings(max_examples=30, deadline=None)
@given(rate=st.floats(0.02, 0.98), seed=st.integers(0, 2**31))
def test_the_share_of_tasks_chosen_is_the_rate_and_the_same_every_time(rate, seed):
    keys = [(f"p{p}", i) for p in range(20) for i in range(200)]
    chosen = [chosen_for_audit(seed, k, "w", rate) for k in keys]
    share = sum(chosen) / len(keys)
    assert abs(share - rate) < 4 * (rate * (1 - rate) / len(keys)) ** 0.5 + 1e-9  # four standard deviations
    assert chosen == [chosen_for_audit(seed, k, "w", rate) for k in keys]


@given(passed=st.integers(0, 20), disagreements=st.integers(0, 3), base=st.floats(0.0, 1.0))
def test_unproven_and_suspect_workers_are_checked_at_least_as_often_as_proven_ones(passed, disagreements, base):
    record = Reputation(passed=passed, disagreements=disagreements)
    proven = audit_rate(base, Reputation(passed=passed + 3))
    assert proven == min(base, 1.0)
    assert audit_rate(base, record) >= proven
    assert audit_rate(base, record) == (0.0 if base == 0 else 1.0 if disagreements else audit_rate(base, record))


# ------------------------------------------------------------ comparing results

floats = st.sampled_from(["float32", "float64", "float16"])


@settings(max_examples=60, deadline=None)
@given(dtype=floats, seed=st.integers(0, 2**31), scale=st.floats(1e-3, 1e3), size=st.integers(1, 64))
def test_results_within_the_bound_agree_and_one_changed_value_beyond_it_does_not(dtype, seed, scale, size):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(size) * scale).astype(dtype)
    bound = FLOAT_TOLERANCE[dtype] * max(1.0, float(np.max(np.abs(a.astype(np.float64)))))
    assert arrays_agree(a, a) and arrays_agree(a, a.copy())
    close = (a.astype(np.float64) + rng.uniform(-0.4, 0.4, size) * bound).astype(dtype)
    assert arrays_agree(a, close) and arrays_agree(close, a)  # symmetric
    far = a.copy()
    i = int(rng.integers(size))
    far[i] = np.asarray(far[i].astype(np.float64) + 3 * bound + 1).astype(dtype)
    assert not arrays_agree(a, far) and not arrays_agree(far, a)
    nan = a.copy()
    nan[i] = np.nan
    assert not arrays_agree(a, nan) and arrays_agree(nan, nan.copy())


@given(values=st.lists(st.integers(-2**40, 2**40), min_size=1, max_size=20), i=st.integers(0, 19))
def test_integer_results_agree_only_when_equal(values, i):
    a = np.array(values, dtype=np.int64)
    b = a.copy()
    b[i % len(b)] += 1
    assert arrays_agree(a, a.copy()) and not arrays_agree(a, b)
    assert not arrays_agree(a, a.astype(np.int32)) and not arrays_agree(a, a[None])


@pytest.mark.parametrize("case", ["distilbert", "chain"])
def test_the_float_bound_leaves_headroom_over_onnxruntime_run_to_run_and_thread_count_variation(case):
    """The calibration behind FLOAT_TOLERANCE: the same partitions run with
    1, 2 and 4 intra-op threads, twice each, differ by far less than the bound
    (measured here: 0 for the tiny DistilBERT, under 1e-6 of the magnitude
    for the 256-wide chain, whose long reductions are split by thread count)."""
    if case == "distilbert":
        model = zoo.distilbert("tiny")
        feeds = zoo.sample_inputs(model, batch=4, sequence=32)
    else:
        model, feeds = chain(n_layers=6, width=256, batch=8)
    compiled = crowdgraph.compile(model, partitions=3, input_shapes={k: v.shape for k, v in feeds.items()})
    values = dict(feeds)
    worst = 0.0
    for part in compiled.partitions:
        inputs = {name: values[name] for name in part.inputs}
        runs = [run_session(open_session(part.model_bytes, threads), inputs, part.outputs)
                for threads in (1, 2, 4, 1, 2, 4)]
        for name in part.outputs:
            first = runs[0][name]
            if np.issubdtype(first.dtype, np.floating):
                scale = max(1.0, float(np.max(np.abs(first))))
                for other in runs[1:]:
                    worst = max(worst, float(np.max(np.abs(other[name] - first))) / scale)
            assert all(results_agree({name: first}, {name: r[name]}) for r in runs[1:])
        values.update(runs[0])
    assert worst * 20 <= FLOAT_TOLERANCE["float32"], f"measured variation {worst:.2e} of the magnitude"


# ------------------------------------------------------------ the vote and what it taints


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 6), liar=st.integers(0, 5), seed=st.integers(0, 2**31))
def test_the_vote_names_exactly_the_one_liar_among_honest_workers(n, liar, seed):
    rng = np.random.default_rng(seed)
    truth = {"y": rng.standard_normal(8).astype(np.float32)}
    lie = {"y": truth["y"] + np.float32(1)}
    liar %= n
    results = [(f"w{k}", lie if k == liar else {"y": truth["y"].copy()}) for k in range(n)]
    verdict = vote(results)
    assert verdict is not None and verdict.odd == (f"w{liar}",)
    assert set(verdict.agreed) == {f"w{k}" for k in range(n)} - {f"w{liar}"}
    assert vote(results[liar:liar + 1] + [r for r in results if r[0] != f"w{liar}"][:1]) is None


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(2, 14))
def test_what_a_liar_taints_is_its_unverified_results_and_everything_downstream(data, n):
    edges = data.draw(st.sets(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(lambda e: e[0] < e[1])))
    g = nx.DiGraph()
    g.add_nodes_from((f"p{k}", 0) for k in range(n))
    g.add_edges_from(((f"p{a}", 0), (f"p{b}", 0)) for a, b in edges)
    workers = data.draw(st.lists(st.sampled_from("xyz"), min_size=n, max_size=n))
    finished = data.draw(st.sets(st.integers(0, n - 1)))
    produced_on = {(f"p{k}", 0): workers[k] for k in finished}
    verified = {k for k in produced_on if data.draw(st.booleans())}
    got = tainted(g, produced_on, "x", verified)
    doubtful = {k for k, w in produced_on.items() if w == "x" and k not in verified}
    assert doubtful <= got <= produced_on.keys()
    for k in got:  # each is doubtful itself or downstream of a doubtful one
        assert k in doubtful or any(nx.has_path(g, d, k) for d in doubtful)
    for d in doubtful:  # nothing finished downstream is missed
        assert {k for k in nx.descendants(g, d) if k in produced_on} <= got


# ------------------------------------------------------------ the scheduler's check copies


def _two_partitions() -> nx.DiGraph:
    g = nx.DiGraph()
    for p in ("a", "b"):
        g.add_node((p, 0), partition=p)
    g.add_edge(("a", 0), ("b", 0))
    return g


def _a0_checked():
    """A scheduler after task a0 finished on w1 and a check of it was placed:
    the scheduler, the run of b0 and the check."""
    crowd = [WorkerInfo("w1", 10, speed=2.0), WorkerInfo("w2", 10), WorkerInfo("w3", 10)]
    s = Scheduler(_two_partitions(), {"a": 10, "b": 10}, crowd)
    assert [a for a in s.start() if isinstance(a, Run)] == [Run("w1", ("a", 0), 3)]
    (next_run,) = [a for a in s.handle(TaskFinished("w1", ("a", 0))) if isinstance(a, Run)]
    (check,) = [a for a in s.place_audit(("a", 0), avoid={"w1"}) if isinstance(a, Run)]
    return s, next_run, check


def test_a_check_runs_on_another_worker_and_leaves_the_task_finished():
    s, next_run, check = _a0_checked()
    assert check.key == ("a", 0) and check.worker not in {"w1", next_run.worker}
    assert ("a", 0) in s.finished and s.audit_runs == {(check.worker, ("a", 0))}
    assert s.place_audit(("a", 0), avoid={"w1"}) == []  # nobody else is idle and allowed now
    assert s.handle(TaskFinished(check.worker, ("a", 0))) == [] and not s.audit_runs
    assert s.queue(check.worker) == () and s.produced_on[("a", 0)] == "w1"
    s.handle(TaskFinished(next_run.worker, ("b", 0)))
    assert s.done


def test_a_check_on_a_lost_worker_is_dropped_and_the_run_goes_on():
    s, next_run, check = _a0_checked()
    s.handle(WorkerLost(check.worker))
    assert not s.audit_runs and ("a", 0) in s.finished
    s.handle(TaskFinished(next_run.worker, ("b", 0)))
    assert s.done


def test_a_cancelled_check_frees_its_worker_and_its_late_result_changes_nothing():
    s, next_run, check = _a0_checked()
    s.cancel_audit(check.worker, ("a", 0))
    assert not s.audit_runs and s.queue(check.worker) == ()
    assert s.handle(TaskFinished(check.worker, ("a", 0))) == [] and s.produced_on[("a", 0)] == "w1"
    s.handle(TaskFinished(next_run.worker, ("b", 0)))
    assert s.done


# ------------------------------------------------------------ runs with a lying thread worker


def _example(name: str):
    """A module of examples/ (the lying executor lives with the example that shows it)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LyingThreads = _example("audit_liar").LyingThreads


LIES = {
    "shifted": lambda v: v + np.asarray(1, dtype=v.dtype),
    "nan": lambda v: np.full_like(v, np.nan) if np.issubdtype(v.dtype, np.floating) else v + 1,
}


@pytest.fixture(scope="module")
def small_chain():
    model, feeds = chain(n_layers=4, width=32, batch=8)
    compiled = crowdgraph.compile(model, partitions=3, input_shapes={k: (2,) + v.shape[1:] for k, v in feeds.items()})
    return compiled, feeds, oracle(model, feeds)


def _crowd(liar_speed: float = 4.0) -> list[WorkerInfo]:
    return [WorkerInfo("liar", memory="64MB", speed=liar_speed)] + [WorkerInfo(f"w{k}", memory="64MB") for k in range(3)]


@pytest.mark.parametrize("lie", sorted(LIES))
def test_with_every_result_checked_a_liar_is_quarantined_and_the_output_is_the_oracle(small_chain, lie):
    compiled, feeds, want = small_chain
    with LyingThreads(_crowd(), "liar", LIES[lie]) as ex:
        got = compiled.run(feeds, executor=ex, microbatch=2, audit=1.0)
    assert ex.lying.told > 0  # the liar did run tasks
    assert_matches(got, want)
    audit = compiled.last_report.audit
    assert list(audit.quarantined) == ["liar"]
    assert audit.disagreements and all(d.odd == ("liar",) for d in audit.disagreements if d.odd)
    assert audit.reputations["liar"].disagreements >= 1
    assert all(audit.reputations[w].disagreements == 0 for w in ("w0", "w1", "w2") if w in audit.reputations)
    text = str(compiled.last_report)
    assert "checks passed" in text and "quarantined liar" in text
    assert list(json.loads(compiled.last_report.to_json())["audit"]["quarantined"]) == ["liar"]


def test_a_worker_lying_on_one_task_in_ten_is_caught_and_its_unchecked_results_recomputed(small_chain):
    compiled, feeds, want = small_chain
    with LyingThreads(_crowd(), "liar", LIES["shifted"], lies=lambda n: n % 10 == 1) as ex:
        got = compiled.run(feeds, executor=ex, microbatch=2, audit=1.0)
    assert_matches(got, want)
    assert list(compiled.last_report.audit.quarantined) == ["liar"]


def test_with_audit_off_a_liars_numbers_reach_the_output_unnoticed(small_chain):
    """What docs/audit.md says happens without audit: the run succeeds with wrong outputs."""
    compiled, feeds, want = small_chain
    with LyingThreads(_crowd(liar_speed=100.0), "liar", LIES["shifted"]) as ex:
        got = compiled.run(feeds, executor=ex, microbatch=2)
    assert ex.lying.told > 0 and compiled.last_report.audit is None
    assert any(not np.allclose(got[name], want[name], atol=1e-3) for name in want)


@pytest.mark.parametrize("options", [dict(audit=0.5, seed=3), dict(canaries=1, seed=5)], ids=["checks", "canaries"])
def test_honest_workers_pass_every_check_and_canary_and_nobody_is_quarantined(small_chain, options):
    compiled, feeds, want = small_chain
    with ThreadExecutor(workers=3, memory="64MB") as ex:
        got = compiled.run(feeds, executor=ex, microbatch=2, **options)
    assert_matches(got, want)
    report = compiled.last_report
    audit = report.audit
    assert not audit.disagreements and not audit.quarantined and audit.recomputed == 0
    canaries = options.get("canaries", 0)
    assert audit.canaries == canaries * len(compiled.partitions)
    assert len(report.tasks) == len(compiled.partitions) * (4 + canaries)  # canary results are not in the output
    assert (audit.checks > 0) == ("audit" in options)
    assert sum(r.passed for r in audit.reputations.values()) == 2 * audit.checks + audit.canaries
    html = report.to_html()
    assert "checks passed" in html and audit.line() in html


@pytest.mark.parametrize("rate", [-0.1, 1.5, True, "5%"])
def test_an_audit_rate_outside_0_to_1_is_refused_with_what_to_give(small_chain, rate):
    compiled, feeds, _ = small_chain
    with pytest.raises(InputError, match="audit must be a fraction of tasks from 0 to 1"):
        compiled.run(feeds, executor=ThreadExecutor(workers=1), audit=rate)


# ------------------------------------------------------------ private runs


def test_a_private_run_keeps_the_partitions_touching_inputs_and_outputs_at_home(small_chain):
    compiled, feeds, want = small_chain
    with ThreadExecutor(workers=3, memory="64MB") as ex:
        got = compiled.run(feeds, executor=ex, microbatch=2, private=True, audit=0.5)
    assert_matches(got, want)
    report = compiled.last_report
    first, *middle, last = [p.name for p in compiled.partitions]
    ran_on = {(t.partition, t.worker) for t in report.tasks}
    assert {w for p, w in ran_on if p in (first, last)} == {"home"}
    assert {p for p, _ in ran_on} == {first, last, *middle}
    assert report.workers["home"].memory == max(p.resident_bytes for p in compiled.partitions)
    assert report.audit.checks > 0 and not report.audit.quarantined  # the middle partition's results are checked


def test_two_workers_that_disagree_with_nobody_left_to_decide_stop_the_run_naming_both(small_chain):
    compiled, feeds, _ = small_chain
    crowd = [WorkerInfo("liar", memory="64MB", speed=4.0), WorkerInfo("w0", memory="64MB")]
    with LyingThreads(crowd, "liar", LIES["shifted"]) as ex:
        with pytest.raises(ExecutionError, match="disagree between (liar, w0|w0, liar) and no other worker"):
            compiled.run(feeds, executor=ex, microbatch=2, audit=1.0)


def test_a_crowd_of_one_cannot_check_and_says_what_to_do(small_chain):
    compiled, feeds, _ = small_chain
    with ThreadExecutor(workers=1, memory="64MB") as ex:
        with pytest.raises(ExecutionError, match="no other worker can hold partition .* or run with audit=0"):
            compiled.run(feeds, executor=ex, microbatch=2, audit=0.5)


@settings(max_examples=15, deadline=None)
@given(workers=st.integers(2, 6), microbatches=st.integers(1, 6), seed=st.integers(0, 1000),
       mode=st.sampled_from(["streaming", "barrier"]), policy=st.sampled_from(["cost", "greedy", "pipeline"]))
def test_with_audit_1_every_result_is_checked_once_and_nothing_is_computed_twice(small_chain, workers, microbatches,
                                                                                 seed, mode, policy):
    compiled, _, _ = small_chain
    crowd = [WorkerInfo(f"w{k}", memory="64MB", speed=1.0 + k % 3) for k in range(workers)]
    report = crowdgraph.simulate(compiled, crowd, (2 * microbatches, 32), microbatch=2, mode=mode, seed=seed,
                                 policy=policy, audit=1.0)
    tasks = len(compiled.partitions) * microbatches
    assert len(report.tasks) == tasks and report.audit.checks == tasks
    assert not report.audit.disagreements and report.audit.recomputed == 0
    assert sum(r.passed for r in report.audit.reputations.values()) == 2 * tasks


def test_with_nobody_idle_a_check_queues_behind_a_busy_holder_of_its_partition():
    g = nx.DiGraph()
    g.add_nodes_from([(("a", 0), {"partition": "a"}), (("a", 1), {"partition": "a"})])
    s = Scheduler(g, {"a": 10}, [WorkerInfo("w1", 10), WorkerInfo("w2", 10)], policy="greedy")
    placed = {a.key: a.worker for a in s.start() if isinstance(a, Run)}
    assert set(placed.values()) == {"w1", "w2"}
    first, other = placed[("a", 0)], placed[("a", 1)]
    s.handle(TaskFinished(first, ("a", 0)))
    assert s.place_audit(("a", 0), avoid={first}) == [Run(other, ("a", 0), 1)]  # no load: it holds "a"
    assert s.queue(other) == (("a", 1), ("a", 0))
    s.handle(TaskFinished(other, ("a", 1)))
    s.handle(TaskFinished(other, ("a", 0)))
    assert s.done and not s.audit_runs and s.produced_on[("a", 0)] == first


@pytest.mark.slow
def test_checks_and_private_runs_work_on_a_dask_cluster_whose_results_stay_on_its_workers(small_chain):
    distributed = pytest.importorskip("distributed")
    compiled, feeds, want = small_chain
    with distributed.LocalCluster(n_workers=3, threads_per_worker=1, processes=False, protocol="tcp://",
                                  host="127.0.0.1", scheduler_port=0, dashboard_address=":0", silence_logs=40) as c, \
            distributed.Client(c, set_as_default=False) as client:
        assert_matches(compiled.run(feeds, executor=client, microbatch=2, audit=1.0), want)
        assert compiled.last_report.audit.checks == 3 * 4
        assert_matches(compiled.run(feeds, executor=client, microbatch=2, private=True), want)
        assert {t.worker for t in compiled.last_report.tasks if t.partition == compiled.partitions[0].name} == {"home"}


# ------------------------------------------------------------ canaries


def test_a_liar_caught_on_a_canary_is_quarantined_even_with_no_third_worker_to_vote(small_chain):
    compiled, feeds, want = small_chain
    crowd = [WorkerInfo("liar", memory="64MB", speed=4.0), WorkerInfo("w0", memory="64MB")]
    with LyingThreads(crowd, "liar", LIES["nan"]) as ex:
        got = compiled.run(feeds, executor=ex, microbatch=2, canaries=2)
    assert_matches(got, want)
    audit = compiled.last_report.audit
    assert list(audit.quarantined) == ["liar"] and "canary" in audit.quarantined["liar"]
    assert audit.canaries > 0 and audit.checks == 0 and audit.recomputed > 0
