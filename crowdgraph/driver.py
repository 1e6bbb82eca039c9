"""The driver loop: scheduler decisions in, executor notices back, on one thread.

This is the glue of stage 5 (dask.local's queue pattern).  The driver

1. splits the batch into micro-batches and builds the task graph;
2. starts the executor, which names its workers, and builds the pure
   :class:`~crowdgraph.schedule.Scheduler` (a crowd that cannot hold some
   partition fails here, before anything runs);
3. hands each scheduler action to the executor, with the input values of
   a task taken from the micro-batch or from earlier task outputs;
4. waits for the executor's notices and feeds them to the scheduler,
   recording everything in a :class:`~crowdgraph.report.RunReport`;
   a task running :data:`BACKUP_AFTER` times longer than its estimate
   gets a backup copy on an idle worker (the first result wins), and a
   run with no notice for ``stall_timeout`` seconds ends with an error
   naming the tasks and workers it waits for;
   with ``audit=``, a seeded share of results is run again on another
   worker and compared; a worker outvoted on a disagreement is
   quarantined and what its unchecked results reached is computed again
   (:mod:`crowdgraph.audit`, docs/audit.md);
5. forgets intermediate values once every task that reads them finished,
   and joins the model outputs of all micro-batches at the end.

Only this loop touches the scheduler, so the scheduler needs no locks.
"""

from __future__ import annotations

import math
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .audit import (
    AuditSummary, Disagreement, Reputation, audit_rate, chosen_for_audit, results_agree, tainted, vote,
)
from .errors import CrowdgraphError, ExecutionError, InputError
from . import executor as notices
from .executor import Executor, Failed, Finished, Job, Joined, Loaded, LoadFailed, Lost, Notice, Reporter, Unloaded
from .private import home_crowd, home_memory
from .report import BackupRecord, LoadRecord, RunReport, TaskRecord
from .runtime import open_session, run_session
from .state import StateBook
from .schedule import (
    Action, Load, LoadFinished, Policy, ResultsLost, Run, Scheduler, TaskFinished, TaskKey,
    Store, TaskOverdue, Unload, WorkerJoined, WorkerLost,
)
from .taskgraph import Mode, build_task_graph, data_consumers, data_producers

#: How long the driver waits for a notice before checking the clock again.
POLL_SECONDS = 0.05
#: A task is overdue, and gets a backup copy on an idle worker, once it has
#: run this many times its estimate ...
BACKUP_AFTER = 4.0
#: ... and at least this many seconds (short tasks jitter by more than 4x).
BACKUP_MIN_SECONDS = 1.0
#: With no notice from the executor for this long, the run ends with an
#: error naming the stuck tasks and workers (``stall_timeout=``).
STALL_SECONDS = 600.0


