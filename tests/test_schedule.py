"""Tests of the scheduler: placement tiers, losses, late messages, and
property tests that drive it with a simulated executor in random orders."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter, deque
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import replace
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crowdgraph.errors import PlanningError, WorkerLostError
from crowdgraph.taskgraph import build_task_graph
from crowdgraph.schedule import (
    Action,
    Event,
    Load,
    LoadFinished,
    ResultsLost,
    Run,
    Scheduler,
    Store,
    TaskFinished,
    TaskKey,
    TaskOverdue,
    Unload,
    WorkerInfo,
    WorkerJoined,
    WorkerLost,
)

# -- helpers -------------------------------------------------------------------


def graph(
    tasks: list[TaskKey],
    edges: Sequence[tuple[TaskKey, TaskKey]] = (),
    priority: dict[TaskKey, Any] | None = None,
) -> nx.DiGraph:
    g = nx.DiGraph()
    for key in tasks:
        attrs = {"partition": key[0]}
        if priority and key in priority:
            attrs["priority"] = priority[key]
        g.add_node(key, **attrs)
    g.add_edges_from(edges)
    return g


def runs(actions: list[Action]) -> list[Run]:
    return [a for a in actions if isinstance(a, Run)]


def only_run(actions: list[Action]) -> Run:
    (run,) = runs(actions)
    return run


MEM = {"p0": 10, "p1": 10, "p2": 10, "big": 50}


# -- construction --------------------------------------------------------------


def test_empty_crowd_is_a_planning_error() -> None:
    with pytest.raises(PlanningError, match="crowd is empty"):
        Scheduler(graph([("p0", 0)]), MEM, [])


def test_partition_that_fits_no_worker_is_a_planning_error() -> None:
    g = graph([("p0", 0), ("big", 0)], [(("p0", 0), ("big", 0))])
    crowd = [WorkerInfo("a", memory=20_000_000), WorkerInfo("b", memory=30_000_000)]
    with pytest.raises(PlanningError) as info:
        Scheduler(g, {"p0": 1_000_000, "big": 48_000_000}, crowd)
    text = str(info.value)
    assert "'big'" in text
    assert "48.0 MB" in text  # its need
    assert "30.0 MB" in text  # the largest budget in the crowd
    assert "memory_budget" in text and "budget of 48.0 MB or more" in text


def test_missing_memory_figure_and_cycle_are_planning_errors() -> None:
    with pytest.raises(PlanningError, match="no memory figure"):
        Scheduler(graph([("zz", 0)]), MEM, [WorkerInfo("a", 100)])
    cyclic = graph([("p0", 0), ("p1", 0)], [(("p0", 0), ("p1", 0)), (("p1", 0), ("p0", 0))])
    with pytest.raises(PlanningError, match="cycle"):
        Scheduler(cyclic, MEM, [WorkerInfo("a", 100)])


def test_worker_info_is_validated_and_frozen() -> None:
    with pytest.raises(ValueError, match="speed"):
        WorkerInfo("a", 10, speed=0)
    with pytest.raises(ValueError, match="memory"):
        WorkerInfo("a", -1)
    info = WorkerInfo("a", 10, cached={"p0"})  # type: ignore[arg-type]
    assert info.cached == frozenset({"p0"})


# -- tiers ---------------------------------------------------------------------


def test_tier1_queues_on_the_busy_holder_rather_than_an_idle_worker() -> None:
    g = graph([("p0", 0), ("p0", 1)])
    s = Scheduler(g, MEM, [WorkerInfo("a", 100, speed=2.0), WorkerInfo("b", 100)], policy="pipeline")
    actions = s.start()
    assert actions == [
        Load("a", "p0"),
        Run("a", ("p0", 0), 3),
        Run("a", ("p0", 1), 1),
    ]
    assert s.queue("a") == (("p0", 0), ("p0", 1))
    assert s.queue("b") == ()


def test_tier2_prefers_an_idle_worker_that_caches_the_partition() -> None:
    # a produced the input and is fastest, but b has p1 on local storage.
    g = graph([("p0", 0), ("p1", 0)], [(("p0", 0), ("p1", 0))])
    crowd = [
        WorkerInfo("a", 100, speed=3.0),
        WorkerInfo("b", 100, speed=0.5, cached=frozenset({"p1"})),
        WorkerInfo("c", 100, speed=2.0),
    ]
    s = Scheduler(g, MEM, crowd)
    assert only_run(s.start()) == Run("a", ("p0", 0), 3)
    assert s.handle(TaskFinished("a", ("p0", 0))) == [Load("b", "p1"), Run("b", ("p1", 0), 2)]


def test_tier2_unloads_first_when_the_caching_worker_holds_another_partition() -> None:
    g = graph([("p0", 0), ("p1", 0)], [(("p0", 0), ("p1", 0))])
    crowd = [WorkerInfo("a", 100, cached=frozenset({"p1"})), WorkerInfo("b", 100, speed=0.1)]
    s = Scheduler(g, MEM, crowd)
    assert only_run(s.start()) == Run("a", ("p0", 0), 3)
    assert s.handle(TaskFinished("a", ("p0", 0))) == [
        Unload("a", "p0"),
        Load("a", "p1"),
        Run("a", ("p1", 0), 2),
    ]


def test_tier3_prefers_an_empty_worker_over_swapping_the_input_holder() -> None:
    g = graph([("p0", 0), ("p1", 0)], [(("p0", 0), ("p1", 0))])
    s = Scheduler(g, MEM, [WorkerInfo("a", 100, speed=5.0), WorkerInfo("b", 100)])
    assert only_run(s.start()).worker == "a"
    assert s.handle(TaskFinished("a", ("p0", 0))) == [Load("b", "p1"), Run("b", ("p1", 0), 3)]
    assert s.resident == {"a": "p0", "b": "p1"}


def test_tier4_swaps_the_fastest_idle_worker_that_fits() -> None:
    # c made the input of (big, 0) but is too small for it; a and b are
    # idle holding p0 and p1, and a is faster.
    tasks = [("p2", 0), ("p0", 0), ("p1", 0), ("big", 0)]
    prio = {("p2", 0): 0, ("p0", 0): 1, ("p1", 0): 2, ("big", 0): 3}
    crowd = [
        WorkerInfo("a", 100, speed=4.0),
        WorkerInfo("b", 100, speed=2.0),
        WorkerInfo("c", 20, speed=8.0),
    ]
    s = Scheduler(graph(tasks, [(("p2", 0), ("big", 0))], prio), MEM, crowd)
    assert [(r.worker, r.key) for r in runs(s.start())] == [
        ("c", ("p2", 0)), ("a", ("p0", 0)), ("b", ("p1", 0)),
    ]
    s.handle(TaskFinished("b", ("p1", 0)))
    s.handle(TaskFinished("a", ("p0", 0)))
    assert s.handle(TaskFinished("c", ("p2", 0))) == [
        Unload("a", "p0"),
        Load("a", "big"),
        Run("a", ("big", 0), 4),
    ]


def test_tier4_never_evicts_a_busy_worker_and_a_single_worker_runs_everything() -> None:
    tasks = [("p0", 0), ("p0", 1), ("p1", 0)]
    s = Scheduler(graph(tasks), MEM, [WorkerInfo("a", 100)])
    first = s.start()
    assert first == [Load("a", "p0"), Run("a", ("p0", 0), 3), Run("a", ("p0", 1), 1)]
    assert s.ready == (("p1", 0),)
    assert s.handle(TaskFinished("a", ("p0", 0))) == []  # still busy with (p0, 1)
    assert s.handle(TaskFinished("a", ("p0", 1))) == [
        Unload("a", "p0"),
        Load("a", "p1"),
        Run("a", ("p1", 0), 4),
    ]
    s.handle(TaskFinished("a", ("p1", 0)))
    assert s.done


def test_better_tier_wins_over_better_priority() -> None:
    # When a finishes (p0, 0), both (p1, 0) (higher priority) and (p0, 1)
    # are ready; the idle holder of p0 takes (p0, 1) instead of swapping.
    tasks = [("p0", 0), ("p0", 1), ("p1", 0)]
    edges = [(("p0", 0), ("p0", 1)), (("p0", 0), ("p1", 0))]
    prio = {("p0", 0): 0, ("p1", 0): 1, ("p0", 1): 2}
    s = Scheduler(graph(tasks, edges, prio), MEM, [WorkerInfo("a", 100)])
    s.start()
    assert s.handle(TaskFinished("a", ("p0", 0))) == [Run("a", ("p0", 1), 1)]
    assert s.ready == (("p1", 0),)


def test_input_holder_preference_counts_inputs() -> None:
    # (p1, 0) reads one result made on a and two made on b; both are idle
    # holding another partition (tier 4), so b wins although a is faster.
    tasks = [("p0", 0), ("p2", 0), ("p2", 1), ("p1", 0)]
    edges = [(k, ("p1", 0)) for k in tasks[:3]]
    prio = {("p0", 0): 0, ("p2", 0): 1, ("p2", 1): 2, ("p1", 0): 3}
    crowd = [WorkerInfo("a", 100, speed=9.0), WorkerInfo("b", 100)]
    s = Scheduler(graph(tasks, edges, prio), MEM, crowd)
    assert [(r.worker, r.key) for r in runs(s.start())] == [
        ("a", ("p0", 0)), ("b", ("p2", 0)), ("b", ("p2", 1)),
    ]
    s.handle(TaskFinished("a", ("p0", 0)))
    s.handle(TaskFinished("b", ("p2", 0)))
    assert s.handle(TaskFinished("b", ("p2", 1))) == [
        Unload("b", "p2"),
        Load("b", "p1"),
        Run("b", ("p1", 0), 4),
    ]


def test_tier1_beats_the_input_holder() -> None:
    # b produced both inputs of (p1, 2), but a holds p1: tier 1 wins.
    tasks = [("p1", 0), ("p1", 1), ("p0", 0), ("p0", 1), ("p1", 2)]
    edges = [(("p0", 0), ("p1", 2)), (("p0", 1), ("p1", 2))]
    prio = {("p1", 0): 0, ("p1", 1): 1, ("p0", 0): 2, ("p0", 1): 3, ("p1", 2): 4}
    crowd = [WorkerInfo("a", 100, speed=10.0), WorkerInfo("b", 100)]
    s = Scheduler(graph(tasks, edges, prio), MEM, crowd, policy="pipeline")
    start = runs(s.start())
    # a (fast) takes p1 and queues (p1, 1) too; b takes p0 and both p0 tasks.
    assert [(r.worker, r.key) for r in start] == [
        ("a", ("p1", 0)), ("a", ("p1", 1)), ("b", ("p0", 0)), ("b", ("p0", 1)),
    ]
    s.handle(TaskFinished("b", ("p0", 0)))
    actions = s.handle(TaskFinished("b", ("p0", 1)))
    assert actions == [Run("a", ("p1", 2), 1)]


def test_input_holder_preference_tier4() -> None:
    # b made the input of (p1, 0); both a and b are idle holding something.
    tasks = [("p0", 0), ("p2", 0), ("p1", 0)]
    edges = [(("p0", 0), ("p1", 0))]
    prio = {("p2", 0): 0, ("p0", 0): 1, ("p1", 0): 2}
    crowd = [WorkerInfo("a", 100, speed=9.0), WorkerInfo("b", 100)]
    s = Scheduler(graph(tasks, edges, prio), MEM, crowd)
    assert [(r.worker, r.key) for r in runs(s.start())] == [("a", ("p2", 0)), ("b", ("p0", 0))]
    s.handle(TaskFinished("a", ("p2", 0)))
    assert s.handle(TaskFinished("b", ("p0", 0))) == [
        Unload("b", "p0"),
        Load("b", "p1"),
        Run("b", ("p1", 0), 4),
    ]


def test_faster_idle_worker_wins_within_a_tier() -> None:
    crowd = [WorkerInfo(f"w{i}", 100, speed=s) for i, s in enumerate([1.0, 3.0, 2.0])]
    s = Scheduler(graph([("p0", 0), ("p1", 0), ("p2", 0)]), MEM, crowd)
    assert [(r.worker, r.key) for r in runs(s.start())] == [
        ("w1", ("p0", 0)), ("w2", ("p1", 0)), ("w0", ("p2", 0)),
    ]


def test_warm_workers_share_tier1_by_expected_finish() -> None:
    # Both start holding p0 from an earlier run: no Load, and tasks go to
    # the smallest (queue + 1) / speed: a at 0.4, 0.8, then b at 1.0 < 1.2.
    crowd = [
        WorkerInfo("a", 100, speed=2.5, resident="p0"),
        WorkerInfo("b", 100, speed=1.0, resident="p0"),
    ]
    for seed in range(4):
        s = Scheduler(graph([("p0", i) for i in range(3)]), MEM, crowd, seed=seed, policy="pipeline")
        assert s.loaded == {"a": "p0", "b": "p0"}
        assert s.start() == [
            Run("a", ("p0", 0), 1),
            Run("a", ("p0", 1), 1),
            Run("b", ("p0", 2), 1),
        ]


def test_warm_partition_that_no_longer_fits_is_only_unloaded() -> None:
    crowd = [WorkerInfo("a", 20, resident="big"), WorkerInfo("b", 60)]
    s = Scheduler(graph([("big", 0), ("p0", 0)]), MEM, crowd)
    assert s.start() == [
        Load("b", "big"),
        Run("b", ("big", 0), 3),
        Unload("a", "big"),
        Load("a", "p0"),
        Run("a", ("p0", 0), 4),
    ]


def test_one_holder_per_partition_so_the_crowd_runs_a_pipeline() -> None:
    # Tier 1 queues on the holder even when others are idle, so a partition
    # never gets a second holder: 3 partitions keep 3 of 10 workers busy.
    tasks = [(p, i) for p in ("p0", "p1", "p2") for i in range(4)]
    edges = [(("p0", i), ("p1", i)) for i in range(4)] + [(("p1", i), ("p2", i)) for i in range(4)]
    s = Scheduler(graph(tasks, edges), MEM, [WorkerInfo(f"w{i}", 100) for i in range(10)], policy="pipeline")
    pending = deque(s.start())
    used = set()
    while pending:
        a = pending.popleft()
        if isinstance(a, Run):
            used.add(a.worker)
            pending.extend(s.handle(TaskFinished(a.worker, a.key)))
        held = [p for p in s.resident.values() if p]
        assert len(held) == len(set(held))
    assert s.done and len(used) == 3


def test_budget_filter_applies_to_every_tier() -> None:
    # The small worker is fastest and caches big, yet big does not fit it.
    crowd = [
        WorkerInfo("small", 20, speed=10.0, cached=frozenset({"big"})),
        WorkerInfo("large", 60),
    ]
    s = Scheduler(graph([("big", 0), ("big", 1), ("p0", 0)]), MEM, crowd)
    placed = [(r.worker, r.key, r.tier) for r in runs(s.start())]
    assert placed == [("large", ("big", 0), 3), ("large", ("big", 1), 1), ("small", ("p0", 0), 3)]
    assert all(s.workers[w].memory >= MEM[p] for w, p in s.resident.items() if p)


def test_tie_break_is_seeded_and_ignores_crowd_order() -> None:
    g = graph([("p0", 0)])
    crowd = [WorkerInfo(f"w{i}", 100) for i in range(20)]
    chosen = {only_run(Scheduler(g, MEM, crowd, seed=seed).start()).worker for seed in range(10)}
    assert len(chosen) > 1  # the seed matters
    for seed in range(5):
        one = Scheduler(g, MEM, crowd, seed=seed).start()
        other = Scheduler(g, MEM, list(reversed(crowd)), seed=seed).start()
        assert one == other


_HASH_SCRIPT = """
import networkx as nx
from crowdgraph.schedule import Scheduler, TaskFinished, WorkerInfo, WorkerLost, Run
parts = [f"part-{k}" for k in range(6)]
g = nx.DiGraph()
for k, p in enumerate(parts):
    for i in range(5):
        g.add_node((p, i), partition=p)
        if k:
            g.add_edge((parts[k - 1], i), (p, i))
