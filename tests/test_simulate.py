"""Task graphs and simulation: the same scheduler and driver on a virtual clock."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crowdgraph
from crowdgraph import CostModel, WorkerInfo, zoo
from crowdgraph.taskgraph import build_task_graph, data_consumers, data_producers, join_outputs, split_batch
from tests import models, plans


@pytest.fixture(scope="module")
def full_distilbert():
    """The full DistilBERT model (66M parameters, seconds to build): only compiled here, never changed."""
    return zoo.distilbert("full")


@pytest.fixture(scope="module")
def distilbert_plan(full_distilbert):
    """Its 128 MB plan at 8 x 128, compiled once in the run (test_memory measures the same plan)."""
    return plans.shared(full_distilbert, "128MB", input_shapes={"input_ids": (8, 128), "attention_mask": (8, 128)})


def test_streaming_edges_follow_the_micro_batch():
    parts = nx.DiGraph([("p0", "p1"), ("p0", "p2"), ("p1", "p2")])
    tasks = build_task_graph(parts, 3, "streaming")
    assert set(tasks.predecessors(("p2", 1))) == {("p0", 1), ("p1", 1)}
    assert set(data_producers(tasks, ("p2", 1))) == {("p0", 1), ("p1", 1)}
    assert set(data_consumers(tasks, ("p0", 2))) == {("p1", 2), ("p2", 2)}


def test_barrier_waits_for_every_micro_batch_but_data_stays_per_micro_batch():
    parts = nx.DiGraph([("p0", "p1")])
    tasks = build_task_graph(parts, 3, "barrier")
    assert set(tasks.predecessors(("p1", 0))) == {("p0", 0), ("p0", 1), ("p0", 2)}
    assert data_producers(tasks, ("p1", 0)) == [("p0", 0)]


def test_split_and_join_round_trip():
    batch = {"x": np.arange(14).reshape(7, 2), "scale": np.float32(2)}
    parts = split_batch(batch, ["x"], 3)
    assert [p["x"].shape[0] for p in parts] == [3, 3, 1]
    assert all(p["scale"] == 2 for p in parts)
    joined = join_outputs([{"y": p["x"]} for p in parts], ["y"])
    np.testing.assert_array_equal(joined["y"], batch["x"])


def test_simulation_report_is_like_a_real_one(distilbert_plan):
    crowd = [WorkerInfo(f"phone{n}", memory="128MB") for n in range(5)]
    report = crowdgraph.simulate(distilbert_plan, crowd, (32, 128), microbatch=8, mode="streaming")
    parts = len(distilbert_plan.partitions)
    assert len(report.tasks) == parts * 4
    assert report.makespan > 0 and report.executor == "simulated"
    assert sum(report.tier_counts.values()) == len(report.tasks)
    weights = {p.name: p.weight_bytes for p in distilbert_plan.partitions}
    assert {load.partition for load in report.loads} == set(weights)  # every partition moved, maybe to several
    assert report.weight_bytes_sent == sum(weights[load.partition] for load in report.loads)


def test_streaming_beats_barrier_on_five_phones(distilbert_plan):
    """CROWDio's finding: streaming micro-batches cut batch latency (by 34% there)."""
    speeds = [1.0, 0.8, 0.6, 0.5, 0.4]
    crowd = [WorkerInfo(f"phone{n}", memory="128MB", speed=s) for n, s in enumerate(speeds)]
    def makespan(mode, policy):
        return crowdgraph.simulate(distilbert_plan, crowd, (32, 128), microbatch=8, mode=mode,
                                   policy=policy).makespan

    # One holder per partition, as CROWDio runs it: streaming is the big win.
    assert makespan("streaming", "pipeline") <= 0.66 * makespan("barrier", "pipeline")
    # Replicas relieve the slowest stages, in both modes; streaming still wins.
    # (Five phones for seven partitions have no worker to spare: only stages
    # that lag the crowd's average get a replica, see the scheduler.)
    cost_stream = makespan("streaming", "cost")
    assert cost_stream <= makespan("barrier", "cost")
    assert cost_stream <= 0.9 * makespan("streaming", "pipeline")
    assert cost_stream <= makespan("streaming", "greedy")


def test_cached_partitions_send_no_weights(distilbert_plan):
    names = frozenset(p.name for p in distilbert_plan.partitions)
    crowd = [WorkerInfo(f"pi{n}", memory="128MB", cached=names) for n in range(3)]
    report = crowdgraph.simulate(distilbert_plan, crowd, (8, 128), microbatch=8)
    assert report.weight_bytes_sent == 0 and set(report.tier_counts) <= {1, 2}


def test_a_measured_profile_overrides_flops(distilbert_plan):
    crowd = [WorkerInfo("a", memory="128MB")]
    profile = {p.name: 1.0 for p in distilbert_plan.partitions}
    fast_links = CostModel(profile=profile, bandwidth=1e15, latency=0.0, deserialize_bytes_per_second=1e15,
                           disk_bytes_per_second=1e15, coordinator_bandwidth=1e15)
    report = crowdgraph.simulate(distilbert_plan, crowd, (8, 128), microbatch=8, cost=fast_links)
    assert report.makespan == pytest.approx(len(distilbert_plan.partitions), rel=1e-6)


