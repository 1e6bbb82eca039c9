"""``crowdgraph.compile`` and the compiled model: partitions, their graph, plans on disk."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from .errors import BudgetError, InputError, ModelError, PlanError
from .lower import ModelLike, OpGraph, declared_shapes, load_model, lower
from .partition import Partition, partition, partition_graph
from .split import SplitRecord, fitting_microbatch, smallest_budget, split_lowered
from .units import format_bytes, parse_bytes

if TYPE_CHECKING:
    from .generate import DecoderLayout
    from .report import RunReport

PLAN_FORMAT = 1
PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class TensorSpec:
    """Name, ONNX element type and declared dims (int, symbol, or None) of a model input/output."""

    name: str
    elem_type: int
    dims: tuple[int | str | None, ...]

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of the tensor."""
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "elem_type": self.elem_type, "dims": list(self.dims)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TensorSpec":
        return cls(data["name"], int(data["elem_type"]), tuple(data["dims"]))


class CompiledModel:
    """A model cut into partitions that each fit a memory budget.

    Attributes
    ----------
    partitions:
        :class:`~crowdgraph.partition.Partition` objects in topological order.
    graph:
        ``networkx.DiGraph`` of partition names; the edge attribute
        ``tensors`` lists the boundary tensors flowing on that edge.
    inputs, outputs:
        :class:`TensorSpec` of the model's inputs and outputs.
    memory_budget:
        The budget the partitions were cut for (None with ``partitions=k``).
    input_shapes:
        The concrete input shapes the estimates were made at.
    splits:
        :class:`~crowdgraph.split.SplitRecord` of every node that was too
        big for the budget on its own and was rewritten into pieces.
    """

    def __init__(
        self,
        partitions: list[Partition],
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        input_shapes: dict[str, tuple[int, ...]],
        memory_budget: int | None,
        source: OpGraph | None = None,
        splits: list[SplitRecord] | None = None,
    ):
        self.partitions = partitions
        self.splits = list(splits or [])
        self.graph = partition_graph(partitions)
        self.inputs = inputs
        self.outputs = outputs
        self.input_shapes = input_shapes
        self.memory_budget = memory_budget
        self._source = source
        #: The report of the latest :meth:`run` (None before the first).
        self.last_report: RunReport | None = None
        self._by_name = {p.name: p for p in partitions}
        self._count = None if memory_budget is not None else len(partitions)
        self._replans: dict[Any, CompiledModel] = {}
        #: Longest generation (prompt + new tokens) the plan fits; set by ``compile(max_length=)``.
        self.max_length: int | None = None

    def __repr__(self) -> str:
        budget = format_bytes(self.memory_budget) if self.memory_budget else "none"
        return f"<CompiledModel: {len(self.partitions)} partitions, budget {budget}, shapes {self.input_shapes}>"

    def __getitem__(self, name: str) -> Partition:
        return self._by_name[name]

    @property
    def output_names(self) -> list[str]:
        """Names of the model's outputs, in the model's order."""
        return [o.name for o in self.outputs]

    def table(self) -> str:
        """The partition table ``crowdgraph inspect`` prints."""
        rows = [("partition", "ops", "weights MB", "est. resident MB", "in MB", "out MB")]
        for p in self.partitions:
            rows.append((
                p.name, str(len(p.nodes)), f"{p.weight_bytes / 1e6:.2f}",
                f"{p.resident_bytes / 1e6:.2f}", f"{p.input_bytes / 1e6:.3f}",
                f"{p.output_bytes / 1e6:.3f}",
            ))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.rjust(w) if c else cell.ljust(w) for c, (cell, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        budget = format_bytes(self.memory_budget) if self.memory_budget else "none (partition count given)"
        shapes = ", ".join(f"{k}={list(v)}" for k, v in self.input_shapes.items())
        lines.append(f"{len(self.partitions)} partitions; budget {budget}; shapes {shapes}")
        width = max((len(r.node) for r in self.splits), default=0)
        for what, records in (("nodes split", [r for r in self.splits if not r.region]),
                              ("regions tiled", [r for r in self.splits if r.region])):
            if records:
                lines.append(f"{len(records)} {what} to fit the budget:")
                lines.extend(f"  {r.node.ljust(width)}  {r.describe()}" for r in records)
        return "\n".join(lines)

    # -- running ---------------------------------------------------------

    def batched_inputs(self) -> list[str]:
        """Inputs split into micro-batches: those whose first dim is not fixed."""
        return [t.name for t in self.inputs if t.dims and not _fixed(t.dims[0])]

    def check_inputs(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """``batch`` as numpy arrays, or :class:`InputError` saying what to change."""
        if not isinstance(batch, Mapping):
            raise InputError(
                f"the batch must map input names to arrays, got {type(batch).__name__}; "
                f"pass {{{', '.join(repr(t.name) + ': ...' for t in self.inputs)}}}"
            )
        expected = {t.name: t for t in self.inputs}
        unknown = sorted(set(batch) - set(expected))
        missing = sorted(set(expected) - set(batch))
        if unknown or missing:
            raise InputError(
                f"the model's inputs are {sorted(expected)}; "
                + (f"missing {missing}" if missing else "")
                + ("; " if missing and unknown else "")
                + (f"unknown {unknown}" if unknown else "")
            )
        feeds = {}
        for name, spec in expected.items():
            value = np.asarray(batch[name])
            if value.dtype != spec.dtype:
                raise InputError(
                    f"input {name!r} has dtype {value.dtype} but the model wants {spec.dtype}; "
                    f"convert it with .astype(np.{spec.dtype.name})"
                )
            if value.ndim != len(spec.dims) or any(
                _fixed(d) and d != n for d, n in zip(spec.dims, value.shape)
            ):
                raise InputError(
                    f"input {name!r} has shape {list(value.shape)} but the model wants "
                    f"[{', '.join('?' if d is None else str(d) for d in spec.dims)}]"
                )
            feeds[name] = value
        sizes = {name: feeds[name].shape[0] for name in self.batched_inputs()}
        if len(set(sizes.values())) > 1:
            raise InputError(f"inputs disagree on the batch size (axis 0): {sizes}; give every input the same rows")
        return feeds

    def run(self, batch: Mapping[str, Any], executor: Any = "threads", *, microbatch: int | str | None = "auto",
            max_error: float | None = None,
            mode: str = "streaming", seed: int = 0, progress: bool = False,
            timeout: float | None = None, policy: str = "cost", audit: float = 0.0,
            private: bool = False, canaries: int = 0) -> dict[str, np.ndarray]:
        """Run the model on ``batch`` across a crowd; return its outputs by name.

        What happened (who ran what, when, at which tier) is kept as
        :attr:`last_report`, a :class:`~crowdgraph.report.RunReport`.

        Parameters
        ----------
        batch:
            Input name -> array.  Inputs with a batch axis are split along
            axis 0 into micro-batches of ``microbatch`` rows.  The default,
            ``"auto"``, takes the largest micro-batch that fits the budget
            (the whole batch when it fits; see
            :func:`~crowdgraph.split.fitting_microbatch`), so a batch that
            is too big for one pass still runs; ``None`` is one micro-batch.
            An explicit number of rows that does not fit raises
            :class:`~crowdgraph.errors.BudgetError` naming the micro-batch
            that would.
        executor:
            An :class:`~crowdgraph.executor.Executor`, a registered name
            (``"threads"``), a URL (``"tcp://host:8786"``), or an object a
            plug-in accepts (a dask ``Client``).  One made here from a name
            is closed after the run.
        mode:
            ``"streaming"`` (a task waits only for its own micro-batch) or
            ``"barrier"`` (for every micro-batch of the previous stage).
        max_error:
            For an executor with a lossy wire (``TcpExecutor(lossy="fp16")``):
            measure the largest absolute error the wire put in the outputs
            (against a lossless run of the first micro-batch, in
            ``last_report.wire_error``) and, above this bound, run the batch
            again exactly and return that (see
            :func:`~crowdgraph.driver.bound_wire_error`).
        policy:
            The scheduler's placement rule: ``"cost"`` (replicas where they
            finish work sooner), or the baselines ``"pipeline"`` and
            ``"greedy"`` (see :mod:`crowdgraph.schedule`).
        audit:
            Fraction of tasks (0 to 1) whose result is checked by running
            the task again on another worker; on a disagreement a third
            worker decides, the odd one out is quarantined and whatever
            its unchecked results reached is computed again.  0 (the
            default) checks nothing; see docs/audit.md and
            :attr:`RunReport.audit <crowdgraph.report.RunReport.audit>`.
        private:
            Run the partitions that read the model's inputs or produce its
            outputs on a worker in this process (with the plan's budget),
            so the crowd sees only intermediate activations; see
            :mod:`crowdgraph.private` and docs/audit.md.
        canaries:
            Add this many micro-batches made of the batch's rows in a
            seeded new order, whose every partition output this process
            computes first; a worker whose result on one differs is
            quarantined like a worker outvoted by a check.

        When a micro-batch is larger than the shapes the plan was compiled
        at, the model is partitioned again at the micro-batch's shapes so
        the budget still holds (plans loaded from disk run as they are).
        """
        from .audit import canary_batches
        from .driver import Driver
        from .executor import resolve_executor
        from .private import PrivateExecutor, private_partitions
        from .taskgraph import join_outputs, split_batch

        feeds = self.check_inputs(batch)
        if microbatch == "auto":
            microbatch = self._auto_microbatch(feeds)
        elif microbatch is not None and not is_count(microbatch):
            raise InputError(f"microbatch must be a whole number of rows of at least 1, None or 'auto', "
                             f"not {microbatch!r}")
        microbatches = split_batch(feeds, self.batched_inputs(), microbatch)
        plan = self.at_shapes({k: v.shape for k, v in microbatches[0].items()})
        ex, owned = resolve_executor(executor)
        crowd, kept = ex, frozenset[str]()
        if private:
            crowd = PrivateExecutor(ex, plan.memory_budget or max(p.resident_bytes for p in plan.partitions))
            kept = private_partitions(plan.partitions, [t.name for t in plan.inputs], plan.output_names)
        try:
            outputs, run_report = Driver(plan, microbatches, crowd, mode=mode, seed=seed,  # type: ignore[arg-type]
                                         progress=progress, timeout=timeout, policy=policy,
                                         audit=audit, private=kept,
                                         canaries=canary_batches(microbatches, self.batched_inputs(), canaries,
                                                                 seed)).run()
        finally:
            if crowd is not ex:
                crowd.close()
            if owned:
                ex.close()
        if max_error is not None:  # an executor made here from a name has an exact wire: nothing reruns
            from .driver import bound_wire_error

            outputs, run_report = bound_wire_error(plan, microbatches, ex, outputs, run_report, max_error, mode=mode,
                                                   seed=seed, progress=progress, timeout=timeout, policy=policy)
        self.last_report = run_report
        assert outputs is not None
        batched_outputs = [t.name for t in self.outputs if t.dims and not _fixed(t.dims[0])]
        joined = join_outputs(outputs, batched_outputs)
        return joined

    @property
    def decoder_layout(self) -> "DecoderLayout":
        """Which inputs and outputs carry the ids, mask, positions and cache (see :mod:`crowdgraph.generate`)."""
        from .generate import decoder_layout

        logits = [t.dims for t in self.outputs if t.name == "logits"]
        return decoder_layout([t.name for t in self.inputs], [t.name for t in self.outputs],
                              logits[0] if logits else None)

    def generate(self, prompts: Any, *, max_new_tokens: int, attention_mask: Any = None,
                 executor: Any = "threads", stream: bool = False, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
                 mode: str = "streaming", policy: str = "pipeline", timeout: float | None = None,
                 keep_caches: bool = True) -> Any:
        """Generate ``max_new_tokens`` tokens after each prompt with a decoder model.

        Parameters
        ----------
        prompts:
            A ``[batch, length]`` array of token ids, left-padded with
            ``attention_mask`` zero on the padding, or a list of token-id
            lists (padded here).
        executor:
            As for :meth:`run`; one executor serves every step, so its
            workers keep their partitions between steps.
        stream:
            Return an iterator of :class:`~crowdgraph.generate.GenerationStep`
            (each step's tokens as they come) instead of the result.
        do_sample, temperature, top_k, top_p, seed:
            Greedy decoding by default; with ``do_sample`` tokens are drawn
            on the driver from a generator seeded with ``seed``, so the same
            seed gives the same tokens on every executor.
        eos_token_id:
            One id or several stop ids: a sequence that produces one ends
            and leaves the batch; the others go on.
        pad_token_id:
            Fills the prompts' left padding and the places after a
            sequence ended.
        keep_caches:
            Each worker keeps the key/value cache of the layers it runs,
            where its budget has room and the crowd has a worker for every
            partition (docs/generate.md); False sends every cache with its
            step through the driver instead (and keeps straggler backups
            for every task).

        Returns
        -------
        numpy.ndarray
            ``[batch, length + max_new_tokens]``: each prompt followed by
            its new tokens, as ``transformers``' ``generate`` returns them.

        Each sequence is a micro-batch of its own, so several sequences are
        in flight at once and every stage has work (``mode`` and
        ``policy`` as for :meth:`run`).  The default policy is
        ``"pipeline"``: every step is a short run, and moving a partition
        to a second worker costs more than the step gains.  :attr:`last_report` is a
        :class:`~crowdgraph.generate.GenerationReport` (tokens per second,
        per-worker totals, every step's run report).
        """
        from .generate import generate

        return generate(self, prompts, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                        executor=executor, stream=stream, do_sample=do_sample, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id, mode=mode, policy=policy, timeout=timeout,
                        keep_caches=keep_caches)

    def _auto_microbatch(self, feeds: Mapping[str, np.ndarray]) -> int | None:
        """Rows of the largest micro-batch that fits the budget (None: the whole batch)."""
        batched = self.batched_inputs()
        shapes = {name: tuple(value.shape) for name, value in feeds.items()}
        if not batched or self.memory_budget is None or _within(shapes, self.input_shapes):
            return None  # the plan was cut at these shapes or larger: the whole batch fits
        if self._source is None:  # a plan loaded from disk fits at the shapes it was compiled at
            return min(feeds[batched[0]].shape[0], self.input_shapes[batched[0]][0])
        fitting = fitting_microbatch(self._source.model, self.memory_budget, shapes)
        if fitting is None:
            one = {name: ((1,) + shape[1:] if name in batched else shape) for name, shape in shapes.items()}
            raise BudgetError(
                f"not even a micro-batch of one row fits the budget of {format_bytes(self.memory_budget)}; "
                f"one row needs {format_bytes(smallest_budget(self._source.model, one))}: raise the budget"
            )
        return fitting

    def to_dask(self, batch: Mapping[str, Any], microbatch: int | None = None, mode: str = "streaming") -> dict:
        """The same task graph as a plain Dask graph, runnable by any Dask scheduler.

        Any Dask scheduler runs it, but none of crowdgraph's placement
        rules hold there (no budgets, no single resident partition); see
        :mod:`crowdgraph.dask_graph`.
        """
        from .dask_graph import to_dask

        return to_dask(self, batch, microbatch=microbatch, mode=mode)

    @staticmethod
    def output_keys(dsk: Mapping[Any, Any]) -> list[Any]:
        """Keys of ``dsk`` (from :meth:`to_dask`) whose value is the joined outputs."""
        from .dask_graph import output_keys

        return output_keys(dsk)

    def at_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> "CompiledModel":
        """This plan, or one cut again for larger shapes than it was compiled at.

        ``run()`` and ``to_dask()`` call it with the shapes of their first
        micro-batch, so the budget holds at the shapes that really run.
        Plans cut again are cached by shape; a plan loaded from disk is
        returned as it is.
        """
        if _within(shapes, self.input_shapes) or self._source is None:
            return self
        key = tuple(sorted((k, tuple(v)) for k, v in shapes.items()))
        if key not in self._replans:
            og, parts, splits = _plan(lower(self._source.model, shapes), self.memory_budget, self._count)
            self._replans[key] = CompiledModel(parts, self.inputs, self.outputs, og.input_shapes,
                                               self.memory_budget, og, [*self.splits, *splits])
        return self._replans[key]

    # -- plans on disk --------------------------------------------------

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Write the plan to folder ``path`` (replaced whole, never half-written).

        Each partition is an ``.onnx`` file with its weights in an external
        data file beside it, so onnxruntime can map them from disk.
        """
        target = pathlib.Path(path)
        if target.exists() and not target.is_dir():
            raise PlanError(f"{target} is a file; give a new or empty folder for the plan")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(target)
            staging = pathlib.Path(tempfile.mkdtemp(prefix=_staging_prefix(target), dir=target.parent))
        except OSError as exc:
            raise PlanError(f"cannot write a plan folder at {target} ({exc}); choose a folder you can write to") from exc
        try:
            for part in self.partitions:
                write_partition(part, staging)
            meta = {
                "format": PLAN_FORMAT,
                "memory_budget": self.memory_budget,
                "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
                "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs],
                "partitions": [_partition_meta(p) for p in self.partitions],
                "splits": [asdict(r) for r in self.splits],
            }
            (staging / PLAN_FILE).write_text(json.dumps(meta, indent=1))
            _replace_dir(staging, target)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise PlanError(f"cannot write the plan to {target} ({exc}); check the free space and "
                            "permissions there") from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target


def _within(shapes: Mapping[str, tuple[int, ...]], compiled: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether every shape is at most the one the plan was compiled at, dim by dim.

    >>> _within({"x": (4, 16)}, {"x": (8, 16)}), _within({"x": (16, 16)}, {"x": (8, 16)})
    (True, False)
    """
    return all(
        len(shape) == len(compiled.get(name, ())) and all(a <= b for a, b in zip(shape, compiled[name]))
        for name, shape in shapes.items()
    )


def is_count(value: Any) -> bool:
    """Whether ``value`` is a whole number of at least 1 (bools, floats and strings are not).

    >>> [is_count(v) for v in (3, np.int64(2), 0, 1.5, True, "4")]
    [True, True, False, False, False, False]
    """
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and bool(value >= 1)


def _fixed(dim: Any) -> bool:
    return isinstance(dim, int) and dim > 0


def write_partition(part: Partition, folder: pathlib.Path) -> pathlib.Path:
    """Save one partition as ``<folder>/<name>.onnx`` with external weights."""
    model = onnx.ModelProto()
    model.CopyFrom(part.model)
    path = folder / f"{part.name}.onnx"
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=f"{part.name}.onnx.data", size_threshold=1024,
    )
    return path


def _partition_meta(p: Partition) -> dict[str, Any]:
    return {
        "name": p.name, "sha256": p.sha256, "file": f"{p.name}.onnx",
        "nodes": list(p.nodes), "inputs": list(p.inputs), "outputs": list(p.outputs),
        "weight_bytes": p.weight_bytes, "activation_bytes": p.activation_bytes,
        "resident_bytes": p.resident_bytes, "input_bytes": p.input_bytes,
        "output_bytes": p.output_bytes, "flops": p.flops, "fast_resident_bytes": p.fast_resident_bytes,
    }


def _staging_prefix(target: pathlib.Path, pid: int | None = None) -> str:
    """Name prefix of the hidden folder a plan is written into before it replaces ``target``.

    It carries the writer's process id, so a later save can tell a folder
    left by a killed writer from one a live writer is filling.

    >>> _staging_prefix(pathlib.Path("out/plan"), pid=42)
    '.plan.42.staging-'
    """
    return f".{target.name}.{os.getpid() if pid is None else pid}.staging-"


def remove_stale_staging(target: pathlib.Path) -> list[pathlib.Path]:
    """Delete staging folders of ``target`` whose writer process is gone; return them.

    A writer killed while writing (SIGKILL, power loss) cannot clean up
    after itself; the next save next to it does.
    """
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.staging-[a-z0-9_]+")
    removed = []
    for folder in target.parent.iterdir():
        match = pattern.fullmatch(folder.name)
        if match and not _process_alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


def _replace_dir(staging: pathlib.Path, target: pathlib.Path) -> None:
    if target.exists():
        if not (target / PLAN_FILE).is_file() and any(target.iterdir()):
            raise PlanError(
                f"{target} exists and is not a crowdgraph plan; choose an empty or new folder"
            )
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)