crowd = [WorkerInfo(f"worker-{k}", 100, 1 + k % 3, frozenset(parts[k % 4:k % 4 + 3])) for k in range(8)]
for policy in ("cost", "pipeline", "greedy"):
    s = Scheduler(g, dict.fromkeys(parts, 50), crowd, seed=11, policy=policy,
                  flops={p: 1e9 * (k + 1) for k, p in enumerate(parts)})
    todo = s.start()
    log = list(todo)
    while todo:
        a = todo.pop(0)
        if isinstance(a, Run):
            new = s.handle(TaskFinished(a.worker, a.key, len(log) % 7 / 3))
            if len(s.finished) == 8 and a.worker in s.workers:
                new += s.handle(WorkerLost(a.worker))
            log += new
            todo += new
    print(policy, s.done, s.lost, len(log), repr(log))
"""


def test_actions_do_not_depend_on_the_hash_seed() -> None:
    # Partition and worker names are strings, whose hashes (and so set
    # orders) change from one Python process to the next.
    root = Path(__file__).resolve().parents[1]
    outputs = set()
    for hash_seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(root)}
        done = subprocess.run(
            [sys.executable, "-c", _HASH_SCRIPT], env=env, cwd=root,
            capture_output=True, text=True, check=True,
        )
        outputs.add(done.stdout)
    assert len(outputs) == 1
    assert [line.split()[:2] for line in next(iter(outputs)).splitlines()] == [
        ["cost", "True"], ["pipeline", "True"], ["greedy", "True"]]


# -- JIT loading ---------------------------------------------------------------


def test_nothing_is_loaded_before_a_task_is_ready() -> None:
    g = graph([("p0", 0), ("p1", 0)], [(("p0", 0), ("p1", 0))])
    s = Scheduler(g, MEM, [WorkerInfo("a", 100), WorkerInfo("b", 100)])
    actions = s.start()
    assert [type(a) for a in actions] == [Load, Run]
    assert sorted(p for p in s.resident.values() if p) == ["p0"]


# -- losses, late messages -----------------------------------------------------


def test_loaded_waits_for_load_finished() -> None:
    g = graph([("p0", 0), ("p1", 0)], [(("p0", 0), ("p1", 0))])
    s = Scheduler(g, MEM, [WorkerInfo("a", 100)])
    s.start()
    assert s.resident == {"a": "p0"} and s.loaded == {"a": None}
    s.handle(LoadFinished("a", "p0"))
    assert s.loaded == {"a": "p0"}
    s.handle(TaskFinished("a", ("p0", 0)))  # swaps a to p1
    assert s.resident == {"a": "p1"} and s.loaded == {"a": None}
    s.handle(LoadFinished("a", "p1"))
    assert s.loaded == {"a": "p1"}


def test_lost_worker_tasks_are_placed_again() -> None:
    g = graph([("p0", 0), ("p0", 1), ("p1", 0)], [(("p0", 0), ("p1", 0))])
    s = Scheduler(g, MEM, [WorkerInfo("a", 100, speed=2.0), WorkerInfo("b", 100)])
    s.start()
    assert s.queue("a") == (("p0", 0), ("p0", 1))
    actions = s.handle(WorkerLost("a"))
    assert actions == [Load("b", "p0"), Run("b", ("p0", 0), 3), Run("b", ("p0", 1), 1)]
    assert s.lost == ("a",)
    assert "a" not in s.workers and "a" not in s.resident


def test_late_duplicates_are_ignored() -> None:
    g = graph([("p0", 0), ("p0", 1)])
    s = Scheduler(g, MEM, [WorkerInfo("a", 100, speed=2.0), WorkerInfo("b", 100)])
    s.start()
    s.handle(TaskFinished("a", ("p0", 0)))
    assert set(s.finished) == {("p0", 0)}
    assert s.handle(TaskFinished("a", ("p0", 0))) == []  # already finished
    assert s.handle(TaskFinished("b", ("p0", 1))) == []  # not queued on b
    assert set(s.finished) == {("p0", 0)}
    s.handle(WorkerLost("a"))
    assert s.queue("b") == (("p0", 1),)
    assert s.handle(TaskFinished("a", ("p0", 1))) == []  # from a lost worker
    assert s.handle(WorkerLost("a")) == []  # lost twice
    assert s.handle(LoadFinished("a", "p0")) == []
    assert set(s.finished) == {("p0", 0)}
    s.handle(TaskFinished("b", ("p0", 1)))
    assert s.done and s.produced_on == {("p0", 0): "a", ("p0", 1): "b"}


def test_losing_the_only_worker_that_fits_is_a_worker_lost_error() -> None:
    g = graph([("p0", 0), ("big", 0)], [(("p0", 0), ("big", 0))])
    s = Scheduler(g, MEM, [WorkerInfo("large", 60), WorkerInfo("small", 20, speed=5.0)])
    s.start()
    with pytest.raises(WorkerLostError) as info:
        s.handle(WorkerLost("large"))
    text = str(info.value)
    assert "'large'" in text and "'big'" in text and "50 B" in text and "20 B" in text


def test_losing_every_worker_is_a_worker_lost_error() -> None:
    s = Scheduler(graph([("p0", 0)]), MEM, [WorkerInfo("a", 100)])
    s.start()
    with pytest.raises(WorkerLostError, match="every worker was lost"):
        s.handle(WorkerLost("a"))


def test_losing_a_worker_after_the_run_is_done_is_fine() -> None:
    s = Scheduler(graph([("p0", 0)]), MEM, [WorkerInfo("a", 100)])
    s.start()
    s.handle(TaskFinished("a", ("p0", 0)))
    assert s.handle(WorkerLost("a")) == [] and s.done


def test_joined_worker_picks_up_ready_tasks() -> None:
    g = graph([("p0", 0), ("p1", 0)])
    s = Scheduler(g, MEM, [WorkerInfo("a", 100)])
    assert only_run(s.start()).key == ("p0", 0)
    assert s.handle(WorkerJoined(WorkerInfo("b", 100))) == [Load("b", "p1"), Run("b", ("p1", 0), 3)]
    assert s.tie_break["b"] == 1  # joined workers rank after the initial crowd


def test_results_lost_are_recomputed_and_dependents_wait() -> None:
    # (p0, 0) -> (p1, 0); (p0, 0) -> (p1, 1); (p1, 0) finishes before the loss.
    tasks = [("p0", 0), ("p1", 0), ("p1", 1), ("p2", 0)]
    edges = [(("p0", 0), ("p1", 0)), (("p0", 0), ("p1", 1)), (("p1", 0), ("p2", 0))]
    crowd = [WorkerInfo("a", 100, speed=3.0), WorkerInfo("b", 100, speed=2.0)]
    s = Scheduler(graph(tasks, edges), MEM, crowd)
    assert only_run(s.start()) == Run("a", ("p0", 0), 3)
    s.handle(TaskFinished("a", ("p0", 0)))
    assert s.queues["b"] == (("p1", 0), ("p1", 1))
    s.handle(TaskFinished("b", ("p1", 0)))
    s.handle(WorkerLost("a"))
    assert s.handle(ResultsLost((("p0", 0), ("p0", 0)))) == [
        Unload("b", "p1"),
        Load("b", "p0"),
        Run("b", ("p0", 0), 4),
    ]
    # (p1, 1) was queued and lost its input: it waits again; (p1, 0) stays
    # finished; (p2, 0) became ready and waits for an idle worker.
    assert set(s.finished) == {("p1", 0)}
    assert s.queue("b") == (("p0", 0),)
    assert s.ready == (("p2", 0),)
    assert s.handle(TaskFinished("b", ("p1", 1))) == []  # its stale run is ignored
    # (p1, 1) and (p2, 0) both need b swapped (tier 4); (p1, 1) sorts first.
    assert s.handle(TaskFinished("b", ("p0", 0))) == [
        Unload("b", "p0"),
        Load("b", "p1"),
        Run("b", ("p1", 1), 4),
    ]
    assert s.ready == (("p2", 0),)


# -- property tests --------------------------------------------------------------


def best_choice(
    state: dict[str, dict[str, Any]],
    key: TaskKey,
    need: dict[str, int],
    preds: list[TaskKey],
    produced_on: dict[TaskKey, str],
    rank: dict[str, int],
) -> tuple[int, set[str]]:
    """The best tier for ``key`` and the workers the rules allow in it.

    Written from the rules, independent of the scheduler's indices.
    """
    p = key[0]
    tiers: list[list[str]] = [[], [], [], []]
    for wid, w in state.items():
        info: WorkerInfo = w["info"]
        if w["resident"] == p:
            tiers[0].append(wid)
        elif w["queue"] == 0 and info.memory >= need[p]:
            if p in info.cached:
                tiers[1].append(wid)
            elif w["resident"] is None:
                tiers[2].append(wid)
            else:
                tiers[3].append(wid)
    made = Counter(produced_on[u] for u in preds)
    for t, cands in enumerate(tiers, start=1):
        if cands:
            def score(wid: str) -> tuple[int, float, int]:
                w = state[wid]
                return (-made[wid], (w["queue"] + 1) / w["info"].speed, rank[wid])

            best = min(score(w) for w in cands)
            return t, {w for w in cands if score(w) == best}
    return 0, set()


Problem = tuple[nx.DiGraph, dict[str, int], list[WorkerInfo], int, dict[str, Any]]


@st.composite
def problems(draw: st.DrawFn) -> Problem:
    """A random partition DAG run as a real task graph (streaming, or a
    barrier with ``data=False`` edges), a random crowd and cost figures."""
    n_parts = draw(st.integers(1, 8))
    n_mb = draw(st.integers(1, 6))
    parts = [f"p{k}" for k in range(n_parts)]
    need = {p: draw(st.integers(1, 100)) for p in parts}
    dag = nx.DiGraph()
    dag.add_nodes_from(parts)
    for j in range(1, n_parts):
        for q in range(j):
            if draw(st.integers(0, 2)) == 0:
                dag.add_edge(parts[q], parts[j])
    mode = draw(st.sampled_from(["streaming", "barrier"]))
    g = build_task_graph(dag, n_mb, mode)
    style = draw(st.sampled_from(["built", "key", "random"]))
    for key, attrs in g.nodes(data=True):
        if style == "key":
            del attrs["priority"]
        elif style == "random":
            attrs["priority"] = (draw(st.integers(0, 5)),)
    n_workers = draw(st.integers(1, 6))
    warm = draw(st.booleans()) and draw(st.booleans())  # some hold partitions already
    crowd = []
    for k in range(n_workers):
        memory = draw(st.integers(1, 100))
        resident = None
        if warm:
            fits = [p for p in parts if need[p] <= memory]
            resident = draw(st.sampled_from([None, "old-model", *fits]))
        crowd.append(WorkerInfo(
            f"w{k}",
            memory=memory,
            speed=draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])),
            cached=frozenset(draw(st.sets(st.sampled_from(parts), max_size=3))),
            resident=resident,
            bandwidth=draw(st.sampled_from([1.0, 100.0, 1e6])),
            stores=draw(st.booleans()),
        ))
    largest = max(need.values())
    if max(w.memory for w in crowd) < largest:
        k = draw(st.integers(0, n_workers - 1))
        crowd[k] = replace(crowd[k], memory=largest)
    seed = draw(st.integers(0, 2**16))
    costs = {
        "policy": draw(st.sampled_from(["cost", "pipeline", "greedy"])),
        "weight_bytes": {p: draw(st.integers(0, 1000)) for p in parts},
        "flops": {p: draw(st.sampled_from([0, 1e6, 1e9, 1e11])) for p in parts},
        # State affinity: some tasks read state kept on a worker (which may
        # not hold their partition, or be lost later).
        "pins": {key: f"w{draw(st.integers(0, n_workers - 1))}" for key in sorted(g.nodes)
                 if draw(st.integers(0, 3)) == 0},
    }
    return g, need, crowd, seed, costs


def holders_of(state: dict[str, dict[str, Any]], p: str, need: dict[str, int]) -> list[str]:
    """Workers that hold ``p`` and can run it (a warm partition that does
    not fit its worker's budget is held but never run there)."""
    return [w for w, x in state.items() if x["resident"] == p and x["info"].memory >= need[p]]


def check_stores(s: Scheduler, g: nx.DiGraph, need: dict[str, int], stores: list[Store],
                 stored: dict[str, set[str]]) -> None:
    """``Store`` actions, the last of their batch: only to workers that
    store, of partitions that fit them, have work and no holder, one per
    worker and per partition; ``stored`` (worker -> partitions stored
    ahead) takes them in."""
    assert all(isinstance(a, Store) for a in stores), "Store actions come last"
    unfinished = {key[0] for key in g.nodes if key not in s.finished}
    held = {p for wid, p in s.resident.items() if p in need and s.workers[wid].memory >= need[p]}
    assert len({a.worker for a in stores}) == len(stores), "one Store per worker at a time"
    assert len({a.partition for a in stores}) == len(stores), "one Store per partition at a time"
    for a in stores:
        info = s.workers[a.worker]
        assert info.stores and info.memory >= need[a.partition], a
        assert a.partition in unfinished and a.partition not in held, a
        assert a.partition not in stored.setdefault(a.worker, set()) | info.cached, f"{a} stored twice"
        stored[a.worker].add(a.partition)


def check_batch(
    s: Scheduler,
    g: nx.DiGraph,
    need: dict[str, int],
    actions: list[Action],
    stored: dict[str, set[str]] | None = None,
) -> None:
    """Check a batch of actions against the rules, from the state it left.

    Every policy: runs wait for all their predecessors (barrier edges
    too), ``Load`` comes just before its ``Run`` (JIT), budgets hold, the
    reported tier says what moved (a partition stored ahead, ``stored``,
    counts as cached once the worker's partition has no work left), and
    the holders invariant: a worker becomes a new holder of ``p`` only when
    no other holder of ``p`` could take the task (pipeline: there is none;
    cost and greedy: every one is busy), and no ``Unload`` leaves a
    partition with ready tasks without a holder.  The pipeline policy is
    also checked against an oracle of its tier rules.
    ``Store`` actions are checked by :func:`check_stores`.
    """
    stored = {} if stored is None else stored
    first_store = next((i for i, a in enumerate(actions) if isinstance(a, Store)), len(actions))
    actions, stores = actions[:first_store], actions[first_store:]
    policy = s.policy
    post_res = dict(s.resident)
    post_queue = dict(s.queues)
    workers = dict(s.workers)
    finished = set(s.finished)
    produced_on = dict(s.produced_on)
    rank = dict(s.tie_break)

    # Undo the batch: placement only changes residents and queues.
    issued = [a for a in actions if isinstance(a, Run)]
    state: dict[str, dict[str, Any]] = {}
    for wid, info in workers.items():
        mine = [a for a in actions if a.worker == wid]
        res = post_res[wid]
        unloads = [a for a in mine if isinstance(a, Unload)]
        loads = [a for a in mine if isinstance(a, Load)]
        if unloads:
            res = unloads[0].partition
        elif loads:
            res = None
        keys = [a.key for a in mine if isinstance(a, Run)]
        q = post_queue[wid]
        assert list(q[len(q) - len(keys):]) == keys, "runs are queued in order"
        # What it stored ahead counts as cached once the partition it holds has no work left.
        spent = res is None or all(k in finished for k in g.nodes if k[0] == res)
        if spent:
            info = replace(info, cached=info.cached | stored.get(wid, set()))
        state[wid] = {"info": info, "resident": res, "queue": len(q) - len(keys)}
    assert not any(a.worker not in workers for a in actions)

    def prio(key: TaskKey) -> tuple[Any, TaskKey]:
        return (g.nodes[key].get("priority", key), key)

    def best_tier(key: TaskKey) -> int:
        tier = best_choice(state, key, need, list(g.predecessors(key)), produced_on, rank)[0]
        return tier or 5  # no candidate at all

    # Replay it forward, checking each placement against the rules.
    unplaced = set(s.ready) | {r.key for r in issued}
    pending: list[Action] = []
    for a in actions:
        if not isinstance(a, Run):
            pending.append(a)
            continue
        key, wid, p = a.key, a.worker, a.key[0]
        assert key not in finished
        assert all(u in finished for u in g.predecessors(key)), "ran before its predecessors"
        w = state[wid]
        old = w["resident"]
        pin = s.pins.get(key)
        if pin in state and pin in holders_of(state, p, need):  # state affinity above every tier
            assert wid == pin and a.tier == 1, f"{a}: pinned to {pin}, which holds {p}"
            unplaced.discard(key)
            w["queue"] += 1
            pending = []
            continue
        if old == p:
            assert pending == [] and a.tier == 1, a
        else:
            expect: list[Action] = [Unload(wid, old)] if old is not None else []
            assert pending == expect + [Load(wid, p)], "a Load comes just before its Run"
            assert a.tier == (2 if p in w["info"].cached else 3 if old is None else 4), a
            assert w["queue"] == 0, "only an idle worker is given a new partition"
            others = [h for h in holders_of(state, p, need) if h != wid]
            if policy == "pipeline":
                assert others == [], f"{a}: a second holder under the pipeline rule"
            else:
                assert all(state[h]["queue"] for h in others), f"{a} while a holder of {p} is idle"
        if policy == "pipeline":
            tier, allowed = best_choice(state, key, need, list(g.predecessors(key)), produced_on, rank)
            unplaced.discard(key)
            if tier > 1:
                # No other ready task had a better tier, or the same one and a
                # better priority.
                for other in unplaced:
                    assert (best_tier(other), prio(other)) > (tier, prio(key)), (a, other)
            assert a.tier == tier, f"{a} but best tier is {tier}"
            assert wid in allowed, f"{a} but the rules pick one of {sorted(allowed)}"
        elif policy == "greedy":
            assert a.tier > 1 or w["queue"] == 0, f"{a}: the greedy policy never queues"
        assert w["info"].memory >= need[p]
        w["resident"] = p
        w["queue"] += 1
        pending = []
    assert pending == [], "a Load without its Run (JIT)"
    assert {w: x["resident"] for w, x in state.items()} == post_res
    assert len({r.key for r in issued}) == len(issued)
    # Tasks of one partition are placed in priority order.
    for part in {r.key[0] for r in issued}:
        order = [prio(r.key) for r in issued if r.key[0] == part]
        assert order == sorted(order)

    ready_parts = {key[0] for key in s.ready}
    for a in actions:
        if isinstance(a, Unload) and a.partition in ready_parts:
            assert holders_of(state, a.partition, need), f"{a} left ready tasks without a holder"

    check_stores(s, g, need, stores, stored)

    # Nothing is left that could have been placed.
    for key in s.ready:
        p = key[0]
        holders = holders_of(state, p, need)
        assert not any(state[h]["queue"] == 0 for h in holders), f"{key} left with an idle holder"
        if policy == "pipeline":
            assert not holders, f"{key} left with a holder"
        if policy == "greedy" or not holders:
            assert not any(
                x["queue"] == 0 and x["info"].memory >= need[p] for x in state.values()
            ), f"{key} left while an idle worker fits"


def check_state(s: Scheduler, g: nx.DiGraph, need: dict[str, int],
                backed_up: AbstractSet[TaskKey] = frozenset()) -> None:
    """Every task is in exactly one state and the states agree with the graph.

    A task is queued on one worker, or on two while it has a backup copy;
    a finished task may still be queued where its slower copy runs.
    """
    finished = set(s.finished)
    ready = set(s.ready)
    where: dict[TaskKey, str] = {}
    for wid, q in s.queues.items():
        for key in q:
            if key in where:
                assert s.copies.get(key) in (wid, where[key]), f"{key} queued twice without a backup"
            where[key] = wid
            assert s.resident[wid] == key[0], "a worker's queue is all of its resident partition"
    for key in s.copies:
        assert key not in finished and sum(key in q for q in s.queues.values()) == 2
    for key in g.nodes:
        if key in finished and key in where:
            assert key in backed_up, f"{key} finished yet queued, and it never had a backup"
            del where[key]
        preds_done = all(u in finished for u in g.predecessors(key))
        kinds = [key in finished, key in ready, key in where]
        assert sum(kinds) <= 1, key
        if key in ready or key in where:
            assert preds_done, key
        elif key not in finished:
            assert not preds_done, f"{key} is lost: ready but nowhere"
    for wid, p in s.resident.items():
        if p in need:
            assert s.workers[wid].memory >= need[p]
    assert set(s.produced_on) == finished
    assert s.done == (len(finished) == g.number_of_nodes())


def check_backup(s: Scheduler, g: nx.DiGraph, need: dict[str, int], event: TaskOverdue,
                 actions: list[Action], before: dict[str, tuple[TaskKey, ...]],
                 stored: dict[str, set[str]]) -> None:
    """A backup is one Run of the running task, on a worker that was idle,
    after the Unload/Load it needs; what follows it is a placement like any
    other (:func:`check_batch`), then Stores."""
    if not actions:
        return
    backup = next(i for i, a in enumerate(actions) if isinstance(a, Run)) + 1
    check_batch(s, g, need, actions[backup:], stored)
    actions = actions[:backup]
    assert before.get(event.worker, ())[:1] == (event.key,), f"backup of {event.key}, which is not running"
    assert event.key not in s.finished
    *moves, run = actions
    assert isinstance(run, Run) and run.key == event.key and run.worker != event.worker
    assert before[run.worker] == (), "a backup goes to an idle worker"
    assert all(isinstance(a, (Unload, Load)) and a.worker == run.worker for a in moves)
    assert (run.tier == 1) == (not moves)
    assert s.copies[event.key] == run.worker


def infeasible(s: Scheduler, g: nx.DiGraph, need: dict[str, int]) -> bool:
    """Whether some partition with unfinished tasks fits no live worker."""
    unfinished = {key[0] for key in g.nodes if key not in s.finished}
    if not unfinished:
        return False
    budgets = [w.memory for w in s.workers.values()]
    return not budgets or any(need[p] > max(budgets) for p in unfinished)


class SimExecutor:
    """Per-worker FIFO queues of actions, as the execution contract says."""

    def __init__(self) -> None:
        self.queues: dict[str, deque[Action]] = {}
        self.held: dict[str, str | None] = {}

    def add(self, actions: list[Action]) -> None:
        for a in actions:
            self.queues.setdefault(a.worker, deque()).append(a)
            self.held.setdefault(a.worker, None)

    def lose(self, wid: str) -> None:
        self.queues.pop(wid, None)
        self.held.pop(wid, None)

    def busy(self) -> list[str]:
        return sorted(w for w, q in self.queues.items() if q)

    def step(self, wid: str) -> Event | None:
        """Carry out the worker's next actions up to one that reports an event."""
        q = self.queues[wid]
        while q:
            a = q.popleft()
            if isinstance(a, Unload):
                assert self.held[wid] == a.partition
                self.held[wid] = None
            elif isinstance(a, Load):
                assert self.held[wid] is None, "two partitions resident"
                self.held[wid] = a.partition
                return LoadFinished(wid, a.partition)
            elif isinstance(a, Store):
                continue  # to local storage: nothing resident changes
            else:
                assert isinstance(a, Run)
                return TaskFinished(wid, a.key)
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), data=st.data())
def test_random_runs_follow_the_rules(problem: Problem, data: st.DataObject) -> None:
    g, need, crowd, seed, costs = problem
    s = Scheduler(g, need, crowd, seed=seed, **costs)
    sim = SimExecutor()
    sim.held = {w.id: w.resident for w in crowd}
    unconfirmed: Counter[str] = Counter()  # Loads whose LoadFinished was not fed yet
    backed_up: set[TaskKey] = set()  # tasks that ever had a backup copy
    stored: dict[str, set[str]] = {}  # worker -> partitions stored ahead on it
    events: list[tuple[Event | None, float | None]] = []  # None: start()
    batches: list[list[Action]] = []
    clock = [0.0]  # the caller's clock: each event comes some time later, or without one

    def feed(event: Event | None) -> bool:
        """Apply one event and check everything; False once the run ended
        with the WorkerLostError it had to end with."""
        before = set(s.finished)
        queued_here = (
            isinstance(event, TaskFinished) and event.key in s.queue(event.worker)
            and event.key not in before
        )
        rank_before = dict(s.tie_break)
        before_queues = dict(s.queues)
        later = data.draw(st.sampled_from([None, 0.0, 0.3, 3.0]))
        now = None if later is None else clock[0] + later
        clock[0] = clock[0] if now is None else now
        try:
            actions = s.start(now) if event is None else s.handle(event, now)
        except WorkerLostError:
            assert isinstance(event, (WorkerLost, ResultsLost)) and infeasible(s, g, need)
            return False
        if isinstance(event, (WorkerLost, ResultsLost)):
            assert not infeasible(s, g, need), "infeasible after a loss, yet no WorkerLostError"
        events.append((event, now))
        batches.append(actions)
        after = set(s.finished)
        if isinstance(event, TaskFinished):
            assert after - before == ({event.key} if queued_here else set())
            assert before <= after
        elif isinstance(event, ResultsLost):
            assert after == before - set(event.keys)
        else:
            assert after == before
        assert {w: r for w, r in s.tie_break.items() if w in rank_before} == rank_before, "ranks are kept"
        if isinstance(event, TaskOverdue):
            check_backup(s, g, need, event, actions, before_queues, stored)
        else:
            check_batch(s, g, need, actions, stored)
        check_state(s, g, need, backed_up)
        unconfirmed.update(a.worker for a in actions if isinstance(a, Load))
        for wid, p in s.loaded.items():
            # loaded names the resident partition exactly when every Load
            # issued to the worker was confirmed.
            assert p == (s.resident[wid] if unconfirmed[wid] == 0 else None), (wid, p)
            if p is not None:
                assert sim.held.get(wid) == p
        sim.add(actions)
        return True

    feed(None)
    losses = joins = dups = result_losses = bogus = overdue = 0
    finished_log: list[TaskFinished] = []
    for _ in range(3000):
        if s.done:
            break
        options: list[tuple[str, str]] = [("step", w) for w in sim.busy()]
        assert options, "stalled: nothing running and work left"
        if losses < 3:
            options += [("lose", wid) for wid in sorted(s.workers)]
        if joins < 3:
            options += [("join", ""), ("rejoin", "")]
        if dups < 4 and finished_log:
            options.append(("dup", ""))
        if result_losses < 2 and s.finished:
            options.append(("results", ""))
        if bogus < 3:
            options.append(("bogus-load", ""))
        if overdue < 3 and any(s.queues.values()):
            options.append(("overdue", ""))
        # Mostly let workers work; now and then lose, join or repeat something.
        disturb = len(options) > len(sim.busy()) and data.draw(st.integers(0, 5)) == 5
        if not disturb:
            options = options[: len(sim.busy())]
        kind, wid = data.draw(st.sampled_from(options))
        if kind == "step":
            event = sim.step(wid)
            if isinstance(event, TaskFinished):
                duration = data.draw(st.sampled_from([None, 0.0, 0.01, 1.0, 100.0]))
                event = TaskFinished(event.worker, event.key, duration)
                finished_log.append(event)
            elif isinstance(event, LoadFinished):
                unconfirmed[wid] -= 1
            if event is not None and not feed(event):
                return
        elif kind == "lose":
            losses += 1
            made_there = sorted(k for k, w in s.produced_on.items() if w == wid)
            sim.lose(wid)
            unconfirmed.pop(wid, None)
            stored.pop(wid, None)
            if not feed(WorkerLost(wid)):
                return
            if made_there and data.draw(st.booleans()):
                result_losses += 1
                if not feed(ResultsLost(tuple(made_there))):
                    return
        elif kind == "join":
            joins += 1
            lost_ids = [w for w in s.lost if w not in s.workers]
            new_id = data.draw(st.sampled_from(lost_ids + [f"j{joins}"]))
            info = WorkerInfo(
                new_id,
                memory=data.draw(st.integers(1, 100)),
                speed=data.draw(st.sampled_from([0.5, 1.0, 2.0])),
                cached=frozenset(data.draw(st.sets(st.sampled_from(sorted(need)), max_size=2))),
            )
            sim.lose(new_id)  # a rejoining worker starts empty
            feed(WorkerJoined(info))
        elif kind == "rejoin":
            # A live worker announced again (a repeated handshake): ignored.
            joins += 1
            wid = data.draw(st.sampled_from(sorted(s.workers)))
            queues, resident = dict(s.queues), dict(s.resident)
            feed(WorkerJoined(WorkerInfo(wid, memory=1)))
            assert batches[-1] == [] and dict(s.queues) == queues and dict(s.resident) == resident
        elif kind == "bogus-load":
            # LoadFinished for a partition the worker is not loading confirms nothing.
            bogus += 1
            wid = data.draw(st.sampled_from(sorted(s.workers)))
            wrong = data.draw(st.sampled_from(sorted(set(need) | {"old-model"})))
            if wrong != next((a.partition for a in sim.queues.get(wid, ()) if isinstance(a, Load)), None):
                feed(LoadFinished(wid, wrong))
        elif kind == "overdue":
            overdue += 1
            wid = data.draw(st.sampled_from(sorted(w for w, q in s.queues.items() if q)))
            key = data.draw(st.sampled_from(s.queue(wid)))  # the running task, or a queued one
            feed(TaskOverdue(wid, key))
            backed_up.update(s.copies)
        elif kind == "dup":
            dups += 1
            if not feed(data.draw(st.sampled_from(finished_log))):
                return
        else:
            result_losses += 1
            keys = data.draw(st.lists(st.sampled_from(sorted(s.finished)), min_size=1, max_size=4))
            if not feed(ResultsLost(tuple(keys))):
                return
    assert s.done, "the run did not finish"

    # Determinism: the same events on a new scheduler give the same actions.
    again = Scheduler(g, need, crowd, seed=seed, **costs)
    replay = [again.start(now) if e is None else again.handle(e, now) for e, now in events]
    assert replay == batches


