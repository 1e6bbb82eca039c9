"""Simulation: the real scheduler and driver on a virtual clock.

:class:`SimulatedExecutor` carries out the scheduler's actions with a cost
model instead of onnxruntime: compute time from a partition's FLOPs and a
worker's speed (or from a measured profile), load time from weight bytes
and bandwidth, transfer time from tensor bytes.  Events come out in
virtual-time order, so the same driver loop runs unchanged.  It answers
"how long would five phones take, or a thousand" in milliseconds, and it
is the in-memory crowd the scheduler's tests use.

All tensors travel through the coordinator (a star, as with phones behind
NAT): a task's inputs come down the worker's link as soon as the task is
issued (a worker busy with the task before reads them meanwhile, as the
TCP worker and the browser page do), its outputs go up it before the
task counts as finished, and partition weights that are not cached come
down it too.  Every such transfer also crosses the coordinator's own
link, which carries one transfer at a time at
``CostModel.coordinator_bandwidth``: a big enough crowd saturates it, as
a real star does, and the report then says that the coordinator link,
not the crowd, bounds the run.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InputError
from .executor import Executor, Finished, Job, Loaded, Lost, Reporter, TaskStats, Unloaded
from .partition import Partition
from .schedule import Policy, TaskKey, WorkerInfo
from .units import format_bytes


#: Share of the makespan the coordinator link must be busy for the report
#: to name it as what bounds the run.
STAR_BOUND = 0.9


@dataclass(frozen=True)
class CostModel:
    """How long things take on a worker of speed 1.0.

    The defaults describe a mid-range phone on Wi-Fi: about 5 GFLOP/s of
    sustained onnxruntime throughput, 10 MB/s each way with 5 ms latency,
    weights deserialised at 200 MB/s, cached partitions read at 100 MB/s;
    the coordinator is a laptop on the same access point, 50 MB/s for
    everything the crowd sends and receives together (``math.inf``: no
    limit).
    """

    flops_per_second: float = 5e9
    bandwidth: float = 10e6
    latency: float = 0.005
    deserialize_bytes_per_second: float = 200e6
    disk_bytes_per_second: float = 100e6
    coordinator_bandwidth: float = 50e6
    #: Measured seconds per partition for one micro-batch of the compiled
    #: shapes on a speed-1.0 worker; overrides the FLOPs estimate.
    profile: Mapping[str, float] | None = None

    def compute_seconds(self, part: Partition, scale: float, speed: float) -> float:
        """Seconds to run ``part`` on ``scale`` times the compiled batch."""
        if self.profile is not None and part.name in self.profile:
            base = self.profile[part.name]
        else:
            base = part.flops / self.flops_per_second
        return base * scale / speed

    def transfer_seconds(self, nbytes: float) -> float:
        """Seconds to move ``nbytes`` over one worker's link."""
        return self.latency + nbytes / self.bandwidth

    def load_seconds(self, part: Partition, cached: bool) -> float:
        """Seconds to make ``part`` resident (from local storage when cached)."""
        fetch = part.weight_bytes / self.disk_bytes_per_second if cached else self.transfer_seconds(part.weight_bytes)
        return fetch + part.weight_bytes / self.deserialize_bytes_per_second


class _SharedLink:
    """The coordinator's link: busy intervals on the virtual clock.

    A transfer fills the link's free time from its start on, in as many
    pieces as the gaps between earlier reservations need (the link
    interleaves packets of concurrent transfers); touching intervals
    merge, so a saturated link is one interval and a search stays short.

    >>> link = _SharedLink(bandwidth=10.0)
    >>> link.reserve(0.0, 10), link.reserve(2.0, 10)   # 1 s each
    (1.0, 3.0)
    >>> link.reserve(0.5, 20)   # fills 1-2 s, then 3-4 s
    4.0
    >>> list(zip(link.starts, link.ends))
    [(0.0, 4.0)]
    """

    def __init__(self, bandwidth: float) -> None:
        self.bandwidth = bandwidth
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.busy = 0.0  # seconds of transfers carried
        self.nbytes = 0

    def reserve(self, at: float, nbytes: int) -> float:
        """Carry ``nbytes`` from ``at`` on; return when the last byte is through."""
        if nbytes <= 0 or math.isinf(self.bandwidth):
            return at
        need = nbytes / self.bandwidth
        self.busy += need
        self.nbytes += nbytes
        starts, ends = self.starts, self.ends
        first = i = bisect.bisect_right(ends, at)
        t = at
        pieces: list[tuple[float, float]] = []
        while need > 0:
            if i < len(starts) and starts[i] <= t:
                t = max(t, ends[i])
                i += 1
                continue
            take = min(need, (starts[i] if i < len(starts) else math.inf) - t)
            pieces.append((t, t + take))
            need -= take
            t += take
        # Merge the pieces into the intervals they fall between.
        lo = max(first - 1, 0)
        merged: list[list[float]] = []
        for s, e in sorted([*zip(starts[lo:i], ends[lo:i]), *pieces]):
            if merged and s <= merged[-1][1] + 1e-12:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        starts[lo:i] = [s for s, _ in merged]
        ends[lo:i] = [e for _, e in merged]
        return t


