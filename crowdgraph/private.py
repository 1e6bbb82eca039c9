"""Private runs: the partitions that touch a model's inputs or outputs stay home.

``compiled.run(batch, executor=crowd, private=True)`` adds one worker in
this process, :data:`HOME`, with the plan's budget, and runs there every
partition that reads a model input or produces a model output.  The crowd
then only ever sees intermediate activations: no raw input and no output
leaves this machine (docs/audit.md says what activations can still
reveal).

The scheduler keeps those partitions home with its ordinary memory rule:
they count as needing more memory than any crowd worker has, and the home
worker counts as having that much (:func:`home_crowd`), so only it can
hold them.  The home worker may also take the crowd's partitions when it
is idle: its own machine is not a stranger's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable, Mapping, Sequence

from .errors import PlanningError
from .executor import Executor, Job, Reporter
from .partition import Partition
from .schedule import TaskKey, WorkerInfo
from .threads import ThreadExecutor

#: Id of the worker in the driver's own process.
HOME = "home"
#: What the scheduler is told a private partition needs, and the home worker
#: holds: more than any real budget, so nothing else can take one.
HOME_MEMORY = 2**62


def private_partitions(partitions: Iterable[Partition], inputs: Iterable[str], outputs: Iterable[str]) -> frozenset[str]:
    """Names of the partitions that read a model input or produce a model output.

    >>> from types import SimpleNamespace as P
    >>> parts = [P(name="p0", inputs=("x",), outputs=("h",)), P(name="p1", inputs=("h",), outputs=("g",)),
    ...          P(name="p2", inputs=("g",), outputs=("y",))]
    >>> sorted(private_partitions(parts, ["x"], ["y"]))
    ['p0', 'p2']
    """
    model_tensors = set(inputs) | set(outputs)
    return frozenset(p.name for p in partitions if model_tensors & (set(p.inputs) | set(p.outputs)))


def home_crowd(crowd: Sequence[WorkerInfo]) -> list[WorkerInfo]:
    """The crowd as the scheduler sees it in a private run: the home worker can hold anything.

    >>> [w.memory for w in home_crowd([WorkerInfo("w1", 100), WorkerInfo(HOME, 100)])] == [100, HOME_MEMORY]
    True
    """
    return [replace(w, memory=HOME_MEMORY) if w.id == HOME else w for w in crowd]


def home_memory(need: Mapping[str, int], private: Iterable[str]) -> dict[str, int]:
    """Partition memory as the scheduler sees it: private partitions fit only the home worker.

    >>> home_memory({"p0": 5, "p1": 7}, ["p0"]) == {"p0": HOME_MEMORY, "p1": 7}
    True
    """
    keep = set(private)
    return {p: (HOME_MEMORY if p in keep else n) for p, n in need.items()}


class PrivateExecutor(Executor):
    """A crowd plus one thread worker at home (:data:`HOME`) with its own budget.

    Actions for :data:`HOME` go to a :class:`~crowdgraph.threads.ThreadExecutor`
    in this process, all others to ``crowd``; both report to the same
    driver.  Values are gathered and forgotten by the crowd's executor,
    which passes arrays through; the home worker's inputs are gathered
    before it runs, so a crowd that reports handles (Dask) works too.
    """

    def __init__(self, crowd: Executor, memory: int):
        self.crowd = crowd
        self.home = ThreadExecutor([WorkerInfo(HOME, memory)])
        self.name = f"{getattr(crowd, 'name', type(crowd).__name__)} + home"
        self.star_bandwidth = getattr(crowd, "star_bandwidth", float("inf"))

    def _for(self, worker: str) -> Executor:
        return self.home if worker == HOME else self.crowd

    def start(self, job: Job, reporter: Reporter) -> list[WorkerInfo]:
        crowd = list(self.crowd.start(job, reporter))
        if any(w.id == HOME for w in crowd):
            raise PlanningError(f"a crowd worker is named {HOME!r}, the name of the worker at home in a private "
                                "run; rename that worker or run without private=True")
        return crowd + list(self.home.start(job, reporter))

    def load(self, worker: str, partition: Partition) -> None:
        self._for(worker).load(worker, partition)

    def unload(self, worker: str, partition: str) -> None:
        self._for(worker).unload(worker, partition)

    def store(self, worker: str, partition: Partition) -> None:
        self._for(worker).store(worker, partition)

    def run(self, worker: str, key: TaskKey, partition: Partition, inputs: Mapping[str, Any], **state: Any) -> None:
        if worker == HOME:  # the crowd's outputs may be handles (Dask): the home worker needs arrays
            inputs = self.crowd.gather(inputs)
        self._for(worker).run(worker, key, partition, inputs, **state)

    def forget_state(self, worker: str, keys: Sequence[str]) -> None:
        self._for(worker).forget_state(worker, keys)

    def quarantine(self, worker: str, reason: str) -> None:
        self._for(worker).quarantine(worker, reason)

    def gather(self, values: Mapping[str, Any]) -> Any:
        return self.crowd.gather(values)

    def forget(self, values: Sequence[Any]) -> None:
        self.crowd.forget(values)

    def idle(self) -> None:
        self.crowd.idle()

    def now(self) -> float:
        return self.crowd.now()

    def reset(self) -> None:
        self.home.reset()
        self.crowd.reset()

    def close(self) -> None:
        """Close the home worker; the crowd's executor belongs to whoever made it."""
        self.home.close()
