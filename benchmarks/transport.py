"""Transport: crowdgraph's binary frames against CROWDio's zlib + base64 + JSON.

The tensors are real boundary tensors: the plan of DistilBERT for a
batch of 8 x 128 tokens runs partition by partition, and every tensor
that crosses a partition boundary is kept (hidden states [8, 128, 768]
float32, the attention mask as the model expands it), with the model's
own inputs (padded int64 ``input_ids`` and ``attention_mask``).

Each tensor travels alone in one message, both ways:

* crowdgraph: ``wire.encode(Message(RUN, ...), codec=..., shuffle=...)``
  then ``wire.decode`` (lz4, lz4 + byte shuffle, zlib, zlib + shuffle;
  ``none`` as a reference), and the lossy encodings fp16 and int8 under
  lz4 (``lossy=...``);
* CROWDio-style: ``zlib.compress(raw, 6)``, base64, inside a JSON object
  with name, dtype and shape; decoded with ``json.loads``, ``b64decode``,
  ``zlib.decompress`` and ``np.frombuffer``.

Per codec: bytes on the wire (frame or JSON text) and encode + decode
seconds, alternating with the CROWDio-style round trip; "x faster" is
CROWDio's time over crowdgraph's, per round.  The total row adds the
tensors up (per round for the times).

The lossy table sets fp16 and int8 against lz4 lossless: bytes and time
of all tensors (ratios of the totals), the largest error one tensor got,
and the error in the model's outputs when every boundary tensor of the
batch crosses the wire in that encoding (the partitions run one after
another here, each input decoded from its frame), against the same run
with exact tensors.

Run: python -m benchmarks.transport [--quick]
"""

from __future__ import annotations

import base64
import json
import math
import pathlib
import time
import zlib
from typing import Any, Callable

import numpy as np

import crowdgraph
from crowdgraph import wire
from crowdgraph.runtime import open_session, run_session

from . import common
from .common import Target, alternate, ratio_cell, show, stats, table

NAME = "transport"
CODECS: tuple[tuple[str, bool, str | None], ...] = (
    ("lz4", False, None), ("lz4", True, None), ("zlib", False, None), ("zlib", True, None), ("none", False, None),
    ("lz4", False, "fp16"), ("lz4", False, "int8"))
SPEED_TARGET = 20.0
CROWDIO_ZLIB_LEVEL = 6


def crowdio_encode(name: str, array: np.ndarray) -> bytes:
    """CROWDio's encoding: zlib level 6, base64, inside JSON."""
    data = base64.b64encode(zlib.compress(np.ascontiguousarray(array).tobytes(), CROWDIO_ZLIB_LEVEL))
    return json.dumps({"type": "task", "task": ["p1", 0], "tensors": [
        {"name": name, "dtype": array.dtype.str, "shape": list(array.shape), "data": data.decode("ascii")}]}).encode()


def crowdio_decode(text: bytes) -> dict[str, np.ndarray]:
    message = json.loads(text)
    return {t["name"]: np.frombuffer(zlib.decompress(base64.b64decode(t["data"])), np.dtype(t["dtype"]))
            .reshape(t["shape"]) for t in message["tensors"]}


def crowdgraph_encode(name: str, array: np.ndarray, codec: str, shuffle: bool, lossy: str | None = None) -> bytes:
    return wire.encode(wire.Message(wire.RUN, {"task": ["p1", 0], "outputs": ["y"]}, tensors={name: array}),
                       codec=codec, shuffle=shuffle, lossy=lossy)


def codec_label(codec: str, shuffle: bool, lossy: str | None) -> str:
    """``lz4``, ``zlib + shuffle``, ``fp16 + lz4``, ...

    >>> codec_label("lz4", False, "fp16"), codec_label("zlib", True, None)
    ('fp16 + lz4', 'zlib + shuffle')
    """
    return (f"{lossy} + " if lossy else "") + codec + (" + shuffle" if shuffle else "")


#: Label -> lossy encoding, for the rows of the lossy table.
LOSSY_LABELS = {codec_label(c, s, lossy): lossy for c, s, lossy in CODECS if lossy}


def output_error(case: common.ModelCase, batch: int, budget: str, lossy: str) -> dict[str, float]:
    """Max abs error of the model outputs when every tensor crossing a partition boundary is ``lossy``.

    The partitions run one after another; each reads its inputs from a
    frame (``wire.encode(..., lossy=lossy)`` then ``wire.decode``), as a
    worker would.  The reference is the same run with exact tensors.
    """
    feeds = case.inputs(batch)
    compiled = crowdgraph.compile(case.model, budget, sample=feeds)
    exact: dict[str, np.ndarray] = dict(feeds)
    lossy_values: dict[str, np.ndarray] = dict(feeds)
    for part in compiled.partitions:
        session = open_session(part.model_bytes)
        exact.update(run_session(session, {k: exact[k] for k in part.inputs}, part.outputs))
        received = {k: wire.decode(crowdgraph_encode(k, lossy_values[k], "lz4", False, lossy)).tensors[k]
                    for k in part.inputs}
        lossy_values.update(run_session(session, received, part.outputs))
    error = max(float(np.max(np.abs(lossy_values[k].astype(np.float64) - exact[k])))
                for k in compiled.output_names)
    scale = max(float(np.max(np.abs(exact[k]))) for k in compiled.output_names)
    return {"output_error": error, "max_abs_output": scale}


