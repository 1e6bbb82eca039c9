"""Spot checks catch a worker that returns wrong numbers of the right shape.

A crowd of four thread workers, one of which ("liar") returns every
result with its last axis reversed, as a broken NPU driver or a cheater
might.  Without ``audit=`` the run succeeds with wrong logits; with
``audit=0.5`` the liar's results are checked on other workers, it is
quarantined, what it touched is computed again, and the logits equal the
whole model's.  A last run with ``private=True`` keeps the partitions
that read the inputs and produce the logits in this process.

Run it: ``python examples/audit_liar.py``
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

import crowdgraph
from crowdgraph import ThreadExecutor, WorkerInfo, zoo
from crowdgraph.runtime import open_session, run_session


class _LyingReporter:
    """Passes every notice on, changing the results of the tasks ``lies(n)`` picks (n counts its tasks)."""

    def __init__(self, reporter: Any, lie: Callable[[np.ndarray], np.ndarray], lies: Callable[[int], bool]):
        self._reporter, self._lie, self._lies, self.told = reporter, lie, lies, 0

    def task_finished(self, worker: str, key: Any, outputs: Any, *stats: Any, **named: Any) -> None:
        self.told += 1
        if self._lies(self.told):
            outputs = {name: self._lie(value) for name, value in outputs.items()}
        self._reporter.task_finished(worker, key, outputs, *stats, **named)  # the timings as given

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reporter, name)


class LyingThreads(ThreadExecutor):
    """Thread workers of which ``liar`` changes its results (keeping shape and dtype) on the tasks ``lies`` picks."""

    def __init__(self, workers: list[WorkerInfo], liar: str, lie: Callable[[np.ndarray], np.ndarray],
                 lies: Callable[[int], bool] = lambda n: True):
        super().__init__(workers)
        self._liar, self._lie, self._lies = liar, lie, lies
        self.lying: _LyingReporter | None = None

    def start(self, job: Any, reporter: Any) -> Any:
        self.lying = _LyingReporter(reporter, self._lie, self._lies)
        return super().start(job, reporter)

    def run(self, worker: str, key: Any, partition: Any, inputs: Any) -> None:
        if worker != self._liar:
            super().run(worker, key, partition, inputs)
        else:
            self._enqueue(worker, ("run", self.lying, key, partition, inputs))


def reverse(value: np.ndarray) -> np.ndarray:
    """A lie no later layer hides (a LayerNormalization cancels a constant added to its input)."""
    return value[..., ::-1]


def main() -> None:
    model = zoo.distilbert("tiny")
    batch = zoo.sample_inputs(model, batch=8, sequence=16)
    compiled = crowdgraph.compile(model, partitions=3, sample={k: v[:2] for k, v in batch.items()})
    expected = run_session(open_session(model.SerializeToString()), batch)["logits"]
    crowd = [WorkerInfo("liar", memory="64MB", speed=2.0)] + [WorkerInfo(f"phone-{k}", memory="64MB") for k in range(3)]
    with LyingThreads(crowd, "liar", reverse) as executor:
        trusted = compiled.run(batch, executor=executor, microbatch=2)
        lied = sum(task.worker == "liar" for task in compiled.last_report.tasks)
        print(f"audit off: the liar ran {lied} tasks; logits up to {np.max(np.abs(expected)):.2e}; "
              f"max abs difference to the whole model: {np.max(np.abs(trusted['logits'] - expected)):.2e}")
        checked = compiled.run(batch, executor=executor, microbatch=2, audit=0.5)
        print(compiled.last_report)
        print(f"audit on: max abs difference to the whole model: {np.max(np.abs(checked['logits'] - expected)):.2e}")
        print(f"quarantined: {', '.join(compiled.last_report.audit.quarantined)}")
    with ThreadExecutor(workers=3, memory="64MB") as executor:
        private = compiled.run(batch, executor=executor, microbatch=2, private=True)
        kept = sorted({t.partition for t in compiled.last_report.tasks if t.worker == "home"})
        print(f"private: partitions {', '.join(kept)} ran at home; max abs difference to the whole model: "
              f"{np.max(np.abs(private['logits'] - expected)):.2e}")


if __name__ == "__main__":
    main()