@settings(max_examples=300, deadline=None)
@given(problem=problems(), shrink=st.integers(0, 100))
def test_planning_error_exactly_when_a_partition_fits_no_worker(problem: Problem, shrink: int) -> None:
    g, need, crowd, seed, _ = problem
    crowd = [WorkerInfo(w.id, max(0, w.memory - shrink), w.speed, w.cached) for w in crowd]
    largest = max(w.memory for w in crowd)
    if max(need.values()) > largest:
        with pytest.raises(PlanningError, match="memory_budget"):
            Scheduler(g, need, crowd, seed=seed)
    else:
        s = Scheduler(g, need, crowd, seed=seed)
        actions = s.start()
        assert runs(actions), "something is always ready at the start"
        # Every Load comes with a Run of that partition on that worker.
        for i, a in enumerate(actions):
            if isinstance(a, Load):
                nxt = actions[i + 1]
                assert isinstance(nxt, Run) and (nxt.worker, nxt.key[0]) == (a.worker, a.partition)


# -- the cost rule, replicas, and what the mutation audit found ------------------------


def chain_of(n_mb: int, parts: Sequence[str] = ("p0",)) -> nx.DiGraph:
    return build_task_graph(nx.path_graph(parts, create_using=nx.DiGraph), n_mb, "streaming")