def load(path: str | os.PathLike) -> CompiledModel:
    """Load a plan folder written by :meth:`CompiledModel.save`.

    Every partition's content hash is checked; a plan whose files changed
    raises :class:`ModelError`.
    """
    folder = pathlib.Path(path)
    try:
        meta = json.loads((folder / PLAN_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder} is not a crowdgraph plan ({exc}); write one with compile(...).save()") from exc
    if not isinstance(meta, dict) or meta.get("format") != PLAN_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise PlanError(f"{folder}: plan format {found!r} is not {PLAN_FORMAT}; recompile the model")
    try:
        return _load_plan(folder, meta)
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"{folder}/{PLAN_FILE} is not as crowdgraph wrote it ({type(exc).__name__}: {exc}); "
                        "recompile the model") from exc


def _partition_file(folder: pathlib.Path, name: Any) -> pathlib.Path:
    """The partition file ``name`` of a plan: a plain file name inside ``folder``, nothing else."""
    if not isinstance(name, str) or not name.endswith(".onnx") or pathlib.PurePath(name).name != name \
            or name.startswith(".") or "\\" in name:
        raise PlanError(f"{folder}/{PLAN_FILE} names partition file {name!r}, which is not a plain .onnx "
                        "file name inside the plan folder; recompile the model")
    path = folder / name
    if not path.is_file():
        raise PlanError(f"{folder}: partition file {name} is missing; recompile the model")
    return path


