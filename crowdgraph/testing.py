"""A conformance suite for executor authors (needs pytest).

Subclass :class:`ExecutorConformance` in a test module of your own and
say how to make your executor; pytest then runs every check below against
it (in the spirit of dask's ``GetFunctionTestMixin``)::

    from crowdgraph.testing import ExecutorConformance

    class TestMyExecutor(ExecutorConformance):
        can_lose_workers = True

        def make_executor(self, budgets):
            return MyExecutor(workers=len(budgets), budgets=budgets)

        def kill_worker(self, executor, worker_id):
            executor.processes[worker_id].kill()

The checks: outputs equal the whole-model oracle in both modes; Load,
Unload and Run mean what the protocol says (in order per worker, one
resident partition, failures reported rather than raised); a failing task
fails the run with a clear error and leaves the executor usable; a lost
worker's tasks are placed again; a worker still holding a partition of an
earlier plan (same names, other content) starts the next plan's run with
nothing resident; six workers on a three-partition plan run replicas (some
partition on two or more workers, each worker one partition at a time
within its budget); a decoder generates the tokens of the whole-model
loop, greedy and sampled, with its cache fed back at every step, and
with each cache kept on its worker (``WorkerInfo.keeps_state``) when the
crowd has a worker for every partition, even when one of those workers
is lost mid-generation; ``close()`` leaves no thread running.
"""

from __future__ import annotations

import threading
import time
from functools import cache, cached_property
from typing import Any, Callable, Sequence

import numpy as np

from . import zoo
from .compiled import CompiledModel, compile
from .errors import ExecutionError
from .executor import Executor, Job, Notice, Reporter
from .runtime import open_session, run_session

#: Seconds any single check waits for an executor before failing.
WAIT_SECONDS = 120.0
#: Largest absolute difference allowed against the oracle (fp32).
TOLERANCE = 1e-4


class _Case:
    """The model every check runs: the tiny embedded DistilBERT in 3 partitions."""

    def __init__(self) -> None:
        self.model = zoo.distilbert("tiny")
        self.feeds = zoo.sample_inputs(self.model, batch=6, sequence=16)
        self.compiled: CompiledModel = compile(self.model, partitions=3, sample=self.feeds)
        self.budget = max(p.resident_bytes for p in self.compiled.partitions)
        session = open_session(self.model.SerializeToString())
        self.expected = run_session(session, self.feeds)

    @cached_property
    def other_plan(self) -> CompiledModel:
        """The same model cut in 2 partitions: none of them is one of :attr:`compiled`'s."""
        return compile(self.model, partitions=2, sample=self.feeds)

    def partition_inputs(self, name: str) -> dict[str, np.ndarray]:
        """Real inputs of partition ``name`` for the whole batch."""
        values = dict(self.feeds)
        for part in self.compiled.partitions:
            if part.name == name:
                return {k: values[k] for k in part.inputs}
            values.update(run_session(open_session(part.model_bytes), {k: values[k] for k in part.inputs}))
        raise KeyError(name)


class _ReplicaCase:
    """Twelve micro-batches of one 128-token row through the tiny DistilBERT in
    3 partitions: enough backlog that six workers load replicas."""

    def __init__(self) -> None:
        self.model = zoo.distilbert("tiny")
        self.feeds = zoo.sample_inputs(self.model, batch=12, sequence=128)
        self.compiled = compile(self.model, partitions=3, input_shapes={"input_ids": (1, 128)})
        self.budget = max(p.resident_bytes for p in self.compiled.partitions)
        self.expected = run_session(open_session(self.model.SerializeToString()), self.feeds)


class _GenerationCase:
    """Three prompts through the tiny embedded decoder in 3 partitions, and the
    steps of the same loop run on the whole model in one session."""

    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    new_tokens = 5
    sampling = {"do_sample": True, "temperature": 0.8, "top_k": 40, "seed": 7}

    def __init__(self) -> None:
        from .generate import Sampling, decode, left_padded

        self.model = zoo.gpt2("tiny")
        self.compiled = compile(self.model, partitions=3, max_length=16)
        self.budget = max(p.resident_bytes for p in self.compiled.partitions)
        session = open_session(self.model.SerializeToString())
        dims = {t.name: (t.dims[1], t.dims[3]) for t in self.compiled.inputs if t.name.startswith("past_key_values.")}
        ids, mask = left_padded(self.prompts)
        sampled = Sampling(True, self.sampling["temperature"], self.sampling["top_k"])
        self.expected = {
            kind: list(decode(lambda feeds: run_session(session, feeds), self.compiled.decoder_layout, dims, ids,
                              mask, max_new_tokens=self.new_tokens, **options))
            for kind, options in (("greedy", {}), ("sampled", {"sampling": sampled, "seed": self.sampling["seed"]}))
        }


