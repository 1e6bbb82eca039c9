"""The driver's side of LOAD / UNLOAD / RUN, sans-io: shared by both TCP executors.

:class:`~crowdgraph_tcp.TcpExecutor` (a coordinator in this process) and
:class:`~crowdgraph_tcp.client.RemoteExecutor` (a driver connection to
``crowdgraph serve``) differ only in how a frame reaches a worker.  What
they share lives here, free of sockets and threads: the crowd snapshot a
run starts from, the frames each scheduler action becomes, matching a
worker's answer to the action it answers, and turning the answer into
:class:`~crowdgraph.executor.Reporter` notices (worker clocks mapped to
this side's clock included).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, NamedTuple

import numpy as np

from crowdgraph import wire
from crowdgraph.errors import InputError
from crowdgraph.executor import Executor, Job, Reporter, TaskStats
from crowdgraph.partition import Partition
from crowdgraph.runtime import TaskState
from crowdgraph.schedule import TaskKey, WorkerInfo
from crowdgraph.wire import Message

from .common import LOG
from .peers import form_problem

__all__ = ["lossy_option", "Action", "OutputSpec", "output_specs", "result_problem", "PendingRun", "PendingLoad",
           "PendingUnload", "PendingStore", "PendingFetch", "HeldOutput", "held_outputs", "outputs_to_hold", "DIRECT_MIN_BYTES",
           "Holding", "DriverBridge", "take_answer"]

#: Outputs smaller than this always travel with the RESULT: a fetch from
#: the holder costs a round trip more than the bytes save.
DIRECT_MIN_BYTES = 1 << 16

#: Encodes a message for the worker it goes to (codec and version agreed with it).
Encode = Callable[[Message], list[Any]]


def lossy_option(lossy: str | None) -> str | None:
    """Check an executor's ``lossy`` option: None (exact, the default) or a lossy encoding.

    >>> lossy_option("fp16")
    'fp16'
    """
    if lossy is not None and lossy not in wire.LOSSY:
        raise InputError(f"lossy={lossy!r} is not a wire encoding; use None (exact), "
                         f"{' or '.join(repr(e) for e in wire.LOSSY)}")
    return lossy


@dataclass
class PendingRun:
    """A RUN's answer goes to ``reporter`` as task ``key``, which sent ``bytes_in`` raw bytes.

    ``outputs`` is what the answer must hold (see :func:`result_problem`);
    ``fetched`` the held outputs it reads, kept until it is answered.
    """

    reporter: Reporter
    key: TaskKey
    bytes_in: int
    outputs: dict[str, "OutputSpec"]
    fetched: tuple["HeldOutput", ...] = ()


@dataclass(frozen=True)
class HeldOutput:
    """An output a worker holds for the tasks that read it (RESULT ``held``): the TCP executor's handle.

    :meth:`~crowdgraph_tcp.TcpExecutor.gather` fetches it; the RUN of a
    task that reads it tells that task's worker where it is.
    """

    worker: str
    task: tuple[str, int]
    output: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def stand_in(self) -> np.ndarray:
        """A zero-stride array of its dtype and shape, for checks that read only those."""
        return np.broadcast_to(np.zeros((), self.dtype), self.shape)


def held_outputs(worker: str, key: TaskKey, result: Message) -> dict[str, HeldOutput]:
    """The handles of the outputs a RESULT of task ``key`` from ``worker`` says it holds (``held``).

    >>> answer = Message(wire.RESULT, {"held": {"h": {"dtype": "float32", "shape": [2, 3]}}})
    >>> held_outputs("w1", ("p0", 0), answer)["h"].nbytes
    24
    """
    return {name: HeldOutput(worker, (key[0], key[1]), name, t["dtype"], tuple(t["shape"]))
            for name, t in result.header.get("held", {}).items()}


@dataclass
class PendingFetch:
    """A FETCH the driver sent (to gather held outputs): its answer completes ``future``."""

    future: "Future[Message]" = field(default_factory=Future)


def outputs_to_hold(outputs: Iterable[str], read_by_tasks: Iterable[str], expected: Mapping[str, int],
                    room: int) -> list[str]:
    """Which of a task's ``outputs`` its worker should hold for the tasks that read them.

    An output is held when another partition reads it, its size
    (``expected``: as seen on the partition's earlier tasks, or the
    partition's estimate of all its outputs before the first) is at least
    :data:`DIRECT_MIN_BYTES`, and together they fit ``room``: the worker's
    budget less its partition's estimate and what it holds already.

    >>> outputs_to_hold(["h", "logits"], ["h"], {"h": 2**20, "logits": 2**20}, room=2**21)
    ['h']
    >>> outputs_to_hold(["h"], ["h"], {"h": 2**20}, room=2**19), outputs_to_hold(["h"], ["h"], {"h": 2**10}, room=2**30)
    ([], [])
    """
    read, hold, total = set(read_by_tasks), [], 0
    for name in outputs:
        size = expected.get(name)
        if name in read and size is not None and size >= DIRECT_MIN_BYTES and total + size <= room:
            hold.append(name)
            total += size
    return hold


class OutputSpec(NamedTuple):
    """What one output of a task must be: its dtype, rank and (when it has a batch axis) rows."""

    dtype: np.dtype
    rank: int
    rows: int | None


def output_specs(partition: Partition, inputs: Mapping[str, np.ndarray]) -> dict[str, OutputSpec]:
    """The outputs a RUN of ``partition`` on ``inputs`` must return, from the partition's graph.

    An output whose first axis is the same symbolic dimension as an input's
    first axis (the batch) must have as many rows as that input.
    """
    import onnx

    batch = {}
    for value in partition.model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name in inputs and dims and dims[0].dim_param and np.ndim(inputs[value.name]):
            batch[dims[0].dim_param] = int(np.shape(inputs[value.name])[0])
    specs = {}
    for value in partition.model.graph.output:
        tensor_type = value.type.tensor_type
        dims = tensor_type.shape.dim
        rows = batch.get(dims[0].dim_param) if dims and dims[0].dim_param else None
        specs[value.name] = OutputSpec(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)),
                                       len(dims), rows)
    return specs


def result_problem(tensors: Mapping[str, np.ndarray], specs: Mapping[str, OutputSpec]) -> str | None:
    """What is wrong with a task's result ``tensors`` against its output ``specs``, or None.

    >>> specs = {"y": OutputSpec(np.dtype("float32"), 2, 4)}
    >>> result_problem({"y": np.zeros((4, 2), np.float32)}, specs) is None
    True
    >>> result_problem({"y": np.zeros((8, 2), np.float32)}, specs)
    "output 'y' has 8 rows; the micro-batch has 4"
    >>> result_problem({"y": np.zeros((4, 2))}, specs)
    "output 'y' is float64, not float32"
    >>> result_problem({}, specs)
    "output 'y' is missing"
    """
    for name, spec in specs.items():
        value = tensors.get(name)
        if value is None:
            return f"output {name!r} is missing"
        if value.dtype != spec.dtype:
            return f"output {name!r} is {value.dtype}, not {spec.dtype}"
        if value.ndim != spec.rank:
            return f"output {name!r} has rank {value.ndim}, not {spec.rank}"
        if spec.rows is not None and value.shape[0] != spec.rows:
            return f"output {name!r} has {value.shape[0]} rows; the micro-batch has {spec.rows}"
    return None


@dataclass
class PendingLoad:
    """A LOAD's answer goes to ``reporter``; ``partition`` is at hand to resend its bytes."""

    reporter: Reporter
    partition: Partition


@dataclass
class PendingUnload:
    """An UNLOAD's answer goes to ``reporter``; None: the executor's own clean-up, not reported."""

    reporter: Reporter | None


@dataclass
class PendingStore:
    """A STORE's partition bytes, which the coordinator sends in chunks; its answers are not reported."""

    data: bytes


@dataclass(eq=False)
class Action:
    """One LOAD, UNLOAD, STORE or RUN on its way to a worker, and what its answer is for.

    ``parts`` is the encoded frame, or None and ``message`` is encoded when
    it is sent.  ``purpose`` comes back with the answer (a ``Pending*``
    record, or the driver connection the relay answers); ``owner`` is who
    may release a cache-miss hold (the executor, or a driver connection).
    """

    kind: Literal["LOAD", "UNLOAD", "STORE", "RUN", "FETCH", "DROP"]  # the wire message type
    partition: str
    purpose: Any = None
    parts: list[Any] | None = None
    message: Message | None = None
    sha256: str | None = None
    from_cache: bool = False
    key: tuple[str, int] | None = None
    hold: tuple[str, ...] = ()  # a RUN's outputs the worker is asked to hold
    owner: Any = None
    size: int = 0
    sent: float = 0.0


def take_answer(outstanding: list[Action], message: Message) -> Action | None:
    """Remove from ``outstanding`` and return the action ``message`` answers, or None.

    A worker answers its actions of one kind in order, so the first match
    is the one: RESULT and a task's FAILED answer the RUN of that task,
    LOADED and a load's FAILED the LOAD of that partition, STORED the
    STORE of that partition, UNLOADED the UNLOAD.

    >>> run = Action(wire.RUN, "p0", key=("p0", 1))
    >>> pending = [Action(wire.LOAD, "p0"), run]
    >>> take_answer(pending, Message(wire.FAILED, {"task": ["p0", 1], "error": "x"})) is run, len(pending)
    (True, 1)
    """
    h, kind = message.header, message.type
    if kind == wire.RESULT or (kind == wire.FAILED and "task" in h):
        key = (h["task"][0], h["task"][1])
        matches: Callable[[Action], bool] = lambda a: a.kind == wire.RUN and a.key == key
    elif kind == wire.LOADED or kind == wire.FAILED:
        name = h.get("partition", h.get("load"))
        matches = lambda a: a.kind == wire.LOAD and a.partition == name
    elif kind == wire.STORED:
        matches = lambda a: a.kind == wire.STORE and a.partition == h["partition"]
    elif kind == wire.FETCHED:
        task = (h["task"][0], h["task"][1])
        matches = lambda a: a.kind == wire.FETCH and a.key == task
    else:
        matches = lambda a: a.kind == wire.UNLOAD and a.partition == h["partition"]
    for i, action in enumerate(outstanding):
        if matches(action):
            return outstanding.pop(i)
    return None


class Holding(NamedTuple):
    """What the driver side knows of a worker: its budget, cache, resident partition (sha256s), idle RSS,
    whether it is to be sent partitions for its cache ahead of need (STORE) and whether it keeps
    state between runs (RUN ``state``)."""

    id: str
    memory: int
    cached: Iterable[str]
    resident: str | None
    floor: int | None = None
    stores: bool = False
    keeps_state: bool = False
    peer: bool = False  # it holds outputs and fetches held inputs (HELLO ``peer``)


class DriverBridge:
    """Scheduler actions -> frames, worker answers -> reporter notices (no I/O).

    Parameters
    ----------
    address_workers
        Frames name the worker they are for (``worker`` in the header), as a
        driver's frames to a standing coordinator must.
    direct
        Workers with a peer port hold outputs other partitions read, and
        the workers running those fetch them (:func:`outputs_to_hold`).
    """

    def __init__(self, *, address_workers: bool = False, direct: bool = False):
        self.address_workers = address_workers
        self.direct = direct
        #: The reporter of the current run (None before the first).
        self.reporter: Reporter | None = None
        #: sha256 -> partition name, for the current run's plan.
        self.by_sha: dict[str, str] = {}
        self._offsets: dict[str, float] = {}
        self._last_end: dict[str, float] = {}
        self._memory: dict[str, int] = {}  # worker -> budget, to open partitions fast where they fit
        self._forgotten: dict[str, list[str]] = {}  # worker -> state keys its next RUN drops
        # Held outputs (driver thread and IOLoop thread): what each worker holds, and for how many
        # unanswered RUNs; a forgotten one is dropped once none reads it.
        self._lock = threading.Lock()
        self._peers: set[str] = set()
        self._read_by_tasks: set[str] = set()
        self._expected: dict[tuple[str, str], int] = {}  # (partition, output) -> bytes last seen
        self._held: dict[str, dict[HeldOutput, int]] = {}  # worker -> handle -> RUNs reading it
        self._held_bytes: dict[str, int] = {}
        self._forgot: set[HeldOutput] = set()
        #: DROPs that answers made due (a forgotten output whose last reader answered); the executor sends them.
        self.pending_drops: list[tuple[str, Action]] = []

    # -- runs ---------------------------------------------------------------

    def start(self, job: Job, reporter: Reporter,
              crowd: Iterable[Holding]) -> tuple[list[WorkerInfo], list[tuple[str, Action]]]:
        """Begin a run: the crowd as the scheduler sees it, and the (worker, UNLOAD)s to send first.

        A worker still holding a partition of another plan has that memory
        freed (its UNLOAD is not reported).
        """
        self.reporter, self.by_sha = reporter, {p.sha256: name for name, p in job.partitions.items()}
        self._read_by_tasks = {name for p in job.partitions.values() for name in p.inputs}
        infos, clear = Executor.crowd_for(job, [(self.info(w), w.resident) for w in crowd])
        return infos, [(worker, self.unload(worker, "resident", None)) for worker in clear]

    def reset(self, crowd: Iterable[Holding]) -> list[tuple[str, Action]]:
        """(worker, UNLOAD)s, not reported, of whatever the workers hold, and DROPs of every output
        they hold for this side, between runs."""
        with self._lock:
            for handles in self._held.values():
                self._forgot.update(handles)
                for h in handles:
                    handles[h] = 0
            drops = self._drops()
        return drops + [(w.id, self.unload(w.id, self.by_sha.get(w.resident, "resident"), None))
                        for w in crowd if w.resident]

    def info(self, w: Holding) -> WorkerInfo:
        """``w`` as the scheduler sees it: its cache in the current plan's partition names."""
        cached = frozenset(self.by_sha[s] for s in w.cached if s in self.by_sha)
        self._memory[w.id] = w.memory
        if w.peer and self.direct:
            self._peers.add(w.id)
        return WorkerInfo(w.id, memory=w.memory, speed=1.0, cached=cached, floor=w.floor, stores=w.stores,
                          keeps_state=w.keeps_state)

    def lost(self, worker: str) -> list[TaskKey]:
        """Forget what was measured of ``worker``; return the tasks whose outputs it held (now lost)."""
        self._offsets.pop(worker, None)
        self._last_end.pop(worker, None)
        self._memory.pop(worker, None)
        self._forgotten.pop(worker, None)
        with self._lock:
            self._peers.discard(worker)
            self._held_bytes.pop(worker, None)
            held = self._held.pop(worker, {})
            self._forgot -= set(held)
        return sorted({h.task for h in held})

    # -- held outputs -------------------------------------------------------

    def held_bytes(self, worker: str) -> int:
        """Bytes of outputs ``worker`` holds for this side."""
        with self._lock:
            return self._held_bytes.get(worker, 0)

    def fetches(self, worker: str) -> bool:
        """Whether ``worker`` fetches held inputs itself (else they must be gathered and sent)."""
        return worker in self._peers

    def forget(self, handles: Iterable[HeldOutput]) -> list[tuple[str, Action]]:
        """The driver needs ``handles`` no more: (worker, DROP)s for those no unanswered RUN reads."""
        with self._lock:
            self._forgot.update(h for h in handles if h in self._held.get(h.worker, {}))
            return self._drops()

    def _drops(self) -> list[tuple[str, Action]]:
        """DROPs of forgotten outputs nothing reads any more (lock held)."""
        done: dict[tuple[str, tuple[str, int]], list[str]] = {}
        for h in [h for h in self._forgot if self._held[h.worker][h] == 0]:
            self._forgot.discard(h)
            del self._held[h.worker][h]
            self._held_bytes[h.worker] -= h.nbytes
            done.setdefault((h.worker, h.task), []).append(h.output)
        return [(worker, Action(wire.DROP, task[0], key=task, message=Message(
                    wire.DROP, {"task": list(task), "outputs": sorted(outputs)})))
                for (worker, task), outputs in done.items()]

    def fetched_problem(self, holder: str, message: Message) -> str | None:
        """What is wrong with the tensors of ``holder``'s FETCHED against the dtypes and shapes its
        RESULTs announced, or None (also when this side does not know them: nothing to judge)."""
        task = (message.header["task"][0], message.header["task"][1])
        with self._lock:
            known = {h.output: h for h in self._held.get(holder, {}) if h.task == task}
        problems = (form_problem(name, value, known[name].dtype, known[name].shape)
                    for name, value in message.tensors.items() if name in known)
        return next((f"task {list(task)}: {p}" for p in problems if p is not None), None)

    def fetch(self, handles: Iterable[HeldOutput]) -> list[tuple[str, Action]]:
        """(worker, FETCH)s that bring ``handles`` to this side; each answers its :class:`PendingFetch`."""
        groups: dict[tuple[str, tuple[str, int]], list[str]] = {}
        for h in handles:
            groups.setdefault((h.worker, h.task), []).append(h.output)
        return [(worker, Action(wire.FETCH, task[0], purpose=PendingFetch(), key=task, message=Message(
                    wire.FETCH, {"task": list(task), "outputs": sorted(set(outputs)), "holder": worker})))
                for (worker, task), outputs in groups.items()]

    # -- actions -> frames --------------------------------------------------

    def _header(self, worker: str, header: dict[str, Any]) -> dict[str, Any]:
        return dict(header, worker=worker) if self.address_workers else header

    def load(self, worker: str, partition: Partition, *, from_cache: bool) -> Action | None:
        """A LOAD of ``partition`` (from the worker's cache, or with its bytes); None before a run."""
        if self.reporter is None:
            return None
        return self._load(worker, PendingLoad(self.reporter, partition), from_cache)

    def _load(self, worker: str, pending: PendingLoad, from_cache: bool) -> Action:
        part = pending.partition
        header = self._header(worker, {"partition": part.name, "sha256": part.sha256, "from_cache": from_cache})
        if part.opens_fast(self._memory.get(worker, 0)):
            header["fast"] = True
        blobs = {} if from_cache else {"model": part.model_bytes}
        return Action(wire.LOAD, part.name, purpose=pending, message=Message(wire.LOAD, header, blobs=blobs),
                      sha256=part.sha256, from_cache=from_cache)

    def store(self, worker: str, partition: Partition) -> Action | None:
        """A STORE of ``partition``'s bytes for the worker's cache, which the
        coordinator sends in chunks (:class:`PendingStore`); None before a run."""
        if self.reporter is None:
            return None
        return Action(wire.STORE, partition.name, purpose=PendingStore(partition.model_bytes),
                      sha256=partition.sha256)

    def unload(self, worker: str, partition: str, reporter: Reporter | None) -> Action:
        """An UNLOAD of ``partition``; its answer goes to ``reporter`` (None: not reported)."""
        return Action(wire.UNLOAD, partition, purpose=PendingUnload(reporter),
                      message=Message(wire.UNLOAD, self._header(worker, {"partition": partition})))

    def forget_state(self, worker: str, keys: Iterable[str]) -> None:
        """State keys ``worker`` drops before its next RUN (``forget``; an UNLOAD drops all it
        keeps): until then they hold only what its last task held."""
        self._forgotten.setdefault(worker, []).extend(keys)

    def run(self, worker: str, key: TaskKey, partition: Partition, inputs: Mapping[str, Any],
            encode: Encode, lossy: str | None = None, state: TaskState | None = None,
            address: Callable[[str], str | None] = lambda holder: None) -> Action | None:
        """A RUN of task ``key``, encoded right here (the caller's thread) with ``encode``.

        ``lossy`` (``"fp16"``, ``"int8"``) asks for float32 tensors in that
        encoding both ways, on links that agreed it.  ``state`` is the
        task's :class:`~crowdgraph.runtime.TaskState`; the RUN also carries
        the keys :meth:`forget_state` gathered for the worker.  Inputs that
        are :class:`HeldOutput` handles are fetched by the worker (only
        workers that :meth:`fetches` may be given them): from the holder's
        peer port at ``address(holder)``, or through the coordinator where
        that is None.  Returns None before a run, or when the inputs cannot
        be sent (the task is then reported failed).
        """
        reporter = self.reporter
        if reporter is None:
            return None
        key = (str(key[0]), int(key[1]))
        try:
            held = {name: value for name, value in inputs.items() if isinstance(value, HeldOutput)}
            arrays = {name: np.asarray(value) for name, value in inputs.items() if name not in held}
            header = {"task": list(key), "outputs": list(partition.outputs)}
            if held:
                header["fetch"] = [{"input": name, "task": list(h.task), "output": h.output, "holder": h.worker,
                                    "dtype": h.dtype, "shape": list(h.shape),
                                    **({"address": a} if h.worker != worker and (a := address(h.worker)) else {})}
                                   for name, h in held.items()]
            if state is None and lossy is None and worker in self._peers:  # lossy encodings are per coordinator link
                hold = self._to_hold(worker, partition)
                if hold:
                    header["hold"] = hold
            if lossy is not None:
                header["lossy"] = lossy
            if state is not None:
                header["state"] = {"key": state.key, "keep": state.keep, "pairs": [list(p) for p in state.pairs],
                                   "shared": list(state.shared)}
            if self._forgotten.get(worker):
                header["forget"] = self._forgotten.pop(worker)
            parts = encode(Message(wire.RUN, self._header(worker, header), tensors=arrays))
        except (TypeError, ValueError) as exc:
            reporter.task_failed(worker, key, f"cannot send the inputs: {exc}")
            return None
        specs = output_specs(partition, {**arrays, **{name: h.stand_in() for name, h in held.items()}})
        if state is not None and state.keep:  # what the worker keeps does not come back
            specs = {name: spec for name, spec in specs.items()
                     if name in state.shared or all(name != o for o, _ in state.pairs)}
        with self._lock:  # what this RUN reads is not dropped before it is answered
            for h in held.values():
                if h in self._held.get(h.worker, {}):
                    self._held[h.worker][h] += 1
        bytes_in = sum(a.nbytes for a in arrays.values()) + sum(h.nbytes for h in held.values())
        return Action(wire.RUN, partition.name, purpose=PendingRun(reporter, key, bytes_in, specs, tuple(held.values())),
                      parts=parts, key=key, hold=tuple(header.get("hold", ())))

    def _to_hold(self, worker: str, partition: Partition) -> list[str]:
        memory = self._memory.get(worker, 0)
        estimate = partition.fast_resident_bytes if partition.opens_fast(memory) else partition.resident_bytes
        with self._lock:
            room = memory - (estimate or 0) - self._held_bytes.get(worker, 0)
            expected = {o: self._expected.get((partition.name, o), partition.output_bytes) for o in partition.outputs}
        return outputs_to_hold(partition.outputs, self._read_by_tasks, expected, room)

    # -- answers -> notices -------------------------------------------------

    def bad_result(self, worker: str, action: Action, message: Message) -> str | None:
        """Why ``message`` from ``worker`` is not a result ``action`` can take, or None.

        A worker whose result breaks its partition's output specs is not to
        be trusted with more tasks: the caller drops it, and its tasks are
        placed again elsewhere.
        """
        pending = action.purpose
        if message.type != wire.RESULT or not isinstance(pending, PendingRun):
            return None
        held = held_outputs(worker, pending.key, message)
        unasked = sorted(set(held) - set(action.hold))
        if unasked:
            return f"worker {worker} held outputs {unasked} of task {pending.key} it was not asked to hold"
        problem = result_problem({**message.tensors, **{name: h.stand_in() for name, h in held.items()}},
                                 pending.outputs)
        if problem is None:
            return None
        return f"worker {worker} sent a bad result for task {pending.key}: {problem}"

    def answered(self, worker: str, action: Action, message: Message, size: int, received: float) -> Action | None:
        """Report ``worker``'s answer to ``action``, which arrived at ``received`` as ``size`` bytes.

        Returns the LOAD to send next when a load from the worker's cache
        missed (the partition's bytes then go instead), else None.
        """
        pending, h, kind = action.purpose, message.header, message.type
        if isinstance(pending, PendingFetch):
            pending.future.set_result(message)
        elif isinstance(pending, PendingRun):
            outputs = self._took(worker, pending, message)
            if kind == wire.RESULT:
                start, end = self._map_clock(worker, h["start"], h["end"], action.sent, received)
                pending.reporter.task_finished(worker, pending.key, outputs, TaskStats(
                    start, end, bytes_in=pending.bytes_in, bytes_out=sum(v.nbytes for v in outputs.values()),
                    wire_in=action.size, wire_out=size, peak_rss=h["peak_rss"], rss=h["rss"]))
            elif "holder" not in h:  # else the holder's loss places the task again (see the executor)
                pending.reporter.task_failed(worker, pending.key, h.get("error", "failed"))
        elif isinstance(pending, PendingLoad):
            if kind == wire.LOADED:
                start, end = self._in_order(worker, max(action.sent, received - h["seconds"]), received)
                pending.reporter.loaded(worker, action.partition, start=start,
                                        end=end, bytes_sent=0 if action.from_cache else action.size,
                                        from_cache=action.from_cache, rss=h["rss"], fast=h.get("fast", False))
            elif action.from_cache:
                LOG.info("worker %s no longer caches %s (%s); sending its bytes", worker, action.partition,
                         h.get("error"))
                return self._load(worker, pending, from_cache=False)
            else:
                pending.reporter.load_failed(worker, action.partition, h.get("error", "failed"))
        elif isinstance(pending, PendingUnload) and pending.reporter is not None and kind == wire.UNLOADED:
            pending.reporter.unloaded(worker, action.partition, rss=h["rss"])
        return None

    def _took(self, worker: str, pending: PendingRun, message: Message) -> dict[str, Any]:
        """A RUN's answer is in: release what it read, and take its outputs (held ones as handles)."""
        held = held_outputs(worker, pending.key, message) if message.type == wire.RESULT else {}
        with self._lock:
            for h in pending.fetched:
                if h in self._held.get(h.worker, {}):
                    self._held[h.worker][h] -= 1
            for name, value in [*message.tensors.items(), *held.items()]:
                self._expected[(pending.key[0], name)] = value.nbytes
            for h in held.values():
                self._held.setdefault(worker, {})[h] = 0
                self._held_bytes[worker] = self._held_bytes.get(worker, 0) + h.nbytes
            drops = self._drops()
        self.pending_drops.extend(drops)
        return {**message.tensors, **held}

    def _map_clock(self, worker: str, start: float, end: float, sent: float,
                   received: float) -> tuple[float, float]:
        """A task's worker-clock times on this side's clock, within ``sent <= start <= end <= received``.

        The offset is the smallest ``received - end`` seen of ``worker``: the
        true offset plus the shortest trip an answer took, so times map late
        by at most that trip, never early.
        """
        offset = min(self._offsets.get(worker, received - end), received - end)
        self._offsets[worker] = offset
        end = max(sent, min(received, end + offset))
        return self._in_order(worker, min(end, max(sent, start + offset)), end)

    def _in_order(self, worker: str, start: float, end: float) -> tuple[float, float]:
        """``start, end``, moved no earlier than the end of ``worker``'s previous answer.

        A worker carries out one action at a time, in the order its answers
        arrive; mapped times must keep that order, or a load would seem to
        begin while the task before it still ran.  (The clock offset only
        shrinks as shorter trips are seen, so an early answer's times can map
        later than a following one's.)
        """
        start = max(start, self._last_end.get(worker, start))
        end = max(end, start)
        self._last_end[worker] = end
        return start, end