def drain(s: Scheduler, actions: list[Action], seconds: float | None = None) -> list[Action]:
    """Finish every Run first in, first out; return every action issued."""
    log = list(actions)
    todo = deque(actions)
    while todo:
        a = todo.popleft()
        if isinstance(a, Run):
            new = s.handle(TaskFinished(a.worker, a.key, seconds))
            log += new
            todo += new
    assert s.done
    return log


def holders_per_partition(actions: list[Action]) -> dict[str, set[str]]:
    held: dict[str, set[str]] = {}
    for a in actions:
        if isinstance(a, Run):
            held.setdefault(a.key[0], set()).add(a.worker)
    return held


@pytest.mark.parametrize("policy, holders", [("pipeline", 1), ("cost", 4), ("greedy", 4)])
def test_a_bottleneck_partition_gets_replicas_when_loading_pays(policy: str, holders: int) -> None:
    # 16 ready tasks of 1 s each; loading 10 bytes costs microseconds.
    crowd = [WorkerInfo(f"w{i}", 100) for i in range(4)]
    s = Scheduler(chain_of(16), MEM, crowd, policy=policy, flops={"p0": 5e9})  # type: ignore[arg-type]
    assert len(holders_per_partition(drain(s, s.start(), 1.0))["p0"]) == holders