# Each case is built once per process, when a test first needs it.
_case = cache(_Case)
_replica_case = cache(_ReplicaCase)
_generation_case = cache(_GenerationCase)


def assert_one_partition_at_a_time(report: Any, partitions: Sequence[Any]) -> None:
    """Every task of ``report`` ran on a worker whose latest load before it was
    the task's partition, and that partition fit the worker's budget."""
    need = {p.name: p.resident_bytes for p in partitions}
    for wid, worker in report.workers.items():
        loads = sorted((load.start, load.partition) for load in report.loads if load.worker == wid)
        for task in (t for t in report.tasks if t.worker == wid):
            before = [p for start, p in loads if start <= task.start]
            assert before and before[-1] == task.partition, (
                f"{wid} ran {task.partition} micro-batch {task.microbatch} while holding "
                f"{before[-1] if before else 'nothing'}")
            assert need[task.partition] <= worker.memory, f"{task.partition} does not fit {wid}"


def _assert_close(got: dict[str, Any], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for name, expected in want.items():
        actual = np.asarray(got[name])
        assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
        diff = float(np.max(np.abs(actual.astype(np.float64) - expected))) if expected.size else 0.0
        assert diff <= TOLERANCE, f"{name}: max abs diff {diff} > {TOLERANCE}"


def _next(reporter: Reporter, what: str) -> Notice:
    notice = reporter.next(WAIT_SECONDS)
    assert notice is not None, f"no notice within {WAIT_SECONDS} s while waiting for {what}"
    return notice


def watch_notices(executor: Executor, listener: Callable[[Notice], None]) -> None:
    """Call ``listener(notice)`` for every notice of ``executor``'s later runs.

    The listener runs on the reporting thread before the driver sees the
    notice, so a test can kill a worker right after its first task.
    """
    start = executor.start

    def start_and_listen(job: Job, reporter: Reporter) -> Sequence[Any]:
        reporter.add_listener(listener)
        return start(job, reporter)

    executor.start = start_and_listen  # type: ignore[method-assign]


class ExecutorConformance:
    """Checks every executor must pass; see the module docstring."""

    #: Set True and implement :meth:`kill_worker` to run the worker-loss check.
    can_lose_workers = False
    #: Name prefixes of threads a library keeps for the whole process once
    #: first used (not the executor's to stop): the close check ignores them.
    process_thread_prefixes: tuple[str, ...] = ()

    def make_executor(self, budgets: Sequence[int]) -> Executor:
        """A new executor whose crowd has one worker per budget (bytes)."""
        raise NotImplementedError("implement make_executor(self, budgets) in your test class")

    def kill_worker(self, executor: Executor, worker_id: str) -> None:
        """Make ``worker_id`` vanish abruptly (a killed process, a closed link)."""
        raise NotImplementedError("implement kill_worker or leave can_lose_workers False")

    def assert_stopped(self, executor: Executor) -> None:
        """Extra checks after ``close()`` (worker processes gone, ports closed)."""

    @cached_property
    def case(self) -> _Case:
        return _case()

    # -- helpers -----------------------------------------------------------

    def _started(self, budgets: Sequence[int]) -> tuple[Executor, Reporter, list[Any]]:
        executor = self.make_executor(list(budgets))
        reporter = Reporter()
        workers = list(executor.start(Job({p.name: p for p in self.case.compiled.partitions},
                                          self.case.compiled.memory_budget), reporter))
        assert len(workers) == len(budgets), f"asked for {len(budgets)} workers, got {len(workers)}"
        return executor, reporter, workers

    # -- the checks ----------------------------------------------------------

    def test_outputs_match_the_oracle_streaming(self) -> None:
        with self.make_executor([self.case.budget] * 2) as executor:
            got = self.case.compiled.run(self.case.feeds, executor=executor, microbatch=2, mode="streaming")
        _assert_close(got, self.case.expected)

    def test_outputs_match_the_oracle_barrier(self) -> None:
        with self.make_executor([self.case.budget] * 2) as executor:
            got = self.case.compiled.run(self.case.feeds, executor=executor, microbatch=4, mode="barrier")
        _assert_close(got, self.case.expected)

    def test_one_worker_runs_every_partition(self) -> None:
        with self.make_executor([self.case.budget]) as executor:
            got = self.case.compiled.run(self.case.feeds, executor=executor, microbatch=3)
            report = self.case.compiled.last_report
        _assert_close(got, self.case.expected)
        assert report.tier_counts.get(4, 0) >= len(self.case.compiled.partitions) - 1, "swaps happened"

    def test_load_run_unload_in_order(self) -> None:
        executor, reporter, workers = self._started([self.case.budget])
        try:
            w = workers[0].id
            part = self.case.compiled.partitions[0]
            inputs = self.case.partition_inputs(part.name)
            executor.load(w, part)
            executor.run(w, (part.name, 0), part, inputs)
            executor.unload(w, part.name)
            kinds = [_next(reporter, "loaded, finished, unloaded") for _ in range(3)]
            assert [n.kind for n in kinds] == ["loaded", "finished", "unloaded"], [n.kind for n in kinds]
            assert kinds[0].partition == part.name and kinds[0].worker == w
            assert kinds[1].key == (part.name, 0) and kinds[1].worker == w
            outputs = executor.gather(dict(kinds[1].outputs or {}))
            want = run_session(open_session(part.model_bytes), inputs)
            _assert_close(outputs, want)
        finally:
            executor.close()

    def test_a_worker_with_room_opens_partitions_fast(self) -> None:
        """A worker whose budget has room for a partition's fast session opens
        it fast and says so (``Loaded.fast``); the other opens it the
        memory-safe way; the outputs are the same."""
        parts = {p.name: p for p in self.case.compiled.partitions}
        room = max(p.fast_resident_bytes or 0 for p in parts.values())
        with self.make_executor([room, self.case.budget]) as executor:
            got = self.case.compiled.run(self.case.feeds, executor=executor, microbatch=2)
            report = self.case.compiled.last_report
        _assert_close(got, self.case.expected)
        for load in report.loads:
            wanted = parts[load.partition].opens_fast(report.workers[load.worker].memory)
            assert load.fast == wanted, f"{load.worker} opened {load.partition} fast={load.fast}, not {wanted}"
        assert any(load.fast for load in report.loads), "the worker with room loaded nothing"

    def test_a_worker_holds_one_partition(self) -> None:
        executor, reporter, workers = self._started([self.case.budget])
        try:
            w = workers[0].id
            first, second = self.case.compiled.partitions[:2]
            executor.load(w, first)
            executor.load(w, second)
            executor.run(w, (first.name, 0), first, self.case.partition_inputs(first.name))
            notices = [_next(reporter, "two loads and a run") for _ in range(3)]
            assert [n.kind for n in notices] == ["loaded", "loaded", "failed"], [n.kind for n in notices]
            assert notices[2].key == (first.name, 0) and notices[2].error
        finally:
            executor.close()

    def test_bad_inputs_are_reported_not_raised(self) -> None:
        executor, reporter, workers = self._started([self.case.budget])
        try:
            w = workers[0].id
            part = self.case.compiled.partitions[0]
            executor.load(w, part)
            bad = {k: np.zeros((1,) * v.ndim, dtype=np.float64) for k, v in self.case.partition_inputs(part.name).items()}
            executor.run(w, (part.name, 0), part, bad)
            notices = [_next(reporter, "loaded and failed") for _ in range(2)]
            assert [n.kind for n in notices] == ["loaded", "failed"], [n.kind for n in notices]
            assert notices[1].error
        finally:
            executor.close()

    def test_a_plan_of_other_partitions_starts_with_nothing_resident(self) -> None:
        other = self.case.other_plan
        budget = max(self.case.budget, *(p.resident_bytes for p in other.partitions))
        with self.make_executor([budget]) as executor:
            self.case.compiled.run(self.case.feeds, executor=executor, microbatch=6)
            workers = executor.start(Job({p.name: p for p in other.partitions}, other.memory_budget), Reporter())
            assert [w.resident for w in workers] == [None], "a partition of another plan is not resident"
            got = other.run(self.case.feeds, executor=executor, microbatch=6)
        _assert_close(got, self.case.expected)

    def test_failing_task_fails_the_run_then_the_executor_still_works(self) -> None:
        feeds = dict(self.case.feeds)
        feeds["input_ids"] = np.full_like(feeds["input_ids"], 10**6)  # outside the vocabulary
        with self.make_executor([self.case.budget] * 2) as executor:
            try:
                self.case.compiled.run(feeds, executor=executor, microbatch=3)
            except ExecutionError as exc:
                message = str(exc)
            else:
                raise AssertionError("a task that raises must fail the run")
            assert "partition p0" in message and "micro-batch" in message and "worker" in message
            got = self.case.compiled.run(self.case.feeds, executor=executor, microbatch=3)
        _assert_close(got, self.case.expected)

    def test_lost_worker_tasks_are_placed_again(self) -> None:
        if not self.can_lose_workers:
            import pytest

            pytest.skip("this executor does not declare can_lose_workers")
        executor = self.make_executor([self.case.budget] * 3)
        killed: list[str] = []

        def kill_first_finisher(notice: Notice) -> None:
            if notice.kind == "finished" and not killed and notice.worker:
                killed.append(notice.worker)
                threading.Thread(target=self.kill_worker, args=(executor, notice.worker)).start()

        watch_notices(executor, kill_first_finisher)
        try:
            got = self.case.compiled.run(self.case.feeds, executor=executor, microbatch=1)
            report = self.case.compiled.last_report
        finally:
            executor.close()
        _assert_close(got, self.case.expected)
        assert killed and report.workers[killed[0]].lost, "the killed worker shows as lost in the report"

    def test_replicas_share_a_busy_partition(self) -> None:
        case = _replica_case()
        with self.make_executor([case.budget] * 6) as executor:
            got = case.compiled.run(case.feeds, executor=executor, microbatch=1)
            report = case.compiled.last_report
        _assert_close(got, case.expected)
        holders = report.holders
        assert max(len(ws) for ws in holders.values()) >= 2, f"no partition got a second holder: {holders}"
        assert_one_partition_at_a_time(report, case.compiled.partitions)

    def test_generation_matches_the_whole_model_loop(self) -> None:
        case = _generation_case()
        with self.make_executor([case.budget] * 2) as executor:
            for kind, options in (("greedy", {}), ("sampled", case.sampling)):
                steps = list(case.compiled.generate(case.prompts, max_new_tokens=case.new_tokens, stream=True,
                                                    executor=executor, **options))
                want = case.expected[kind]
                assert [s.tokens.tolist() for s in steps] == [w.tokens.tolist() for w in want], kind
                for got, expected in zip(steps, want):
                    diff = float(np.nanmax(np.abs(got.logits - expected.logits)))
                    assert diff <= TOLERANCE, f"{kind} step {got.index}: logits differ by {diff}"

    def test_generation_keeps_caches_where_their_layers_run(self) -> None:
        """With a worker for every partition and room in their budgets,
        workers that ``keeps_state`` keep each sequence's cache where its
        layers ran; one of those workers lost mid-generation
        (with ``can_lose_workers``) costs a rebuild, never a token."""
        case = _generation_case()
        lose = self.can_lose_workers
        with self.make_executor([2 * case.budget] * (len(case.compiled.partitions) + 1)) as executor:
            keepers: set[str] = set()
            killed: list[str] = []

            def kill_a_keeper(notice: Notice) -> None:
                if notice.kind == "finished" and notice.worker in keepers and not killed:
                    killed.append(notice.worker)
                    threading.Thread(target=self.kill_worker, args=(executor, notice.worker)).start()

            infos = executor.start(Job({p.name: p for p in case.compiled.partitions}, case.compiled.memory_budget),
                                   Reporter())
            keeps = all(info.keeps_state for info in infos)
            if lose:
                watch_notices(executor, kill_a_keeper)
            steps = []
            for step in case.compiled.generate(case.prompts, max_new_tokens=case.new_tokens, stream=True,
                                               executor=executor):
                steps.append(step)
                report = case.compiled.last_report
                if step.index == 1 and lose and keeps:
                    keepers.update(w for w, n in report.kept.items() if n)
        want = case.expected["greedy"]
        assert [s.tokens.tolist() for s in steps] == [w.tokens.tolist() for w in want]
        if keeps:
            assert any(report.kept.values()), f"no worker kept a cache: {report.kept}"
            if lose:
                assert killed and killed[0] in report.lost_workers, "a worker keeping caches was lost"
                assert report.rebuilt, "the caches of the lost worker were rebuilt"

    def test_close_leaves_nothing_running(self) -> None:
        before = set(threading.enumerate())
        executor = self.make_executor([self.case.budget] * 2)
        self.case.compiled.run(self.case.feeds, executor=executor, microbatch=3)
        executor.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            left = [t for t in threading.enumerate() if t not in before and t.is_alive()
                    and not t.name.startswith(self.process_thread_prefixes)]
            if not left:
                break
            time.sleep(0.1)
        assert not left, f"threads still running after close(): {[t.name for t in left]}"
        self.assert_stopped(executor)