def _load_plan(folder: pathlib.Path, meta: dict[str, Any]) -> CompiledModel:
    parts = []
    for pm in meta["partitions"]:
        model = onnx.load(str(_partition_file(folder, pm["file"])))
        for init in model.graph.initializer:
            init.ClearField("data_location")  # loaded inline now: hash it as compiled
        part = Partition(
            name=pm["name"], nodes=tuple(pm["nodes"]), inputs=tuple(pm["inputs"]),
            outputs=tuple(pm["outputs"]), weight_bytes=pm["weight_bytes"],
            activation_bytes=pm["activation_bytes"], resident_bytes=pm["resident_bytes"],
            input_bytes=pm["input_bytes"], output_bytes=pm["output_bytes"], model=model,
            flops=pm.get("flops", 0), fast_resident_bytes=pm.get("fast_resident_bytes"),
        )
        if part.sha256 != pm["sha256"]:
            raise PlanError(
                f"{folder}: partition {part.name} does not match its recorded sha256; "
                "the plan folder was changed, recompile it"
            )
        parts.append(part)
    return CompiledModel(
        parts,
        [TensorSpec.from_json(t) for t in meta["inputs"]],
        [TensorSpec.from_json(t) for t in meta["outputs"]],
        {k: tuple(v) for k, v in meta["input_shapes"].items()},
        meta["memory_budget"],
        splits=[SplitRecord(**r) for r in meta.get("splits", [])],
    )


