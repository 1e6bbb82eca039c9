"""Helpers shared by the benchmarks: paired timing, targets, tables, JSON.

Every figure that compares two things is measured the same way: the two
sides run alternately in one process (A B, B A, A B, ...), so slow phases
of a shared, noisy machine hit both; each pair gives one ratio, and the
median, min and max of those ratios are reported.  Nothing here asserts an
absolute time.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

#: The repository root (``tests.models`` builds the exported DistilBERT).
REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
#: Default folder of the JSON and PNG files a full run writes.
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
#: Keys every benchmarks/results/<name>.json has.
RESULT_KEYS = ("benchmark", "quick", "machine", "config", "rows", "targets", "seconds", "skipped")
#: What a benchmark module says when the TCP plug-in is not installed.
TCP_MISSING = "skipped: crowdgraph-tcp not installed"


# -- the machine -----------------------------------------------------------


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, OS, Python and library versions of this machine."""
    import numpy
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "loadavg": loadavg(),
        "commit": commit(),
    }


def commit() -> str | None:
    """The repository's HEAD commit (read only; uncommitted changes are not shown)."""
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages (other work on a shared machine skews timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_line(m: dict[str, Any]) -> str:
    """One line describing the machine, for tables and the docs."""
    mem = f"{m['memory_bytes'] / 2**30:.0f} GiB" if m.get("memory_bytes") else "? GiB"
    return (f"{m['cpu']}, {m['cores']} cores, {mem}, {m['os']}, Python {m['python']}, "
            f"onnxruntime {m['onnxruntime']}")


# -- timing ----------------------------------------------------------------


def stats(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and count of ``values``.

    >>> stats([3.0, 1.0, 2.0])
    {'median': 2.0, 'min': 1.0, 'max': 3.0, 'n': 3}
    """
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(a: Callable[[], Any], b: Callable[[], Any], runs: int, *, warmup: int = 1,
              measure: Callable[[Callable[[], Any]], float] = timed) -> dict[str, Any]:
    """Run ``a`` and ``b`` alternately ``runs`` times each (after ``warmup`` rounds).

    The order flips every round (a b, b a, ...).  Returns the stats of
    each side's seconds and of the per-round ratio ``a / b``.  ``measure``
    turns a callable into the number compared (wall seconds by default).
    """
    for _ in range(warmup):
        a()
        b()
    ta: list[float] = []
    tb: list[float] = []
    for i in range(runs):
        if i % 2 == 0:
            ta.append(measure(a))
            tb.append(measure(b))
        else:
            tb.append(measure(b))
            ta.append(measure(a))
    return paired(ta, tb)


def paired(ta: Sequence[float], tb: Sequence[float]) -> dict[str, Any]:
    """Stats of two paired series and of their per-pair ratio ``a / b``."""
    ratios = [x / y if y else float("inf") for x, y in zip(ta, tb)]
    return {"a": stats(ta), "b": stats(tb), "ratio": stats(ratios), "a_runs": list(ta), "b_runs": list(tb)}


# -- targets ---------------------------------------------------------------


@dataclass
class Target:
    """One target and whether this run met it."""

    benchmark: str
    name: str
    value: float | None
    limit: float
    op: str  # "<=" or ">="
    unit: str = ""
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "MISS", None: "n/a"}[self.passed]

    def line(self) -> str:
        value = "-" if self.value is None else f"{self.value:.3g}{self.unit}"
        note = f"  ({self.note})" if self.note else ""
        return f"{self.verdict:4}  {self.name}: {value} (target {self.op} {self.limit:g}{self.unit}){note}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        data["verdict"] = self.verdict
        data["line"] = self.line()
        return data


# -- output ----------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    """A cell: floats to ``digits`` significant digits, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def ratio_cell(r: dict[str, float], digits: int = 3) -> str:
    """``median [min-max]`` of a ratio's stats."""
    return f"{fmt(r['median'], digits)} [{fmt(r['min'], digits)}-{fmt(r['max'], digits)}]"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> str:
    """A plain-text table with right-aligned numbers; also valid Markdown."""
    body = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    out = [] if title is None else [f"\n{title}"]
    out.append(line(headers))
    out.append("|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    out.extend(line(r) for r in body)
    return "\n".join(out)


def show(text: str) -> None:
    """Print and flush (benchmarks run for minutes; show progress)."""
    print(text, flush=True)


def result(name: str, quick: bool, *, config: dict[str, Any] | None = None, rows: list[dict[str, Any]] | None = None,
           targets: Sequence[Target] = (), seconds: float = 0.0, skipped: str | None = None,
           **extra: Any) -> dict[str, Any]:
    """The JSON document of one benchmark (keys: :data:`RESULT_KEYS`, plus ``extra``)."""
    return {
        "benchmark": name, "quick": quick, "machine": machine(), "config": config or {},
        "rows": rows or [], "targets": [t.to_dict() for t in targets], "seconds": seconds,
        "skipped": skipped, **extra,
    }


def write_json(out: pathlib.Path, name: str, data: Any) -> pathlib.Path:
    """Write ``data`` to ``out/<name>.json``; return the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, pathlib.Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def print_targets(data: dict[str, Any]) -> None:
    """Print the PASS/MISS line of every target of a benchmark's result."""
    if data.get("targets"):
        show(f"\nTargets ({data['benchmark']}):")
        for t in data["targets"]:
            show("  " + t["line"])


def module_main(name: str, run: Callable[[bool, pathlib.Path], dict[str, Any]], doc: str | None,
                argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m benchmarks.<name> [--quick] [--out DIR]``: run one benchmark, write its JSON."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}",
                                     description=(doc or name).splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small, fast subset (smoke test)")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help=f"folder of the JSON/PNG files (default {RESULTS}, or {RESULTS / 'quick'} with --quick)")
    args = parser.parse_args(argv)
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    data = run(args.quick, out)
    write_json(out, name, data)
    print_targets(data)
    return data


def plt():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError:
        return None
    return pyplot


# -- shared model setup ----------------------------------------------------


@dataclass
class ModelCase:
    """A model to benchmark: a label, the model (path or proto) and an inputs maker."""

    label: str
    model: Any
    size: str  # zoo size name for sample inputs ("full" or "tiny")
    sequence: int

    def inputs(self, batch: int) -> dict[str, Any]:
        from crowdgraph import zoo

        return zoo.sample_inputs(self.size, batch=batch, sequence=self.sequence)

    def model_bytes(self) -> bytes:
        """The whole model serialized (external data of a file read in)."""
        import onnx

        if isinstance(self.model, (str, os.PathLike)):
            return onnx.load(os.fspath(self.model)).SerializeToString()
        return self.model.SerializeToString()

    def save_whole(self, folder: pathlib.Path) -> pathlib.Path:
        """Save the whole model to ``folder/model.onnx`` with its weights in external data."""
        import onnx

        if isinstance(self.model, (str, os.PathLike)):
            proto = onnx.load(os.fspath(self.model))
        else:  # save_model moves the weights of the proto it is given out to the file: save a copy
            proto = onnx.ModelProto()
            proto.CopyFrom(self.model)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "model.onnx"
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        return path


@functools.lru_cache(maxsize=None)
def model_cases(quick: bool) -> tuple[ModelCase, ...]:
    """The models benchmarked: DistilBERT exported from transformers and the embedded one.

    ``quick`` uses the embedded tiny DistilBERT only (seconds, no torch).
    """
    from crowdgraph import zoo

    if quick:
        return [ModelCase("embedded DistilBERT (tiny)", zoo.distilbert("tiny"), "tiny", 64)]
    cases = []
    try:
        from tests import models as test_models

        path = test_models.exported_distilbert("full")
        cases.append(ModelCase("exported DistilBERT", str(path), "full", 128))
    except ImportError as exc:  # torch/transformers missing: the embedded model still runs
        show(f"(exported DistilBERT skipped: {exc}; pip install 'crowdgraph[export]')")
    cases.append(ModelCase("embedded DistilBERT", zoo.distilbert("full"), "full", 128))
    return tuple(cases)


def batches(quick: bool) -> tuple[int, ...]:
    """Batch sizes (rows of ``sequence`` tokens) benchmarked."""
    return (1, 8)