def test_no_replica_when_loading_costs_more_than_waiting() -> None:
    # 4 tasks of 1 s; w0 holds p0 already, the weights would take 100 s to
    # reach the others: the cost rule waits for w0, the greedy policy loads.
    crowd = [WorkerInfo(f"w{i}", 100, bandwidth=1e6, resident="p0" if i == 0 else None) for i in range(3)]
    for policy, holders in (("cost", 1), ("greedy", 3)):
        s = Scheduler(chain_of(4), MEM, crowd, policy=policy,  # type: ignore[arg-type]
                      weight_bytes={"p0": 100_000_000}, flops={"p0": 5e9})
        assert len(holders_per_partition(drain(s, s.start(), 1.0))["p0"]) == holders, policy


def test_measured_durations_replace_the_flops_estimate() -> None:
    # Without FLOPs the first estimate is 0 s: nothing is worth a load.  Once
    # a task reports 10 s, a replica is: the next placements load one.
    crowd = [WorkerInfo("a", 100), WorkerInfo("b", 100)]
    s = Scheduler(chain_of(6), MEM, crowd)
    first = s.start()
    assert [(a.worker, a.key) for a in runs(first)] == [("a", ("p0", 0)), ("a", ("p0", 1))]
    assert s.handle(TaskFinished("a", ("p0", 0))) == [Run("a", ("p0", 2), 1)]
    after = s.handle(TaskFinished("a", ("p0", 1), duration=10.0))
    assert Load("b", "p0") in after and {r.worker for r in runs(after)} == {"a", "b"}


