"""The one place crowdgraph opens onnxruntime sessions.

Every executor (threads, TCP workers, Dask workers) and every measurement
opens partitions through :func:`open_session`, so all of them run with the
same options, and the memory estimate of :mod:`crowdgraph.partition` holds
for all of them:

* no CPU memory arena: memory freed by a closed session goes back to the
  allocator (and, with :func:`release_memory`, to the operating system)
  instead of staying reserved in the arena;
* no weight pre-packing: pre-packed MatMul weights would be a second copy
  of the largest tensors of a partition;
* basic graph optimisations only: the extended fusions build new
  initializers next to the old ones while a session loads;
* on glibc, blocks of 64 KiB and more are allocated with mmap (a fixed
  ``M_MMAP_THRESHOLD``): freed tensors go straight back to the operating
  system instead of fragmenting the heap, which otherwise keeps resident
  memory up to twice the live tensors (measured).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import ModelError

#: Options that keep a session's resident memory close to the estimate.
SESSION_CONFIG = {"session.disable_prepacking": "1"}


def session_options(threads: int = 1) -> Any:
    """onnxruntime SessionOptions used for every partition session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # errors reach users as crowdgraph errors instead
    for key, value in SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    return options


#: glibc's mallopt parameter number for M_MMAP_THRESHOLD.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 * 2**10
_allocator_tuned = False


def tune_allocator() -> None:
    """Fix glibc's mmap threshold (once per process; a no-op elsewhere)."""
    global _allocator_tuned
    if _allocator_tuned:
        return
    _allocator_tuned = True
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def open_session(model: bytes | str | os.PathLike, threads: int = 1) -> Any:
    """Open an onnxruntime session on serialized model bytes or a model file.

    A file keeps its weights in external data next to it, which
    onnxruntime reads without a second copy in Python.  Errors become
    :class:`ModelError` saying which model failed.
    """
    import onnxruntime as ort

    tune_allocator()
    source = model if isinstance(model, bytes) else os.fspath(model)
    try:
        return ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        where = "model bytes" if isinstance(model, bytes) else str(model)
        raise ModelError(f"onnxruntime cannot load {where}: {exc}") from exc


def run_session(session: Any, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Run ``session`` and return its outputs by name (exceptions pass through)."""
    names = list(outputs) if outputs is not None else [o.name for o in session.get_outputs()]
    values = session.run(names, dict(feeds))
    return dict(zip(names, values))


def release_memory() -> None:
    """Give freed heap memory back to the operating system where possible.

    glibc keeps freed blocks for reuse; ``malloc_trim`` returns them, so a
    worker that unloads a partition really shrinks.  A no-op elsewhere.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim(0)


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (0 where unknown).

    Linux's ``VmHWM`` first: ``ru_maxrss`` survives ``exec``, so a worker
    process started by another would report its parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if os.uname().sysname == "Darwin" else int(peak) * 1024


def current_rss() -> int:
    """Current resident set size of this process in bytes (0 where unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