class SimulatedExecutor(Executor):
    """A crowd on a virtual clock (see the module docstring).

    Parameters
    ----------
    crowd:
        The workers (:class:`~crowdgraph.WorkerInfo`); ``cached`` partitions
        load from local storage.
    cost:
        The :class:`CostModel`.
    scale:
        Micro-batch rows over the rows the plan was compiled at; set by
        :func:`simulate`.
    losses:
        Worker id -> virtual time at which that worker vanishes.
    """

    name = "simulated"

    def __init__(self, crowd: Sequence[WorkerInfo], cost: CostModel | None = None, *,
                 scale: Mapping[int, float] | float = 1.0, losses: Mapping[str, float] | None = None):
        self.crowd = {w.id: w for w in crowd}
        self.cost = cost or CostModel()
        self.scale = scale
        self.losses = dict(losses or {})
        self._clock = 0.0
        self._heap: list[tuple[float, int, Loaded | Unloaded | Finished | Lost]] = []
        self._seq = itertools.count()
        self._free_at: dict[str, float] = {}
        self._reporter: Reporter | None = None
        self.coordinator_link = _SharedLink(self.cost.coordinator_bandwidth)
        #: What the scheduler is told of the star: every uncached load crosses it.
        self.star_bandwidth = self.cost.coordinator_bandwidth

    def start(self, job: Job, reporter: Reporter) -> list[WorkerInfo]:
        self._reporter = reporter
        self._free_at = {w: self._clock for w in self.crowd}
        for worker, at in self.losses.items():
            self._push(at, Lost(worker, f"simulated loss at t={at:g} s"))
        # The scheduler costs loads with the links this simulation uses.
        return [replace(w, bandwidth=self.cost.bandwidth, disk_bandwidth=self.cost.disk_bytes_per_second)
                for w in self.crowd.values()]

    def now(self) -> float:
        return self._clock

    def _push(self, at: float, notice: Loaded | Unloaded | Finished | Lost) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), notice))

    def _transfer(self, at: float, nbytes: int) -> float:
        """When ``nbytes`` sent at ``at`` arrive, over a worker's link and the coordinator's."""
        return max(at + self.cost.transfer_seconds(nbytes),
                   self.coordinator_link.reserve(at, nbytes) + self.cost.latency)

    def load(self, worker: str, partition: Partition) -> None:
        cached = partition.name in self.crowd[worker].cached
        start = max(self._clock, self._free_at[worker])
        if cached:
            end = start + self.cost.load_seconds(partition, cached)
        else:
            arrived = self._transfer(start, partition.weight_bytes)
            end = arrived + partition.weight_bytes / self.cost.deserialize_bytes_per_second
        self._free_at[worker] = end
        sent = 0 if cached else partition.weight_bytes
        self._push(end, Loaded(worker, partition.name, start, end, bytes_sent=sent, from_cache=cached))
        self.crowd[worker] = replace(self.crowd[worker], cached=self.crowd[worker].cached | {partition.name})

    def unload(self, worker: str, partition: str) -> None:
        start = max(self._clock, self._free_at[worker])
        self._push(start, Unloaded(worker, partition))

    def run(self, worker: str, key: TaskKey, partition: Partition, inputs: Mapping[str, Any]) -> None:
        scale = self.scale if isinstance(self.scale, float) else self.scale[key[1]]
        bytes_in = int(partition.input_bytes * scale)
        bytes_out = int(partition.output_bytes * scale)
        # The inputs leave now: a worker still busy with the task before
        # reads its next RUN while that task computes, as real workers do.
        # The task's start and end are its compute, as a real worker measures
        # them: the scheduler learns compute times, not the links' queues.
        start = max(self._transfer(self._clock, bytes_in), self._free_at[worker])
        computed = start + self.cost.compute_seconds(partition, scale, self.crowd[worker].speed)
        delivered = self._free_at[worker] = self._transfer(computed, bytes_out)
        self._push(delivered, Finished(worker, key, {o: None for o in partition.outputs},
                                       TaskStats(start, computed, bytes_in=bytes_in, bytes_out=bytes_out)))

    def idle(self) -> None:
        """Advance the virtual clock to the next event and report it."""
        while self._heap and self._reporter is not None:
            at, _, notice = heapq.heappop(self._heap)
            self._clock = max(self._clock, at)
            if isinstance(notice, Lost):
                self.crowd.pop(notice.worker, None)
            elif notice.worker not in self.crowd:
                continue  # work of a lost worker never finishes
            self._reporter.notify(notice)
            return

    def gather(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return dict(values)


def simulate(compiled: Any, crowd: Sequence[WorkerInfo], batch_shape: Mapping[str, Sequence[int]] | Sequence[int],
             *, microbatch: int | str | None = "auto", mode: str = "streaming", cost: CostModel | None = None,
             losses: Mapping[str, float] | None = None, seed: int = 0, policy: Policy = "cost",
             audit: float = 0.0) -> Any:
    """How long would ``crowd`` take?  Returns a :class:`~crowdgraph.report.RunReport` in virtual seconds.

    ``batch_shape`` is a mapping of input name to shape, or one shape for
    every input that has a batch axis (``(8, 128)``).  ``microbatch`` is
    as for :meth:`~crowdgraph.compiled.CompiledModel.run`: by default
    (``"auto"``) the largest micro-batch that fits the plan's budget.
    ``audit`` runs that share of the tasks twice, as ``run(..., audit=)``
    does (simulated workers never disagree), to cost spot checks.

    Examples
    --------
    >>> import crowdgraph
    >>> from crowdgraph import zoo
    >>> compiled = crowdgraph.compile(zoo.distilbert("tiny"), partitions=3, input_shapes={"input_ids": (1, 16)})
    >>> crowd = [crowdgraph.WorkerInfo(f"phone{n}", memory="64MB") for n in range(3)]
    >>> stream = crowdgraph.simulate(compiled, crowd, (8, 16), microbatch=1, mode="streaming")
    >>> barrier = crowdgraph.simulate(compiled, crowd, (8, 16), microbatch=1, mode="barrier")
    >>> stream.makespan < barrier.makespan
    True
    """
    from .driver import Driver
    from .taskgraph import split_batch

    shapes = _shapes(compiled, batch_shape)
    batch = {name: np.broadcast_to(np.zeros((), spec.dtype), shapes[name]) for name, spec in
             ((s.name, s) for s in compiled.inputs)}
    batched = compiled.batched_inputs()
    if microbatch == "auto":
        microbatch = compiled._auto_microbatch(batch)
    microbatches = split_batch(batch, batched, microbatch)
    # The plan run() would use: cut again when a micro-batch is larger than
    # the compiled shapes, so FLOPs and bytes are those of the real shapes.
    plan = compiled.at_shapes({k: v.shape for k, v in microbatches[0].items()})
    compiled_rows = max(1, plan.input_shapes[batched[0]][0]) if batched else 1
    scale = {i: (mb[batched[0]].shape[0] / compiled_rows if batched else 1.0) for i, mb in enumerate(microbatches)}
    executor = SimulatedExecutor(crowd, cost, scale=scale, losses=losses)
    # Simulated workers never straggle, and their clock jumps from event to event.
    _, report = Driver(plan, microbatches, executor, mode=mode, seed=seed,  # type: ignore[arg-type]
                       policy=policy, backups=False, audit=audit).run()
    link = executor.coordinator_link
    report.coordinator_link_busy = link.busy
    if report.makespan > 0 and link.busy >= STAR_BOUND * report.makespan:
        report.notes.append(
            f"the coordinator link bounds this run: it carried {format_bytes(link.nbytes)} at "
            f"{format_bytes(link.bandwidth)}/s, busy {link.busy:.1f} s of {report.makespan:.1f} s "
            f"({link.busy / report.makespan:.0%}); more workers will not make it faster, a faster "
            "coordinator link (CostModel.coordinator_bandwidth) or cached partitions will"
        )
    return report


def _shapes(compiled: Any, batch_shape: Mapping[str, Sequence[int]] | Sequence[int]) -> dict[str, tuple[int, ...]]:
    if isinstance(batch_shape, Mapping):
        shapes = {k: tuple(v) for k, v in batch_shape.items()}
    else:
        shapes = {name: tuple(batch_shape) for name in compiled.batched_inputs()}
    for spec in compiled.inputs:
        if spec.name not in shapes:
            if any(not isinstance(d, int) for d in spec.dims):
                raise InputError(f"batch_shape gives no shape for input {spec.name!r}; give a mapping of every input")
            shapes[spec.name] = tuple(spec.dims)  # type: ignore[arg-type]
    return shapes