def test_estimates_from_earlier_runs_replace_the_flops_seed_and_are_read_back() -> None:
    # w0 holds p0; its 16 tasks of 1 s by their FLOPs get replicas (a load
    # takes microseconds); measured at 1 ns in an earlier run, no load pays.
    # The run's measurements then move it as they move a first one.
    crowd = [WorkerInfo(f"w{i}", 100, resident="p0" if i == 0 else None) for i in range(4)]
    for estimates, holders in (({}, 4), ({"p0": 1e-9}, 1)):
        s = Scheduler(chain_of(16), MEM, crowd, flops={"p0": 5e9}, estimates=estimates)
        assert s.measured_estimates == estimates
        assert len(holders_per_partition(drain(s, s.start(), 2e-9))["p0"]) == holders
        learnt = s.measured_estimates["p0"]
        if estimates:
            assert 1e-9 < learnt < 2e-9
        else:
            assert learnt == pytest.approx(2e-9)


def test_a_faster_idle_worker_loads_a_replica_the_holders_queue_would_delay() -> None:
    crowd = [WorkerInfo("slow", 100, speed=0.5), WorkerInfo("fast", 100, speed=4.0, resident="p1")]
    s = Scheduler(chain_of(8), MEM, crowd, flops={"p0": 5e9, "p1": 0})
    placed = runs(s.start())
    assert {r.worker for r in placed} == {"slow", "fast"}
    assert [r.tier for r in placed if r.worker == "fast"][0] == 4