def compile(
    model: ModelLike,
    memory_budget: int | str | None = None,
    *,
    partitions: int | None = None,
    input_shapes: Mapping[str, Iterable[int]] | None = None,
    sample: Mapping[str, Any] | None = None,
    max_length: int | None = None,
) -> CompiledModel:
    """Cut ``model`` into partitions that each fit ``memory_budget``.

    Parameters
    ----------
    model:
        Path of an ``.onnx`` file (external data next to it is read too),
        the model's bytes, or an ``onnx.ModelProto``.
    memory_budget:
        Bytes or a size string (``"48MB"``): every partition's estimated
        resident memory fits it.  Give this or ``partitions``.  Nodes too
        big for it on their own (embedding Gathers, large MatMul/Gemm) are
        first split into exact pieces that fit (:mod:`crowdgraph.split`);
        they are listed in :attr:`CompiledModel.splits`.
    partitions:
        Cut into at most this many partitions, as balanced as possible.
    input_shapes, sample:
        The shapes to estimate memory at: a mapping of input name to
        shape, or a sample batch whose arrays give the shapes.  Symbolic
        dims not bound either way are taken as 1.  Partitions keep the
        model's symbolic dims and run at any size.
    max_length:
        For a decoder (see :meth:`CompiledModel.generate`): the longest
        prompt plus new tokens to generate.  Every step up to it fits the
        budget, its key/value cache included
        (:func:`~crowdgraph.generate.generation_shapes`); when it does not,
        the :class:`BudgetError` names the longest length that does.

    Examples
    --------
    >>> import crowdgraph
    >>> from crowdgraph import zoo
    >>> compiled = crowdgraph.compile(zoo.distilbert("tiny"), "3MB",
    ...                               input_shapes={"input_ids": (1, 16)})
    >>> len(compiled.partitions) > 1
    True
    """
    if (memory_budget is None) == (partitions is None):
        raise InputError("give memory_budget= (e.g. '48MB') or partitions= (e.g. 6), not both or neither")
    budget = parse_bytes(memory_budget) if memory_budget is not None else None
    if partitions is not None and not is_count(partitions):
        raise InputError(f"partitions must be a whole number of at least 1, not {partitions!r}")
    if sample is not None:
        if input_shapes is not None:
            raise InputError("give input_shapes= or sample=, not both")
        input_shapes = {k: np.shape(v) for k, v in sample.items()}
    proto = load_model(model)
    if max_length is None:
        og, parts, splits = _plan(lower(proto, input_shapes), budget, partitions)
        return CompiledModel(parts, _specs(proto, og.inputs, input=True), _specs(proto, og.outputs, input=False),
                             og.input_shapes, budget, og, splits)
    return _compile_decoder(proto, budget, partitions, input_shapes, max_length)


