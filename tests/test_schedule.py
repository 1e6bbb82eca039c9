"""Tests of the scheduler: placement tiers, losses, late messages, and
property tests that drive it with a simulated executor in random orders."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crowdgraph.errors import PlanningError, WorkerLostError
from crowdgraph.schedule import (
    Action,
    Event,
    Load,
    LoadFinished,
    ResultsLost,
    Run,
    Scheduler,
    TaskFinished,
    TaskKey,
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
    s = Scheduler(g, MEM, [WorkerInfo("a", 100, speed=2.0), WorkerInfo("b", 100)])
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
    s = Scheduler(graph(tasks, edges, prio), MEM, crowd)
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
        s = Scheduler(graph([("p0", i) for i in range(3)]), MEM, crowd, seed=seed)
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
    s = Scheduler(graph(tasks, edges), MEM, [WorkerInfo(f"w{i}", 100) for i in range(10)])
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
s = Scheduler(g, dict.fromkeys(parts, 50), crowd, seed=11)
todo = s.start()
log = list(todo)
while todo:
    a = todo.pop(0)
    if isinstance(a, Run):
        new = s.handle(TaskFinished(a.worker, a.key))
        if len(s.finished) == 8 and a.worker in s.workers:
            new += s.handle(WorkerLost(a.worker))
        log += new
        todo += new
print(s.done, s.lost, len(log), repr(log))
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
    assert len(outputs) == 1 and next(iter(outputs)).startswith("True")


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


@st.composite
def problems(draw: st.DrawFn) -> tuple[nx.DiGraph, dict[str, int], list[WorkerInfo], int]:
    n_parts = draw(st.integers(1, 8))
    n_mb = draw(st.integers(1, 6))
    parts = [f"p{k}" for k in range(n_parts)]
    need = {p: draw(st.integers(1, 100)) for p in parts}
    style = draw(st.sampled_from(["default", "microbatch", "random"]))
    g = nx.DiGraph()
    for k, p in enumerate(parts):
        for i in range(n_mb):
            attrs: dict[str, Any] = {"partition": p}
            if style == "microbatch":
                attrs["priority"] = (i, k)
            elif style == "random":
                attrs["priority"] = (draw(st.integers(0, 5)),)
            g.add_node((p, i), **attrs)
    for j in range(1, n_parts):
        for q in range(j):
            if draw(st.integers(0, 2)) == 0:
                barrier = draw(st.booleans()) and draw(st.booleans())
                for i in range(n_mb):
                    if barrier:
                        g.add_edges_from(((parts[q], m), (parts[j], i)) for m in range(n_mb))
                    else:
                        g.add_edge((parts[q], i), (parts[j], i))
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
        ))
    largest = max(need.values())
    if max(w.memory for w in crowd) < largest:
        k = draw(st.integers(0, n_workers - 1))
        crowd[k] = replace(crowd[k], memory=largest)
    seed = draw(st.integers(0, 2**16))
    return g, need, crowd, seed


def check_batch(
    s: Scheduler,
    g: nx.DiGraph,
    need: dict[str, int],
    actions: list[Action],
) -> None:
    """Check a batch of actions against the rules, from the state it left."""
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
        assert all(u in finished for u in g.predecessors(key)), "ran before its inputs"
        tier, allowed = best_choice(state, key, need, list(g.predecessors(key)), produced_on, rank)
        unplaced.discard(key)
        if tier > 1:
            # No other ready task had a better tier, or the same one and a
            # better priority.
            for other in unplaced:
                assert (best_tier(other), prio(other)) > (tier, prio(key)), (a, other)
        assert a.tier == tier, f"{a} but best tier is {tier}"
        assert wid in allowed, f"{a} but the rules pick one of {sorted(allowed)}"
        w = state[wid]
        old = w["resident"]
        if tier == 1:
            assert pending == []
        else:
            expect: list[Action] = [Unload(wid, old)] if old is not None else []
            assert pending == expect + [Load(wid, p)]
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

    # Nothing is left that could have been placed.
    for key in s.ready:
        p = key[0]
        assert all(x["resident"] != p for x in state.values()), f"{key} left with a holder"
        assert not any(
            x["queue"] == 0 and x["info"].memory >= need[p] for x in state.values()
        ), f"{key} left while an idle worker fits"


def check_state(s: Scheduler, g: nx.DiGraph, need: dict[str, int]) -> None:
    """Every task is in exactly one state and the states agree with the graph."""
    finished = set(s.finished)
    ready = set(s.ready)
    where: dict[TaskKey, str] = {}
    for wid, q in s.queues.items():
        for key in q:
            assert key not in where, f"{key} queued twice"
            where[key] = wid
    for key in g.nodes:
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
    # A consequence of the tiers: a partition gets a new holder only when
    # it has none, so no two workers hold the same partition (unless they
    # started with it).
    if not any(w.resident for w in s.workers.values()):
        held = [p for p in s.resident.values() if p is not None]
        assert len(held) == len(set(held))
    assert set(s.produced_on) == finished
    assert s.done == (len(finished) == g.number_of_nodes())


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
            else:
                assert isinstance(a, Run)
                return TaskFinished(wid, a.key)
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), data=st.data())
def test_random_runs_follow_the_rules(
    problem: tuple[nx.DiGraph, dict[str, int], list[WorkerInfo], int], data: st.DataObject
) -> None:
    g, need, crowd, seed = problem
    s = Scheduler(g, need, crowd, seed=seed)
    sim = SimExecutor()
    sim.held = {w.id: w.resident for w in crowd}
    events: list[Event] = []
    batches: list[list[Action]] = []

    def feed(event: Event | None) -> None:
        before = set(s.finished)
        queued_here = (
            isinstance(event, TaskFinished) and event.key in s.queue(event.worker)
        )
        actions = s.start() if event is None else s.handle(event)
        if event is not None:
            events.append(event)
        batches.append(actions)
        after = set(s.finished)
        if isinstance(event, TaskFinished):
            assert after - before == ({event.key} if queued_here else set())
            assert before <= after
        elif isinstance(event, ResultsLost):
            assert after == before - set(event.keys)
        else:
            assert after == before
        check_batch(s, g, need, actions)
        check_state(s, g, need)
        for wid, p in s.loaded.items():
            if p is not None:  # every Load to it is confirmed, so it holds p now
                assert sim.held.get(wid) == p == s.resident[wid]
        sim.add(actions)

    feed(None)
    losses = joins = dups = result_losses = 0
    finished_log: list[TaskFinished] = []
    for _ in range(3000):
        if s.done:
            break
        options: list[tuple[str, str]] = [("step", w) for w in sim.busy()]
        assert options, "stalled: nothing running and work left"
        live = dict(s.workers)
        if losses < 3:
            for wid in sorted(live):
                others = [w for w in live.values() if w.id != wid]
                if others and all(any(w.memory >= n for w in others) for n in need.values()):
                    options.append(("lose", wid))
        if joins < 3:
            options.append(("join", ""))
        if dups < 4 and finished_log:
            options.append(("dup", ""))
        if result_losses < 2 and s.finished:
            options.append(("results", ""))
        # Mostly let workers work; now and then lose, join or repeat something.
        disturb = len(options) > len(sim.busy()) and data.draw(st.integers(0, 5)) == 5
        if not disturb:
            options = options[: len(sim.busy())]
        kind, wid = data.draw(st.sampled_from(options))
        if kind == "step":
            event = sim.step(wid)
            if event is not None:
                if isinstance(event, TaskFinished):
                    finished_log.append(event)
                feed(event)
        elif kind == "lose":
            losses += 1
            made_there = sorted(k for k, w in s.produced_on.items() if w == wid)
            sim.lose(wid)
            feed(WorkerLost(wid))
            if made_there and data.draw(st.booleans()):
                result_losses += 1
                feed(ResultsLost(tuple(made_there)))
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
        elif kind == "dup":
            dups += 1
            feed(data.draw(st.sampled_from(finished_log)))
        else:
            result_losses += 1
            keys = data.draw(st.lists(st.sampled_from(sorted(s.finished)), min_size=1, max_size=4))
            feed(ResultsLost(tuple(keys)))
    assert s.done, "the run did not finish"

    # Determinism: the same events on a new scheduler give the same actions.
    again = Scheduler(g, need, crowd, seed=seed)
    replay = [again.start()] + [again.handle(e) for e in events]
    assert replay == batches


@settings(max_examples=300, deadline=None)
@given(problem=problems(), shrink=st.integers(0, 100))
def test_planning_error_exactly_when_a_partition_fits_no_worker(
    problem: tuple[nx.DiGraph, dict[str, int], list[WorkerInfo], int], shrink: int
) -> None:
    g, need, crowd, seed = problem
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