@pytest.mark.parametrize("speed, replica", [(0.4, False), (1.0, True)])
def test_no_replica_from_storage_when_the_holders_finish_the_ready_tasks_sooner_in_whole_tasks(
        speed: float, replica: bool) -> None:
    # Tasks of 1 s; "fast" (speed 1) and "slow" (0.25) hold p0 and start
    # one each, "phone" caches p0.  The drain spreads the two queued tasks
    # over both holders (2.6 s for the third), but "fast" finishes it at
    # 2 s, whole: a phone of speed 0.4 (2.5 s) is not needed, one of
    # speed 1 (1 s) is.
    crowd = [WorkerInfo("fast", 100, resident="p0"), WorkerInfo("slow", 100, speed=0.25, resident="p0"),
             WorkerInfo("phone", 100, speed=speed, cached=frozenset({"p0"}))]
    s = Scheduler(chain_of(3), MEM, crowd, flops={"p0": 5e9})
    third = [a for a in s.start() if isinstance(a, Run) and a.key == ("p0", 2)]
    assert third == ([Run("phone", ("p0", 2), 2)] if replica else [Run("fast", ("p0", 2), 1)])


@pytest.mark.parametrize("now, replica", [(0.0, True), (0.9, False)])
def test_a_holder_s_running_task_counts_from_when_it_started_by_the_caller_s_clock(now: float, replica: bool) -> None:
    # Tasks of 1 s: "fast" holds p0 and from t=0 runs one and queues one; a
    # phone of speed 0.4 caching p0 joins.  At t=0, fast ends the third task
    # at 3 s, after the phone would (2.5 s): a replica.  At t=0.9 fast has
    # 0.1 s left of the first and ends the third 2.1 s later, before the
    # phone: the task waits for fast.
    s = Scheduler(chain_of(3), MEM, [WorkerInfo("fast", 100, resident="p0")], flops={"p0": 5e9})
    assert [r.key for r in runs(s.start(now=0.0))] == [("p0", 0), ("p0", 1)]
    phone = WorkerInfo("phone", 100, speed=0.4, cached=frozenset({"p0"}))
    assert runs(s.handle(WorkerJoined(phone), now=now)) == ([Run("phone", ("p0", 2), 2)] if replica else [])
    if not replica:
        assert runs(s.handle(TaskFinished("fast", ("p0", 0), 1.0), now=1.0)) == [Run("fast", ("p0", 2), 1)]


@pytest.mark.parametrize("weights, replica", [(10_000_000, True), (60_000_000, False)])
def test_with_no_worker_to_spare_a_replica_must_lag_by_more_than_its_load(weights: int, replica: bool) -> None:
    # Two workers, three stages: every worker is needed as a holder.  p0's
    # 8 tasks of 1 s on w0 are 8 s of the crowd's 12 s of work, 2 s more
    # than its share: worth a 1 s load (10 MB at 10 MB/s) that the two
    # workers share, not a 6 s one, though either replica would run a task
    # before w0 gets through them.
    crowd = [WorkerInfo("w0", 100, resident="p0"), WorkerInfo("w1", 100)]
    s = Scheduler(chain_of(8, ("p0", "p1", "p2")), MEM, crowd, weight_bytes=dict.fromkeys(MEM, weights),
                  flops={"p0": 5e9, "p1": 1.25e9, "p2": 1.25e9})
    assert (Load("w1", "p0") in s.start()) == replica


@pytest.mark.parametrize("stages, in_step", [(("p0", "p1", "p2"), True), (("p0", "p1", "p2", "big"), False)])
def test_a_crowd_one_stage_short_of_a_spare_worker_loads_the_only_stage_it_can_run(
        stages: tuple[str, ...], in_step: bool) -> None:
    # Three cold workers; the first stage is the cheap one, so it never lags
    # the crowd.  With as many stages as workers the idle ones load it too
    # (they could only wait for its outputs); one stage more, they wait.
    crowd = [WorkerInfo(f"w{i}", 100) for i in range(3)]
    flops = {p: (5e9 if p == "p0" else 2e10) for p in stages}
    s = Scheduler(chain_of(8, stages), MEM, crowd, flops=flops)
    loads = [a.worker for a in s.start() if isinstance(a, Load)]
    assert len(loads) == (3 if in_step else 1)