def boundary_tensors(case: common.ModelCase, batch: int, budget: str) -> list[tuple[str, str, np.ndarray]]:
    """(label, name, value) of the model inputs and the boundary tensors of one batch."""
    feeds = case.inputs(batch)
    compiled = crowdgraph.compile(case.model, budget, sample=feeds)
    values: dict[str, np.ndarray] = dict(feeds)
    order: list[str] = []
    for part in compiled.partitions:
        outputs = run_session(open_session(part.model_bytes), {k: values[k] for k in part.inputs}, part.outputs)
        values.update(outputs)
        order += [k for k in outputs if k not in compiled.output_names]
    picked = [(f"{k} (model input, padded)", k, feeds[k]) for k in feeds]
    hidden = [k for k in order if values[k].dtype == np.float32 and values[k].ndim == 3]
    others = [k for k in order if k not in hidden]
    if hidden:
        chosen = list(dict.fromkeys([hidden[0], hidden[len(hidden) // 2], hidden[-1]]))
        for k in chosen:
            where = {hidden[0]: "first", hidden[-1]: "last"}.get(k, "middle")
            picked.append((f"hidden state, {where} boundary", k, values[k]))
    picked += [(f"boundary tensor {k}", k, values[k]) for k in others]
    return picked


def _per_call(fn: Callable[[], Any], reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def _reps(fn: Callable[[], Any], floor_s: float) -> int:
    single = _per_call(fn, 1)
    return max(1, min(1000, math.ceil(floor_s / max(single, 1e-7))))


def run(quick: bool = False, out: pathlib.Path = common.RESULTS) -> dict[str, Any]:
    began = time.perf_counter()
    runs = 3 if quick else 9
    floor_s = 0.005 if quick else 0.05  # repeat fast calls so each measurement lasts this long
    batch = 8
    budget = "16MB" if quick else "128MB"
    case = common.model_cases(quick)[0]
    tensors = boundary_tensors(case, batch, budget)
    rows: list[dict[str, Any]] = []
    totals: dict[str, dict[str, list[float]]] = {}
    for label, name, value in tensors:
        ref = crowdio_encode(name, value)
        assert np.array_equal(crowdio_decode(ref)[name], value)

        def crowdio() -> None:
            crowdio_decode(crowdio_encode(name, value))

        reps_ref = _reps(crowdio, floor_s)
        for codec, shuffle, lossy in CODECS:
            frame = crowdgraph_encode(name, value, codec, shuffle, lossy)
            back = wire.decode(frame).tensors[name]
            error = float(np.max(np.abs(back.astype(np.float64) - value))) if value.size else 0.0
            assert lossy is not None or error == 0.0

            def ours() -> None:
                wire.decode(crowdgraph_encode(name, value, codec, shuffle, lossy))

            reps = _reps(ours, floor_s)
            res = alternate(lambda: _per_call(crowdio, reps_ref), lambda: _per_call(ours, reps), runs,
                            warmup=0, measure=lambda fn: fn())
            key = codec_label(codec, shuffle, lossy)
            rows.append({"tensor": label, "name": name, "shape": list(value.shape), "dtype": str(value.dtype),
                         "raw_bytes": value.nbytes, "codec": key, "lossy": lossy, "max_abs_error": error,
                         "bytes": len(frame), "crowdio_bytes": len(ref),
                         "bytes_ratio": len(frame) / len(ref), "seconds": res["b"], "crowdio_seconds": res["a"],
                         "speedup": res["ratio"]})
            t = totals.setdefault(key, {"ours": [0.0] * runs, "crowdio": [0.0] * runs, "bytes": [0], "ref": [0],
                                        "error": [0.0]})
            t["error"][0] = max(t["error"][0], error)
            t["ours"] = [x + y for x, y in zip(t["ours"], res["b_runs"])]
            t["crowdio"] = [x + y for x, y in zip(t["crowdio"], res["a_runs"])]
            t["bytes"][0] += len(frame)
            t["ref"][0] += len(ref)
    total_rows = []
    targets = []
    raw_total = sum(v.nbytes for _, _, v in tensors)
    for key, t in totals.items():
        speed = stats([c / o for c, o in zip(t["crowdio"], t["ours"])])
        row = {"tensor": "total (each tensor once)", "codec": key, "raw_bytes": raw_total, "bytes": t["bytes"][0],
               "crowdio_bytes": t["ref"][0], "bytes_ratio": t["bytes"][0] / t["ref"][0],
               "seconds": stats(t["ours"]), "crowdio_seconds": stats(t["crowdio"]), "speedup": speed}
        total_rows.append(row)
        row["max_abs_error"] = t["error"][0]
        if key != "none" and key not in LOSSY_LABELS:  # CROWDio is lossless: compare like with like
            targets.append(Target(NAME, f"{key}: encode + decode, times faster than CROWDio (all tensors)",
                                  speed["median"], SPEED_TARGET, ">=", "x"))
            targets.append(Target(NAME, f"{key}: bytes on the wire / CROWDio's (all tensors)",
                                  row["bytes_ratio"], 1.0, "<="))

    def cells(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["tensor"], r["codec"], r["raw_bytes"] / 1e6, r["bytes"] / 1e6,
                r["crowdio_bytes"] / 1e6, r["bytes_ratio"], r["seconds"]["median"] * 1e3,
                r["crowdio_seconds"]["median"] * 1e3, ratio_cell(r["speedup"]))

    headers = ["tensor", "codec", "raw MB", "wire MB", "CROWDio MB", "bytes ratio", "enc+dec ms",
               "CROWDio ms", "x faster [min-max]"]
    shapes = "; ".join(dict.fromkeys(f"{r['tensor']}: {r['dtype']} {r['shape']}" for r in rows))
    show(table(headers, [cells(r) for r in rows],
               title=f"Transport: {case.label}, batch {batch}x{case.sequence}, plan {budget}, "
                     f"median of {runs} alternating rounds"))
    show(f"({shapes})")
    show(table(headers, [cells(r) for r in total_rows], title="Transport totals"))
    lossy_rows = _lossy_rows(case, batch, budget, total_rows, totals)
    show(table(["encoding", "wire MB", "lz4 MB", "bytes / lz4", "enc+dec ms", "lz4 ms", "time / lz4 [min-max]",
                "worst tensor error", "output error", "largest output"],
               [(r["codec"], r["bytes"] / 1e6, r["lz4_bytes"] / 1e6, r["bytes_ratio"], r["seconds"] * 1e3,
                 r["lz4_seconds"] * 1e3, ratio_cell(r["time_ratio"]), f"{r['max_abs_error']:.3g}",
                 f"{r['output_error']:.3g}", f"{r['max_abs_output']:.3g}") for r in lossy_rows],
               title="Lossy wire against lz4 lossless (all tensors; output error over the whole batch)"))
    _plot(total_rows, out)
    return common.result(NAME, quick, config={"model": case.label, "batch": batch, "budget": budget, "runs": runs,
                                              "crowdio": f"zlib level {CROWDIO_ZLIB_LEVEL} + base64 in JSON",
                                              "zlib_level": getattr(wire, "_ZLIB_LEVEL", None)},
                         rows=rows, totals=total_rows, lossy=lossy_rows, targets=targets,
                         seconds=time.perf_counter() - began)


def _lossy_rows(case: common.ModelCase, batch: int, budget: str, total_rows: list[dict[str, Any]],
                totals: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """Each lossy encoding against lz4 lossless: bytes, time (per round), tensor and output error."""
    lz4 = next(r for r in total_rows if r["codec"] == "lz4")
    rows = []
    for r in total_rows:
        lossy = LOSSY_LABELS.get(r["codec"])
        if lossy is None:
            continue
        rows.append({"codec": r["codec"], "bytes": r["bytes"], "lz4_bytes": lz4["bytes"],
                     "bytes_ratio": r["bytes"] / lz4["bytes"], "seconds": r["seconds"]["median"],
                     "lz4_seconds": lz4["seconds"]["median"],
                     "time_ratio": stats([a / b for a, b in zip(totals[r["codec"]]["ours"], totals["lz4"]["ours"])]),
                     "max_abs_error": r["max_abs_error"], **output_error(case, batch, budget, lossy)})
    return rows


def _plot(total_rows: list[dict[str, Any]], out: pathlib.Path) -> None:
    plt = common.plt()
    if plt is None or not total_rows:
        return
    labels = [r["codec"] for r in total_rows] + ["CROWDio"]
    times = [r["seconds"]["median"] * 1e3 for r in total_rows] + [total_rows[0]["crowdio_seconds"]["median"] * 1e3]
    sizes = [r["bytes"] / 1e6 for r in total_rows] + [total_rows[0]["crowdio_bytes"] / 1e6]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    colours = ["tab:blue"] * len(total_rows) + ["tab:red"]
    a.barh(labels, times, color=colours)
    a.set_xlabel("encode + decode ms (all tensors)")
    b.barh(labels, sizes, color=colours)
    b.set_xlabel("MB on the wire (all tensors)")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "transport.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return common.module_main(NAME, run, __doc__, argv)


if __name__ == "__main__":
    main()