class Driver:
    """One run of a compiled model on an executor (see the module docstring)."""

    def __init__(self, compiled: Any, microbatches: Sequence[Mapping[str, np.ndarray]], executor: Executor,
                 *, mode: Mode = "streaming", seed: int = 0, progress: bool = False,
                 timeout: float | None = None, policy: Policy = "cost",
                 stall_timeout: float = STALL_SECONDS, backups: bool = True, audit: float = 0.0,
                 private: frozenset[str] = frozenset(), canaries: Sequence[Mapping[str, np.ndarray]] = (),
                 state: StateBook | None = None):
        self.compiled = compiled
        #: Micro-batches of the batch, then the canaries (their outputs are known; see _canary_finished).
        self.microbatches = [*microbatches, *canaries]
        self.real = len(microbatches)
        self.executor = executor
        self.tasks = build_task_graph(compiled.graph, len(self.microbatches), mode)
        self.partitions = {p.name: p for p in compiled.partitions}
        self.producer = {t: p.name for p in compiled.partitions for t in p.outputs}
        #: Partition state kept across runs (a decoder's cache), see crowdgraph.state.
        self.state = state
        #: (worker, task) -> whether it was asked to keep the state, and its other inputs (to record once it finished)
        self.keeps: dict[tuple[str, TaskKey], tuple[bool, dict[str, Any]]] = {}
        self.output_partition = {name: self.producer[name] for name in compiled.output_names
                                 if state is None or name not in state.outputs}
        self.keep = set(self.output_partition.values())
        self.reporter = Reporter()
        self.report = RunReport(executor=getattr(executor, "name", type(executor).__name__), mode=mode,
                                microbatches=len(microbatches), partitions=len(compiled.partitions))
        self.values: dict[TaskKey, Mapping[str, Any]] = {}
        self.waiting: dict[TaskKey, set[TaskKey]] = {
            k: set(data_consumers(self.tasks, k)) for k in self.tasks
        }
        self.issued: dict[TaskKey, tuple[str, int]] = {}
        self.seed = seed
        self.policy = policy
        self.progress = progress
        self.timeout = timeout
        self.stall_timeout = stall_timeout
        self.backups = backups
        #: Per worker: the task at the head of its queue and when it was first seen there, loaded.
        self.heads: dict[str, tuple[TaskKey, float]] = {}
        self.backup_records: dict[TaskKey, BackupRecord] = {}
        self.scheduler: Scheduler | None = None
        self.audit = _check_audit_rate(audit)
        self.private = private  # partitions only the home worker may run (crowdgraph.private)
        self.checks: dict[TaskKey, Check] = {}  # open spot checks
        self.verified: set[TaskKey] = set()  # results a second worker confirmed
        self.stale: Counter[tuple[str, TaskKey]] = Counter()  # runs whose result is no longer wanted
        if self.audit or canaries:
            self.report.audit = AuditSummary(self.audit)
        self.known = _known_results(compiled, canaries, self.real)  # canary task -> its right outputs

    # -- the loop --------------------------------------------------------

    def run(self) -> tuple[list[dict[str, Any]] | None, RunReport]:
        """Carry the run out; return per-micro-batch outputs (None when simulated) and the report."""
        workers = list(self.executor.start(Job(self.partitions, self.compiled.memory_budget), self.reporter))
        for w in workers:
            self.report.add_worker(w.id, w.memory, w.speed, w.floor)
        if self.state is not None:
            self.state.crowd([w.id for w in workers])
        rows = _rows_scale(self.compiled, self.microbatches)
        need = {p: part.resident_bytes for p, part in self.partitions.items()}
        if self.private:
            need, workers = home_memory(need, self.private), home_crowd(workers)
        measured = _measured_on(self.executor)
        self.scheduler = Scheduler(self.tasks, need, workers, seed=self.seed, policy=self.policy,
                                   weight_bytes={p: part.weight_bytes for p, part in self.partitions.items()},
                                   flops={p: part.flops * rows for p, part in self.partitions.items()},
                                   star_bandwidth=getattr(self.executor, "star_bandwidth", math.inf),
                                   tensor_bytes={p: (part.input_bytes + part.output_bytes) * rows
                                                 for p, part in self.partitions.items()},
                                   pins=self.state.pins() if self.state else None,
                                   estimates={p: measured[part.sha256] * rows for p, part in self.partitions.items()
                                              if part.sha256 in measured})
        self.report.start = self.executor.now()
        bar = _progress_bar(len(self.tasks)) if self.progress else None
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        last_notice = watched = time.monotonic()
        try:
            self._issue(self.scheduler.start(now=self.executor.now()))
            while not self.scheduler.done or self.checks:
                if not self.reporter.pending():
                    self.executor.idle()
                notice = self.reporter.next(POLL_SECONDS)
                now = time.monotonic()
                if self.backups and now - watched >= POLL_SECONDS:
                    watched = now
                    self._watch_heads()
                if notice is None:
                    if deadline is not None and now > deadline:
                        raise ExecutionError(
                            f"the run did not finish within {self.timeout} s "
                            f"({len(self.scheduler.finished)} of {len(self.tasks)} tasks done); "
                            "check that the workers are alive or raise timeout="
                        )
                    if now - last_notice > self.stall_timeout:
                        raise ExecutionError(self._stalled(now - last_notice))
                    continue
                last_notice = now
                done_before = len(self.scheduler.finished)
                actions = self._apply(notice)
                if self.checks:
                    actions += self._place_checks()
                self._issue(actions)
                if bar is not None:
                    bar.update(len(self.scheduler.finished) - done_before)
        except BaseException:
            self.executor.reset()
            raise
        finally:
            if bar is not None:
                bar.close()
            for p, seconds in self.scheduler.measured_estimates.items():
                measured[self.partitions[p].sha256] = seconds / rows
        self.report.end = self.executor.now()
        self.report.backups.extend(self.backup_records.values())
        if self.report.audit is not None:
            for b in self.backup_records.values():
                self._reputation(b.straggler).stragglers += 1
        return self._outputs(), self.report

    def _watch_heads(self) -> None:
        """Note when each worker started its current task; back up those overdue.

        A task counts as started when it is first seen at the head of its
        worker's queue with the worker's loads confirmed, so a slow load is
        not taken for a slow task.
        """
        sched = self.scheduler
        assert sched is not None
        now = self.executor.now()
        loaded, copies = sched.loaded, sched.copies
        for wid, queue in sched.queues.items():
            if not queue or loaded[wid] is None:
                self.heads.pop(wid, None)
                continue
            key = queue[0]
            seen = self.heads.get(wid)
            if seen is None or seen[0] != key:
                self.heads[wid] = (key, now)
                continue
            if key in copies or key in self.backup_records or key in sched.finished:
                continue
            if self.state is not None and self.state.kept_on(*key):
                continue  # a copy elsewhere would first rebuild the state it reads
            expected = sched.estimate(key[0]) / sched.workers[wid].speed
            if now - seen[1] > max(BACKUP_AFTER * expected, BACKUP_MIN_SECONDS):
                actions = self._handle(TaskOverdue(wid, key))
                if actions:
                    backup = copies[key]
                    self.backup_records[key] = BackupRecord(key[0], key[1], wid, backup, now - seen[1])
                    self._issue(actions)

    def _stalled(self, seconds: float) -> str:
        """The error of a run that made no progress for ``seconds``."""
        sched = self.scheduler
        assert sched is not None
        running = [f"{q[0]} on {wid}" for wid, q in sched.queues.items() if q]
        stuck = "; ".join(running[:10]) + (f" and {len(running) - 10} more" if len(running) > 10 else "")
        return (
            f"no progress for {seconds:.0f} s ({len(sched.finished)} of {len(self.tasks)} tasks done): "
            f"waiting for {stuck or 'nothing running'}; {len(sched.ready)} tasks ready with no worker "
            "free. Check that those workers are alive and fast enough, or raise stall_timeout="
        )

    def _handle(self, event: Event) -> list[Action]:
        """Hand ``event`` to the scheduler with the executor's clock, by which
        it counts how long each worker's running task has run."""
        assert self.scheduler is not None
        return self.scheduler.handle(event, now=self.executor.now())

    def _apply(self, notice: Notice) -> list[Action]:
        """Record a notice and turn it into scheduler actions."""
        sched = self.scheduler
        assert sched is not None
        match notice:
            case Finished(worker, key, outputs, stats):
                if self.audit and ((worker, key) in self.stale or (worker, key) in sched.audit_runs):
                    return self._check_finished(worker, key, outputs)
                was_done = key in sched.finished
                backup = self.backup_records.get(key)
                if backup is not None:  # the first copy to finish wins, the other is dropped
                    if was_done:
                        backup.dropped = worker
                    else:
                        backup.winner = worker
                actions = self._handle(TaskFinished(worker, key, stats.duration))
                if was_done or key not in sched.finished:
                    self.executor.forget(list(outputs.values()))  # late duplicate
                    return actions
                if self.audit:  # before _finished, which may forget the inputs a check needs
                    self._consider_check(key, worker, outputs)
                self._finished(notice)
                if key in self.known:
                    return self._canary_finished(key, worker, actions)
                return actions
            case Loaded(worker, partition):
                self.report.record_load(LoadRecord(worker, partition, notice.start, notice.end, notice.bytes_sent,
                                                   notice.from_cache, notice.fast), notice.rss)
                return self._handle(LoadFinished(worker, partition))
            case Unloaded(worker):
                self.report.record_unload(worker, notice.rss)
                return []
            case Lost(worker, reason):
                if worker not in sched.workers or worker in sched.lost:
                    return []
                self.report.replaced.extend(sched.queue(worker))
                if self.state is not None:
                    self.state.lost(worker)
                if worker in self.report.workers:
                    self.report.workers[worker].lost = reason or "lost"
                if self.report.audit is not None:
                    self._reputation(worker).failures += 1
                return self._handle(WorkerLost(worker))
            case Joined(info):
                self.report.add_worker(info.id, info.memory, info.speed, info.floor)
                return self._handle(WorkerJoined(info))
            case notices.ResultsLost(keys):
                return self._handle(ResultsLost(self._lost_closure(keys)))
            case Failed(worker, (p, i), error):
                raise ExecutionError(f"partition {p} failed on micro-batch {i} on worker {worker}: {error}")
            case LoadFailed(worker, partition, error):
                raise ExecutionError(f"loading partition {partition} on worker {worker} failed: {error}")
        raise CrowdgraphError(f"the executor reported {notice!r}, which is not a notice; "
                              "report through the Reporter's methods")

    def _finished(self, notice: Finished) -> None:
        key, worker, s = notice.key, notice.worker, notice.stats
        tier = self.issued.get(key, (worker, 0))[1]
        self.report.record_task(TaskRecord(key[0], key[1], worker, tier, s.start, s.end, s.bytes_in, s.bytes_out,
                                           s.wire_in, s.wire_out), s.peak_rss, s.rss)
        outputs = notice.outputs
        if self.state is not None and key[0] in self.state.pairs:
            kept, inputs = self.keeps.pop((worker, key))
            seq = self.state.keys[key[1]]
            self.state.record(key[0], seq, self.executor.gather(inputs))  # arrays: handles go with this run
            if not kept:  # the state lives here until the next step: arrays, not an executor's handles
                outputs = {**outputs, **self.executor.gather({o: outputs[o] for o, _ in self.state.pairs[key[0]]})}
            outputs = self.state.finished(key[0], seq, worker, outputs, kept)
        self.values[key] = outputs
        self.waiting[key] = {c for c in data_consumers(self.tasks, key) if c not in self.scheduler.finished}  # type: ignore[union-attr]
        for u in data_producers(self.tasks, key):
            self.waiting[u].discard(key)
            self._release(u)

    def _release(self, key: TaskKey) -> None:
        """Forget ``key``'s outputs once no task, model output or open check needs them."""
        if (not self.waiting[key] and key[0] not in self.keep and key in self.values
                and not any(key == c.key or key in c.inputs for c in self.checks.values())):
            self.executor.forget(list(self.values.pop(key).values()))

    # -- spot checks (see crowdgraph.audit) ----------------------------------

    def _reputation(self, worker: str) -> Reputation:
        assert self.report.audit is not None
        return self.report.audit.reputations.setdefault(worker, Reputation())

    def _consider_check(self, key: TaskKey, worker: str, outputs: Mapping[str, Any]) -> None:
        """Open a check of ``key``'s result when the seeded coin for its worker says so."""
        rate = audit_rate(self.audit, self._reputation(worker))
        if (key not in self.checks and key not in self.known and key[0] not in self.private
                and chosen_for_audit(self.seed, key, worker, rate)):
            self.checks[key] = Check(key, tuple(data_producers(self.tasks, key)), [(worker, outputs)])

    def _place_checks(self) -> list[Action]:
        """Place every check waiting for a worker on an idle one that has not run it yet."""
        sched = self.scheduler
        assert sched is not None
        actions: list[Action] = []
        for check in self.checks.values():
            if check.running is None:
                placed = sched.place_audit(check.key, check.workers())
                runs = [a for a in placed if isinstance(a, Run)]
                if runs:
                    check.running = runs[0].worker
                    actions += placed
                elif not any(w.id not in check.workers() and w.memory >= self.partitions[check.key[0]].resident_bytes
                             for w in sched.workers.values()):  # nobody left who could ever run it
                    raise ExecutionError(self._undecidable(check))
        return actions

    def _undecidable(self, check: "Check") -> str:
        p, i = check.key
        if len(check.runs) == 1:
            return (f"audit: no other worker can hold partition {p} to check the result of micro-batch {i} "
                    f"from {check.runs[0][0]}; add a worker with a budget of "
                    f"{self.partitions[p].resident_bytes} bytes or more, or run with audit=0")
        return (f"audit: the results of partition {p} on micro-batch {i} disagree between "
                f"{', '.join(w for w, _ in check.runs)} and no other worker is left to decide; "
                "add a worker and run again")

    def _check_finished(self, worker: str, key: TaskKey, outputs: Mapping[str, Any]) -> list[Action]:
        """A result that is a check of ``key`` (compare it), or no longer wanted (drop it)."""
        sched = self.scheduler
        assert sched is not None
        if self.stale[(worker, key)]:
            self.stale[(worker, key)] -= 1
            if not self.stale[(worker, key)]:
                del self.stale[(worker, key)]
            self.executor.forget(list(outputs.values()))
            return []
        actions = self._handle(TaskFinished(worker, key))
        check = self.checks[key]
        check.running = None
        check.runs.append((worker, outputs))
        verdict = vote([(w, self.executor.gather(values)) for w, values in check.runs])
        summary = self.report.audit
        assert summary is not None
        if len(check.runs) == 2:
            summary.checks += 1
        if verdict is None:  # no two agree yet: suspect them all and ask another worker
            if check.disagreement is None:
                check.disagreement = Disagreement(key[0], key[1], ())
                summary.disagreements.append(check.disagreement)
            for w, _ in check.runs:
                if w not in check.suspects:
                    check.suspects.add(w)
                    self._reputation(w).disagreements += 1
            return actions
        del self.checks[key]
        for w, values in check.runs[1:]:
            self.executor.forget(list(values.values()))
        for w in verdict.agreed:
            record = self._reputation(w)
            record.passed += 1
            if w in check.suspects:
                record.disagreements -= 1
        if check.disagreement is not None:
            check.disagreement.workers, check.disagreement.odd = tuple(check.workers()), verdict.odd
        if check.runs[0][0] in verdict.agreed:
            self.verified.add(key)
        for u in (key, *check.inputs):
            self._release(u)
        for w in verdict.odd:
            actions = self._quarantine(w, f"its result of partition {key[0]} on micro-batch {key[1]} "
                                          f"disagreed with {', '.join(verdict.agreed)}", actions)
        return actions

    def _canary_finished(self, key: TaskKey, worker: str, pending: list[Action]) -> list[Action]:
        """Compare a canary task's result with the one the driver computed; quarantine a liar."""
        summary = self.report.audit
        assert summary is not None
        summary.canaries += 1
        if results_agree(self.executor.gather(self.values[key]), self.known[key]):
            self._reputation(worker).passed += 1
            self.verified.add(key)
            return pending
        self._reputation(worker).disagreements += 1
        return self._quarantine(worker, f"its result of partition {key[0]} on a canary (inputs whose outputs the "
                                        "driver computed itself) was wrong", pending)

    def _quarantine(self, worker: str, reason: str, pending: list[Action]) -> list[Action]:
        """No more tasks for ``worker``; compute again what its unchecked results reached.

        Returns ``pending`` (actions not yet issued) and the new ones, less
        the runs the recomputation took back.
        """
        unissued = {(a.worker, a.key) for a in pending if isinstance(a, Run)}
        sched = self.scheduler
        summary = self.report.audit
        assert sched is not None and summary is not None
        if worker in summary.quarantined:
            return pending
        summary.quarantined[worker] = reason
        self.executor.quarantine(worker, reason)
        doubtful = tainted(self.tasks, sched.produced_on, worker, self.verified)
        for key in sorted(doubtful & self.checks.keys()):  # checks of doubtful results are void
            check = self.checks.pop(key)
            self._clear_suspects(check, worker)
            if check.running is not None and check.running != worker:
                sched.cancel_audit(check.running, key)
                self.stale[(check.running, key)] += 1
        for check in self.checks.values():  # checks the quarantined worker was part of
            if check.running == worker:
                check.running = None
            if any(w == worker for w, _ in check.runs):
                self._clear_suspects(check, worker)
                check.runs = [(w, v) for w, v in check.runs if w != worker]
        before = {(w, k) for w, queue in sched.queues.items() if w != worker for k in queue} - unissued
        for key in doubtful:
            if key in self.values:
                self.executor.forget(list(self.values.pop(key).values()))
        lost = self._lost_closure(sorted(doubtful))
        summary.recomputed += len(lost)
        actions = pending + self._handle(WorkerLost(worker)) + self._handle(ResultsLost(lost))
        after = {(w, k) for w, queue in sched.queues.items() for k in queue}
        for pair in before - after:  # dequeued, still running there: its result is dropped
            self.stale[pair] += 1
        if worker in self.report.workers:
            self.report.workers[worker].lost = "quarantined"
        return [a for a in actions if not isinstance(a, Run) or (a.worker, a.key) in after]

    def _clear_suspects(self, check: Check, liar: str) -> None:
        """A check disputed with ``liar``: the dispute is decided, the others are no longer suspect."""
        if liar not in check.suspects:
            return
        assert check.disagreement is not None
        check.disagreement.workers, check.disagreement.odd = tuple(check.workers()), (liar,)
        for w in check.suspects - {liar}:
            self._reputation(w).disagreements -= 1
        check.suspects.clear()
        check.disagreement = None

    def _lost_closure(self, keys: Sequence[TaskKey]) -> tuple[TaskKey, ...]:
        """``keys`` plus any forgotten outputs that their recomputation needs."""
        lost = set(keys)
        frontier = list(keys)
        while frontier:
            k = frontier.pop()
            self.values.pop(k, None)
            for u in data_producers(self.tasks, k):
                self.waiting[u].add(k)
                if u not in self.values and u not in lost:
                    lost.add(u)
                    frontier.append(u)
        return tuple(sorted(lost))

    def _issue(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Run):
                self.issued[action.key] = (action.worker, action.tier)
                part = self.partitions[action.key[0]]
                inputs = self._inputs(action.key, part)
                if self.state is not None and part.name in self.state.pairs:
                    self._run_with_state(action.worker, action.key, part, inputs)
                else:
                    self.executor.run(action.worker, action.key, part, inputs)
            elif isinstance(action, Load):
                self.executor.load(action.worker, self.partitions[action.partition])
            elif isinstance(action, Unload):
                if self.state is not None:
                    self.state.lost(action.worker, action.partition)
                self.executor.unload(action.worker, action.partition)
            elif isinstance(action, Store):
                self.report.stored.append((action.worker, action.partition))
                self.executor.store(action.worker, self.partitions[action.partition])

    def _run_with_state(self, worker: str, key: TaskKey, part: Any, inputs: dict[str, Any]) -> None:
        """Run a task of a partition with state: the state is sent, or the worker keeps it."""
        book = self.state
        assert book is not None and self.scheduler is not None
        seq = book.keys[key[1]]
        crowd = self.scheduler.workers
        others = dict(inputs)  # recorded once the task finished: any later step may need a replay
        inputs.update(book.inputs_for(part.name, seq, worker, part))
        # A crowd smaller than the plan swaps partitions at every step, and a
        # swapped-out partition's caches would be lost: they travel then.
        keep = (crowd[worker].keeps_state and len(crowd) >= len(self.partitions)
                and book.keep(part.name, seq, worker, crowd[worker].memory, part.resident_bytes))
        self.keeps[(worker, key)] = (keep, others)
        if crowd[worker].keeps_state:
            self.executor.run(worker, key, part, inputs, state=book.task_state(part.name, seq, keep))  # type: ignore[call-arg]
        else:
            self.executor.run(worker, key, part, inputs)

    def _inputs(self, key: TaskKey, part: Any) -> dict[str, Any]:
        i = key[1]
        inputs = {}
        state_inputs = self.state.inputs.get(part.name, ()) if self.state is not None else ()
        for name in part.inputs:
            if name in state_inputs:
                continue  # sent by _run_with_state, or kept by the worker
            if name in self.producer and i >= self.real:  # a canary: its right inputs, so it tests this worker alone
                inputs[name] = self.known[(self.producer[name], i)][name]
            elif name in self.producer:
                inputs[name] = self.values[(self.producer[name], i)][name]
            else:
                inputs[name] = self.microbatches[i][name]
        return inputs

    def _outputs(self) -> list[dict[str, Any]] | None:
        result = []
        for i in range(self.real):
            handles = {name: self.values[(p, i)][name] for name, p in self.output_partition.items()}
            if any(v is None for v in handles.values()):
                return None
            result.append(self.executor.gather(handles))
            self.executor.forget(list(handles.values()))
        for key in [k for k in self.values if k[1] >= self.real]:  # canaries' outputs, checked already
            self.executor.forget(list(self.values.pop(key).values()))
        return result