@pytest.mark.parametrize("weights, replicas", [(200_000_000, True), (400_000_000, False)])
def test_a_replica_that_swaps_out_a_stage_s_only_holder_pays_for_loading_it_again(
        weights: int, replicas: bool) -> None:
    # A warm pipeline crowd (each worker holds its stage, as after a run):
    # p0's 8 tasks of 1 s are all it can run.  Loading p0 from local storage
    # (2 s or 4 s) would run a task before w0 gets through them, but w1 and
    # w2 are the only holders of p1 and p2, which must then be loaded again:
    # 2 + 1 + 2 s pays against the 8 s drain, 4 + 1 + 4 s does not (and
    # without counting the second load, 4 + 1 s would).
    stages = ("p0", "p1", "p2")
    crowd = [WorkerInfo(f"w{i}", 100, resident=p, cached=frozenset(stages), disk_bandwidth=200e6)
             for i, p in enumerate(stages)]
    s = Scheduler(chain_of(8, stages), MEM, crowd, weight_bytes=dict.fromkeys(stages, weights),
                  flops={"p0": 5e9, "p1": 5e8, "p2": 5e8})
    loads = [a for a in s.start() if isinstance(a, Load)]
    assert bool(loads) == replicas and all(a.partition == "p0" for a in loads), loads


def test_policy_is_checked() -> None:
    with pytest.raises(PlanningError, match="policy must be one of 'cost', 'pipeline', 'greedy'"):
        Scheduler(chain_of(1), MEM, [WorkerInfo("a", 100)], policy="fastest")  # type: ignore[arg-type]


def test_results_lost_that_only_a_lost_worker_could_recompute_is_a_worker_lost_error() -> None:
    # big finishes on large; large is lost; then big's result is lost too.
    g = graph([("big", 0), ("p0", 0)], [(("big", 0), ("p0", 0))])
    s = Scheduler(g, MEM, [WorkerInfo("large", 60), WorkerInfo("small", 20)])
    s.start()
    s.handle(TaskFinished("large", ("big", 0)))
    s.handle(WorkerLost("large"))
    with pytest.raises(WorkerLostError, match="'big'"):
        s.handle(ResultsLost((("big", 0),)))


def test_load_finished_for_another_partition_confirms_nothing() -> None:
    g = graph([("p0", 0), ("p1", 0)], [(("p0", 0), ("p1", 0))])
    s = Scheduler(g, MEM, [WorkerInfo("a", 100)])
    s.start()
    s.handle(TaskFinished("a", ("p0", 0)))  # Unload p0, Load p1: two Loads unconfirmed
    s.handle(LoadFinished("a", "p1"))  # out of order: the first Load was p0
    assert s.loaded == {"a": None}
    s.handle(LoadFinished("a", "p0"))
    assert s.loaded == {"a": None}  # p1 still unconfirmed
    s.handle(LoadFinished("a", "p1"))
    assert s.loaded == {"a": "p1"}


def test_joined_again_while_live_is_ignored_and_a_returning_worker_keeps_its_rank() -> None:
    s = Scheduler(chain_of(3), MEM, [WorkerInfo("a", 100), WorkerInfo("b", 100)], seed=3)
    s.start()
    queues, ranks = dict(s.queues), dict(s.tie_break)
    assert s.handle(WorkerJoined(WorkerInfo("a", 100, speed=9.0))) == []
    assert dict(s.queues) == queues and s.workers["a"].speed == 1.0
    s.handle(WorkerLost("b"))
    s.handle(WorkerJoined(WorkerInfo("b", 100)))
    assert dict(s.tie_break) == ranks  # ranks follow ids, not join order


def test_an_overdue_task_gets_a_backup_and_the_first_result_wins() -> None:
    s = Scheduler(chain_of(1), MEM, [WorkerInfo("a", 100), WorkerInfo("b", 100)], seed=1)
    (run,) = runs(s.start())
    slow, other = run.worker, ({"a", "b"} - {run.worker}).pop()
    assert s.handle(TaskOverdue(other, ("p0", 0))) == []  # not running there
    assert s.handle(TaskOverdue(slow, ("p0", 0))) == [Load(other, "p0"), Run(other, ("p0", 0), 3)]
    assert s.handle(TaskOverdue(slow, ("p0", 0))) == []  # one backup at a time
    assert s.copies == {("p0", 0): other}
    s.handle(TaskFinished(other, ("p0", 0)))
    assert s.done and s.produced_on[("p0", 0)] == other
    assert s.queue(slow) == (("p0", 0),)  # still running its copy
    s.handle(TaskFinished(slow, ("p0", 0)))  # dropped
    assert s.produced_on[("p0", 0)] == other and s.queues == {"a": (), "b": ()}


@pytest.mark.parametrize("lost", ["straggler", "backup"])
def test_losing_either_copy_leaves_the_other_running(lost: str) -> None:
    s = Scheduler(chain_of(2), MEM, [WorkerInfo("a", 100, speed=2.0), WorkerInfo("b", 100)],
                  policy="pipeline")
    s.start()  # a runs (p0, 0) and has (p0, 1) queued
    s.handle(TaskOverdue("a", ("p0", 0)))
    gone, stays = ("a", "b") if lost == "straggler" else ("b", "a")
    after = s.handle(WorkerLost(gone))
    assert ("p0", 0) in s.queue(stays) and not s.copies
    assert all(r.key != ("p0", 0) for r in runs(after))  # not placed a third time
    s.handle(TaskFinished(stays, ("p0", 0)))
    assert ("p0", 0) in s.finished


# -- weights ahead of need ------------------------------------------------------


def stored_then_loaded(actions: list[Action]) -> tuple[int, list[int]]:
    """How many Stores ``actions`` hold, and the tier of each Run whose Load
    read a partition stored ahead on that worker."""
    stored: set[tuple[str, str]] = set()
    tiers, loaded = [], None
    for a in actions:
        if isinstance(a, Store):
            stored.add((a.worker, a.partition))
        elif isinstance(a, Load):
            loaded = (a.worker, a.partition)
        elif isinstance(a, Run) and loaded == (a.worker, a.key[0]):
            if loaded in stored:
                tiers.append(a.tier)
            loaded = None
    return len(stored), tiers


@pytest.mark.parametrize("policy", ["cost", "pipeline", "greedy"])
def test_each_storing_worker_is_sent_the_partition_it_will_load_next(policy: str) -> None:
    # Five partitions in a chain, two workers: each worker loads several in turn.
    parts = [f"p{k}" for k in range(5)]
    need = {p: 60 for p in parts}
    costs: dict[str, Any] = {"policy": policy, "weight_bytes": {p: 10**7 for p in parts},
                             "flops": {p: 5e9 for p in parts}}
    crowd = [WorkerInfo("w0", 100, stores=True), WorkerInfo("w1", 100, stores=True)]
    s = Scheduler(chain_of(4, parts), need, crowd, **costs)
    first = s.start()
    stores = [a for a in first if isinstance(a, Store)]
    assert stores, first
    if policy != "greedy":  # (greedy starts a replica of p0 on w1)
        # Idle w1 will load p1 when it is ready, busy w0 p2 when p0 runs out: both get them now.
        assert first[0] == Load("w0", "p0") and stores == [Store("w1", "p1"), Store("w0", "p2")]
    n_stored, tiers = stored_then_loaded(drain(s, first, 1.0))
    # (greedy also swaps a worker to what it stored while its own partition has work left: tier 4)
    assert n_stored >= 2 and 2 in tiers and set(tiers) <= ({2, 4} if policy == "greedy" else {2}), (n_stored, tiers)
    # Without storage the same run sends nothing ahead and never reads from disk.
    plain = Scheduler(chain_of(4, parts), need, [WorkerInfo("w0", 100), WorkerInfo("w1", 100)], **costs)
    log = drain(plain, plain.start(), 1.0)
    assert not any(isinstance(a, Store) for a in log) and 2 not in {a.tier for a in runs(log)}