def _compile_decoder(proto: onnx.ModelProto, budget: int | None, partitions: int | None,
                     input_shapes: Mapping[str, Iterable[int]] | None, max_length: int) -> CompiledModel:
    """``compile(..., max_length=)``: cut at the shapes that fit every step of a generation."""
    from .generate import (
        check_cache_partitions, decoder_layout, feed_cache_shapes, generation_shapes, largest_fitting_length,
    )

    if input_shapes is not None:
        raise InputError("give max_length= or input_shapes=/sample=, not both: max_length sets the shapes")

    def layout_of(proto: onnx.ModelProto) -> DecoderLayout:
        inputs = [vi.name for vi in proto.graph.input if vi.name not in {i.name for i in proto.graph.initializer}]
        outputs = _specs(proto, [vi.name for vi in proto.graph.output], input=False)
        logits = [t.dims for t in outputs if t.name == "logits"]
        return decoder_layout(inputs, [t.name for t in outputs], logits[0] if logits else None)

    proto = feed_cache_shapes(proto, layout_of(proto))
    layout = layout_of(proto)
    inputs = [pair.past for pair in layout.cache]
    declared = {t.name: t.dims for t in _specs(proto, inputs, input=True)}
    shapes = generation_shapes(layout, declared, max_length)
    try:
        og, parts, splits = _plan(lower(proto, shapes), budget, partitions)
    except BudgetError as exc:
        assert budget is not None
        fits = largest_fitting_length(proto, layout, declared, budget, max_length)
        hint = (f"max_length={fits} fits it" if fits else "not even max_length=1 fits it: raise the budget")
        raise BudgetError(f"generating up to max_length={max_length} tokens does not fit the budget of "
                          f"{format_bytes(budget)} ({exc}); {hint}") from None
    check_cache_partitions(layout, parts)
    compiled = CompiledModel(parts, _specs(proto, og.inputs, input=True), _specs(proto, og.outputs, input=False),
                             og.input_shapes, budget, og, splits)
    compiled.max_length = max_length
    return compiled


def _plan(og: OpGraph, budget: int | None, count: int | None) -> tuple[OpGraph, list[Partition], list[SplitRecord]]:
    """Split the nodes that do not fit ``budget`` on their own, then cut."""
    splits: list[SplitRecord] = []
    if budget is not None:
        og, splits = split_lowered(og, budget)
    return og, partition(og, memory_budget=budget, partitions=count), splits


def _specs(proto: onnx.ModelProto, names: list[str], input: bool) -> list[TensorSpec]:
    infos = {vi.name: vi for vi in (proto.graph.input if input else proto.graph.output)}
    declared = declared_shapes(proto) if input else {}
    specs = []
    for name in names:
        tt = infos[name].type.tensor_type
        dims = declared.get(name) or tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
        specs.append(TensorSpec(name, tt.elem_type, tuple(dims)))
    return specs