@dataclass
class Check:
    """An open spot check of one task: the results so far, the worker running it now."""

    key: TaskKey
    inputs: tuple[TaskKey, ...]  #: tasks whose outputs it reads, held until it is decided
    runs: list[tuple[str, Mapping[str, Any]]] = field(default_factory=list)  #: (worker, outputs), producer first
    running: str | None = None
    suspects: set[str] = field(default_factory=set)  #: workers whose record counts this disagreement
    disagreement: Disagreement | None = None  #: its entry in the report, once two results disagreed

    def workers(self) -> list[str]:
        """Workers that ran it or run it now; the next run goes to another."""
        return [w for w, _ in self.runs] + ([self.running] if self.running else [])


def _known_results(compiled: Any, canaries: Sequence[Mapping[str, np.ndarray]],
                   first: int) -> dict[TaskKey, dict[str, np.ndarray]]:
    """Every partition's outputs on each canary, computed here one session at a time.

    Canary ``k`` is micro-batch ``first + k`` of the run.
    """
    if not canaries:
        return {}
    values = [dict(c) for c in canaries]
    known: dict[TaskKey, dict[str, np.ndarray]] = {}
    for part in compiled.partitions:  # in an order where producers come first
        session = open_session(part.model_bytes)
        for k, value in enumerate(values):
            known[(part.name, first + k)] = outputs = run_session(
                session, {name: value[name] for name in part.inputs}, part.outputs)
            value.update(outputs)
        del session
    return known