def test_simulated_losses_are_survived(distilbert_plan):
    crowd = [WorkerInfo(f"phone{n}", memory="128MB") for n in range(5)]
    report = crowdgraph.simulate(distilbert_plan, crowd, (64, 128), microbatch=8, losses={"phone0": 0.5, "phone2": 1.0})
    keys = [(t.partition, t.microbatch) for t in report.tasks]
    assert len(keys) == len(set(keys)) == len(distilbert_plan.partitions) * 8
    assert report.workers["phone0"].lost and report.workers["phone2"].lost


def test_a_thousand_phones_plan_in_seconds(distilbert_plan):
    crowd = [WorkerInfo(f"phone{n}", memory="128MB", speed=0.5 + (n % 5) / 10) for n in range(1000)]
    report = crowdgraph.simulate(distilbert_plan, crowd, (8 * 200, 128), microbatch=8)
    assert len(report.tasks) == len(distilbert_plan.partitions) * 200


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(layers=st.integers(2, 6), microbatches=st.integers(1, 8), workers=st.integers(1, 6),
       speeds=st.lists(st.floats(0.2, 2.0), min_size=6, max_size=6), bandwidth=st.floats(1e5, 1e9))
def test_streaming_never_slower_than_barrier_on_chains(layers, microbatches, workers, speeds, bandwidth):
    # A property of the pipeline rule; the cost rule replicates by estimates,
    # which can order the two modes either way by a hair.
    compiled = _chain_plan(layers, microbatches)
    crowd = [WorkerInfo(f"w{n}", memory=max(p.resident_bytes for p in compiled.partitions), speed=speeds[n])
             for n in range(workers)]
    cost = CostModel(bandwidth=bandwidth)
    stream = crowdgraph.simulate(compiled, crowd, (microbatches, 32), microbatch=1, mode="streaming", cost=cost,
                                 policy="pipeline")
    barrier = crowdgraph.simulate(compiled, crowd, (microbatches, 32), microbatch=1, mode="barrier", cost=cost,
                                  policy="pipeline")
    assert stream.makespan <= barrier.makespan * (1 + 1e-9)


def _chain_plan(layers, rows):
    model, feeds = models.chain(n_layers=layers, width=32, batch=rows)
    return plans.compiled(model, partitions=layers, sample=feeds)


def test_symbolic_shapes_are_costed_at_the_batch_shapes():
    # Compiled without input_shapes, the sequence axis is bound to 1; the
    # simulation must cost the 128-token batch it is given, as run() would.
    model = zoo.distilbert("tiny")
    loose = crowdgraph.compile(model, partitions=3)
    exact = crowdgraph.compile(model, partitions=3, input_shapes={"input_ids": (1, 128)})
    crowd = [WorkerInfo(f"w{n}", memory="1GB") for n in range(3)]
    got = crowdgraph.simulate(loose, crowd, (8, 128), microbatch=1)
    want = crowdgraph.simulate(exact, crowd, (8, 128), microbatch=1)
    assert sum(p.flops for p in loose.partitions) < 0.1 * sum(p.flops for p in exact.partitions)
    assert got.makespan == pytest.approx(want.makespan, rel=0.02)
    assert sum(t.bytes_in for t in got.tasks) == sum(t.bytes_in for t in want.tasks)


def test_the_report_names_the_coordinator_link_when_it_bounds_the_run(distilbert_plan):
    crowd = [WorkerInfo(f"phone{n}", memory="128MB") for n in range(12)]
    slow_star = CostModel(coordinator_bandwidth=2e6)
    bound = crowdgraph.simulate(distilbert_plan, crowd, (16, 128), microbatch=1, cost=slow_star)
    assert bound.coordinator_link_busy >= 0.9 * bound.makespan
    assert any("coordinator link bounds this run" in n and "2.0 MB/s" in n for n in bound.notes)
    assert bound.notes[-1] in str(bound)
    free = crowdgraph.simulate(distilbert_plan, crowd, (16, 128), microbatch=1,
                               cost=CostModel(coordinator_bandwidth=float("inf")))
    assert free.notes == [] and free.makespan < bound.makespan


def test_a_bigger_warm_crowd_is_a_faster_crowd(distilbert_plan):
    names = frozenset(p.name for p in distilbert_plan.partitions)

    def makespan(n, policy):
        crowd = [WorkerInfo(f"w{k}", memory="128MB", cached=names) for k in range(n)]
        return crowdgraph.simulate(distilbert_plan, crowd, (32, 128), microbatch=1, policy=policy).makespan

    assert makespan(3, "cost") <= makespan(3, "pipeline")
    assert makespan(12, "cost") <= makespan(12, "pipeline")
    assert makespan(12, "cost") <= makespan(3, "cost") / 2.5  # 3x at 64 micro-batches: benchmarks/crowd.py


