"""Measure what a partition really costs: peak RSS in a fresh process.

The budget promise of :mod:`crowdgraph.partition` is checked this way:
a new Python process imports numpy and onnxruntime, reads the boundary
tensors once and drops them, runs one tiny warm-up session
(:func:`crowdgraph.runtime.warm_up`, onnxruntime's once-cost, as a worker
does before it announces its floor), notes its RSS (the *floor*), opens
the partition from its plan file, reads the boundary tensors again, runs
it once on them, and reports its peak RSS.  ``peak - floor`` must not
exceed the partition's estimate.

The first read is there so that the reader's own code (numpy's npz path)
is in the floor: a page fault in a shared library maps the whole page-cache
folio around it, up to 2 MB when the library file was last read
sequentially, so code first run after the floor measured up to 2.1 MB
that depends on the machine's page cache and not on the partition
(docs/partitioning.md).

Run as ``python -m crowdgraph.measure PARTITION.onnx INPUTS.npz [--cold] [--fast]`` it prints
one JSON object: ``cold_floor`` (the RSS before the warm-up), ``floor``,
``peak``, ``above_floor`` (bytes), ``file_added`` (how much of the RSS
after the run, against the floor, is file-backed: library code and mapped
files, which the estimate's runtime part must cover too) and ``seconds``.
With ``--cold`` the warm-up is skipped, so ``above_floor`` includes the
once-cost; with ``--fast`` the partition is opened as a fast session.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
from typing import Mapping

import numpy as np


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux only)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset() -> int:
    """Peak RSS in bytes since the last :func:`reset_peak_rss` (or since start)."""
    from .runtime import peak_rss

    return peak_rss()


class RssSampler:
    """Polls processes' RSS from outside on a thread, as an out-of-memory killer would see them.

    ``peak`` holds each process's largest RSS seen (bytes), ``hertz`` the
    sweeps over all of them per second (set on exit).  Reads ``/proc``, so
    Linux only.

    >>> with RssSampler({"me": os.getpid()}) as sampler:
    ...     ballast = bytearray(20_000_000)
    ...     time.sleep(0.05)
    >>> sampler.peak["me"] > 20_000_000 and sampler.hertz > 0
    True
    """

    def __init__(self, pids: Mapping[str, int], period: float = 0.002):
        from .runtime import current_rss

        self._rss, self.pids, self.period = current_rss, dict(pids), period
        self.peak = {name: current_rss(pid) for name, pid in self.pids.items()}
        self.samples, self.hertz = 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], self._rss(pid))
            self.samples += 1
            self._stop.wait(self.period)

    def __enter__(self) -> "RssSampler":
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.hertz = self.samples / (time.perf_counter() - self._started)


def measure_in_fresh_process(model_file: str | os.PathLike, feeds: Mapping[str, np.ndarray], timeout: float = 300,
                             warm: bool = True, fast: bool = False) -> dict:
    """Peak RSS of loading and running ``model_file`` once, in a new process.

    ``warm=False`` skips the warm-up session, so the figure above the
    floor includes onnxruntime's once-cost; ``fast=True`` opens a fast
    session (:func:`crowdgraph.runtime.session_options`).
    """
    with tempfile.TemporaryDirectory() as tmp:
        npz = pathlib.Path(tmp) / "inputs.npz"
        np.savez(npz, **dict(feeds))
        done = subprocess.run(
            [sys.executable, "-m", "crowdgraph.measure", os.fspath(model_file), str(npz)]
            + ([] if warm else ["--cold"]) + (["--fast"] if fast else []),
            capture_output=True, text=True, timeout=timeout, check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"measuring {model_file} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_plan(compiled, feeds: Mapping[str, np.ndarray], folder: str | os.PathLike, warm: bool = True,
                 fast: bool = False) -> list[dict]:
    """Measure every partition of ``compiled`` on ``feeds``, each in a fresh process.

    The plan is saved to ``folder``; boundary tensors come from running the
    partitions in order in this process.  Returns one row a partition:
    ``partition``, ``estimate`` (of a fast session with ``fast=True``),
    ``cold_floor``, ``floor``, ``peak``, ``above_floor``.
    """
    from .runtime import open_session, run_session

    plan = compiled.save(folder)
    values = dict(feeds)
    rows = []
    for part in compiled.partitions:
        part_feeds = {name: values[name] for name in part.inputs}
        measured = measure_in_fresh_process(plan / f"{part.name}.onnx", part_feeds, warm=warm, fast=fast)
        rows.append({"partition": part.name, "estimate": part.fast_resident_bytes if fast else part.resident_bytes,
                     **measured})
        values.update(run_session(open_session(part.model_bytes), part_feeds))
    return rows


def _read_inputs(npz: str) -> dict[str, np.ndarray]:
    """The boundary tensors saved by :func:`measure_in_fresh_process`."""
    with np.load(npz) as data:
        return {k: data[k] for k in data.files}


def _main(argv: list[str]) -> None:
    import onnx  # noqa: F401  (part of the floor: workers write received partitions with it)
    import onnxruntime  # noqa: F401  (part of the floor)

    from .runtime import (current_rss, file_backed_rss, open_session, release_memory, run_session, tune_allocator,
                          warm_up)

    cold, fast = "--cold" in argv, "--fast" in argv
    model_file, npz = [a for a in argv if a not in ("--cold", "--fast")]
    tune_allocator()
    # The reader's code into the floor (see the module docstring): read once, drop.
    _read_inputs(npz)
    release_memory()
    cold_floor = current_rss()
    if not cold:
        warm_up()
    floor, file_floor = current_rss(), file_backed_rss()
    reset_peak_rss()
    start = time.perf_counter()
    session = open_session(model_file, fast=fast)
    feeds = _read_inputs(npz)
    run_session(session, feeds)
    seconds = time.perf_counter() - start
    peak = peak_rss_since_reset()
    print(json.dumps({"cold_floor": cold_floor, "floor": floor, "peak": peak, "above_floor": peak - floor,
                      "file_added": file_backed_rss() - file_floor, "seconds": seconds}))


if __name__ == "__main__":
    _main(sys.argv[1:])