def _check_audit_rate(rate: float) -> float:
    """``audit=`` as a fraction from 0 to 1.

    >>> _check_audit_rate(0.05)
    0.05
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        raise InputError(f"audit must be a fraction of tasks from 0 to 1 (such as 0.05), not {rate!r}")
    return float(rate)


#: Per executor, seconds per compiled row of one task of each partition (by
#: sha256) on a speed-1.0 worker, as its earlier runs measured them: the
#: next run's scheduler starts from these instead of the FLOPs seed, as
#: Dask's scheduler keeps task durations from one computation to the next.
_MEASURED: weakref.WeakKeyDictionary[Executor, dict[str, float]] = weakref.WeakKeyDictionary()


def _measured_on(executor: Executor) -> dict[str, float]:
    """What earlier runs on ``executor`` measured (empty for one that cannot be a weak key)."""
    try:
        return _MEASURED.setdefault(executor, {})
    except TypeError:
        return {}


def _rows_scale(compiled: Any, microbatches: Sequence[Mapping[str, Any]]) -> float:
    """Rows of the first micro-batch over the rows the plan was compiled at.

    A partition's FLOPs are counted at the compiled shapes; the scheduler's
    first estimate of a task's cost scales them to the rows that run.
    """
    batched = compiled.batched_inputs()
    if not batched or not microbatches:
        return 1.0
    name = batched[0]
    compiled_rows = max(1, compiled.input_shapes[name][0])
    return np.shape(microbatches[0][name])[0] / compiled_rows


def _progress_bar(total: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="task", leave=False)


def bound_wire_error(compiled: Any, microbatches: Sequence[Mapping[str, np.ndarray]], executor: Executor,
                     outputs: list[dict[str, Any]] | None, report: RunReport, max_error: float,
                     **options: Any) -> tuple[list[dict[str, Any]] | None, RunReport]:
    """Measure the error a lossy wire put in a finished run's outputs; run exact above ``max_error``.

    ``outputs`` and ``report`` are what the run on ``executor`` gave; its
    ``lossy`` option (None or absent: an exact wire, error 0) is the wire
    it used.  The error is measured on the outputs, not estimated:
    micro-batch 0 runs again with the wire exact, and
    :attr:`RunReport.wire_error` is the largest absolute difference between
    its outputs and the lossy ones.  Micro-batch 0 stands for the run (all
    of it when the batch is one micro-batch); that costs one micro-batch
    more.  Above ``max_error`` the whole batch runs again exact, and the
    report says so.  ``options`` are :class:`Driver`'s.
    """
    lossy = getattr(executor, "lossy", None)
    if lossy is None:
        report.wire_error = 0.0
        return outputs, report
    assert outputs is not None
    executor.lossy = None  # type: ignore[attr-defined]
    try:
        exact, exact_report = Driver(compiled, microbatches[:1], executor, **options).run()
        assert exact is not None
        error = max_abs_difference(outputs[0], exact[0])
        measured = (f"the {lossy} wire put the outputs of micro-batch 0 within {error:.3g} of a lossless run's "
                    f"(max_error={max_error:g})")
        if error <= max_error:
            report.wire_error = error
            report.notes.append(measured)
            return outputs, report
        if len(microbatches) > 1:
            outputs, exact_report = Driver(compiled, microbatches, executor, **options).run()
    finally:
        executor.lossy = lossy  # type: ignore[attr-defined]
    exact_report.wire_error = 0.0
    exact_report.notes.append(f"{measured}: above the bound, so these outputs come from a lossless run")
    return outputs, exact_report  # type: ignore[return-value]


def max_abs_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """Largest absolute difference between same-named arrays (0.0 when all are equal).

    >>> max_abs_difference({"y": np.array([1.0, 2.0])}, {"y": np.array([1.5, 2.0])})
    0.5
    """
    worst = 0.0
    for name, value in a.items():
        x, y = np.asarray(value, np.float64), np.asarray(b[name], np.float64)
        if x.size:
            worst = max(worst, float(np.nanmax(np.abs(x - y))))
    return worst