def _wide_chain_plan(layers, partitions):
    """A chain as heavy per weight byte as DistilBERT at 128 tokens: 768 wide,
    cut for 128-row micro-batches (2.4 MB of weights and 0.03 s per layer)."""
    model, _ = models.chain(n_layers=layers, width=768, batch=1)
    return plans.compiled(model, partitions=partitions, input_shapes={"x": (128, 768)})


@pytest.mark.parametrize("layers, partitions, speeds, workers, star, microbatches", [
    # Two replicas per partition at once were costed but the rule took more:
    # 15% slower than the greedy policy.
    (9, 3, (1.0,), 6, 50e6, 16),
    # More partitions than workers: replicas of one stage turned the pipeline
    # into waves, every worker loading every partition (23% slower than the
    # pipeline rule, 11% slower than greedy).
    (9, 9, (1.0,), 3, 50e6, 16),
    (9, 9, (1.0, 0.8, 0.6, 0.5, 0.4), 3, 50e6, 16),
    # A saturated coordinator link: replicas' weights only delayed the
    # tensors (28% slower than the pipeline rule).
    (18, 18, (1.0,), 12, 10e6, 16),
    # Tasks bound by the workers' own links more than by their compute:
    # replicas share the link time too (9% slower than greedy).
    (9, 9, (1.0,), 6, 50e6, 64),
])
def test_the_cost_rule_loses_to_neither_baseline_on_cold_crowds(layers, partitions, speeds, workers, star,
                                                                microbatches):
    plan = _wide_chain_plan(layers, partitions)
    crowd = [WorkerInfo(f"w{k}", memory="64MB", speed=speeds[k % len(speeds)]) for k in range(workers)]

    def makespan(policy):
        return crowdgraph.simulate(plan, crowd, (microbatches * 128, 768), microbatch=128, policy=policy,
                                   cost=CostModel(coordinator_bandwidth=star)).makespan

    cost = makespan("cost")
    assert cost <= makespan("greedy") * (1 + 1e-4)  # equal, up to the order of simultaneous transfers
    assert cost <= 1.02 * makespan("pipeline")


def test_simulated_tasks_report_their_compute_time():
    # What a real worker measures, so queueing on a busy coordinator link does
    # not pass for a slow partition in the scheduler's estimates.
    plan = _wide_chain_plan(9, 3)
    crowd = [WorkerInfo(f"w{k}", memory="64MB") for k in range(6)]
    cost = CostModel(coordinator_bandwidth=1e6)
    report = crowdgraph.simulate(plan, crowd, (16 * 128, 768), microbatch=128, cost=cost)
    compute = {p.name: cost.compute_seconds(p, 1.0, 1.0) for p in plan.partitions}
    assert all(t.end - t.start == pytest.approx(compute[t.partition]) for t in report.tasks)
    assert report.makespan > 2 * sum(compute.values()) * 16 / len(crowd)  # the link is the bound


def test_a_queued_task_gets_its_inputs_while_the_task_before_it_computes():
    # Real workers read their next RUN (and its tensors) during a task, so on
    # a worker that stays busy only the outputs come between two tasks.
    plan = _wide_chain_plan(3, 1)
    (part,) = plan.partitions
    cost = CostModel(bandwidth=1e9, coordinator_bandwidth=float("inf"))
    report = crowdgraph.simulate(plan, [WorkerInfo("w0", memory="64MB")], (4 * 128, 768), microbatch=128,
                                 cost=cost)
    tasks = sorted(report.tasks, key=lambda t: t.start)
    assert [t.microbatch for t in tasks] == [0, 1, 2, 3]
    compute = cost.compute_seconds(part, 1.0, 1.0)
    assert cost.transfer_seconds(part.input_bytes) < compute  # so the inputs are there in time
    gaps = [later.start - earlier.end for earlier, later in zip(tasks, tasks[1:])]
    assert gaps == pytest.approx([cost.transfer_seconds(part.output_bytes)] * 3)
    assert tasks[0].start == pytest.approx(report.loads[0].end)  # its inputs came during the load


@pytest.mark.slow
def test_replicas_with_no_worker_to_spare_go_to_the_lagging_stages(full_distilbert):
    # 9 partitions on 6 cold workers (the crowd benchmark's 48 MB plan): every
    # worker is needed as a holder, and replicas of average stages turned the
    # pipeline into waves of loads (18% slower than the pipeline rule, 4%
    # slower than greedy).
    plan = plans.shared(full_distilbert, "48MB", input_shapes={"input_ids": (1, 128), "attention_mask": (1, 128)})
    crowd = [WorkerInfo(f"w{k}", memory="48MB") for k in range(6)]

    def makespan(policy):
        return crowdgraph.simulate(plan, crowd, (64, 128), microbatch=1, policy=policy).makespan

    cost = makespan("cost")
    assert len(plan.partitions) > len(crowd)
    assert cost <= makespan("greedy")
    assert cost <= 1.02 * makespan("pipeline")
