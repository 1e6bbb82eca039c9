"""What runs inside a Dask worker: one resident onnxruntime session per worker.

These functions are submitted by :class:`crowdgraph_dask.DaskExecutor`,
pinned to one worker each.  The session a worker holds lives in worker-
local state (a :class:`~crowdgraph.runtime.ResidentSession` kept per
``distributed.Worker`` object, so several workers in one process keep
apart) between tasks.  Loading drops
the previous session first, so a worker never holds two partitions.

Each worker keeps the partitions it loaded on its local disk
(:class:`~crowdgraph_dask._cache.DiskCache`, one per worker), announces
them in :func:`probe` and loads from there when the executor sends no bytes.

Each task logs its measurements (worker clock, byte counts, RSS) as a Dask
event on the executor's topic; the tensors themselves stay on the worker
as the task's result until another task or the client fetches them.
"""

from __future__ import annotations

import hashlib
import threading
import time
import weakref
from typing import Any, Mapping, Sequence

import numpy as np

from crowdgraph.runtime import ResidentSession, TaskState, current_rss, peak_rss, tune_allocator

from ._cache import DiskCache, folder_for

#: Where a worker's partition cache lives and its bound: (``cache_dir`` or None, bytes; 0 turns it off).
CacheSpec = tuple[str | None, int]
#: No partition cache.
NO_CACHE: CacheSpec = (None, 0)

_SLOTS: "weakref.WeakKeyDictionary[Any, ResidentSession]" = weakref.WeakKeyDictionary()
_SLOTS_LOCK = threading.Lock()


def _slot(worker: Any = None) -> tuple[ResidentSession, Any]:
    """The session ``worker`` (default: the one running this task) holds, and the worker."""
    if worker is None:
        from distributed import get_worker

        worker = get_worker()
    with _SLOTS_LOCK:
        slot = _SLOTS.get(worker)
        if slot is None:
            tune_allocator()  # a process that runs partitions (crowdgraph.runtime)
            slot = _SLOTS[worker] = ResidentSession(where=f"Dask worker {worker.address}")
    return slot, worker


_CACHES: "weakref.WeakKeyDictionary[Any, DiskCache]" = weakref.WeakKeyDictionary()


def _cache(worker: Any, spec: CacheSpec) -> DiskCache | None:
    """``worker``'s partition cache as ``spec`` says (None when the bound is 0)."""
    cache_dir, max_bytes = spec
    if max_bytes <= 0:
        return None
    folder = folder_for(worker, cache_dir)
    with _SLOTS_LOCK:
        cache = _CACHES.get(worker)
        if cache is None or cache.folder != folder or cache.max_bytes != max_bytes:
            cache = _CACHES[worker] = DiskCache(folder, max_bytes)
    return cache


def _log(worker: Any, topic: str, msg: dict[str, Any]) -> None:
    worker.log_event(topic, msg)


def load_partition(topic: str, ident: str, model_bytes: Any, sha256: str, name: str, threads: int,
                   cache_spec: CacheSpec, fast: bool = False) -> bool:
    """Open the partition as this worker's one session (dropping the old one); False when it missed.

    With ``model_bytes`` None the partition comes from this worker's cache;
    when it is not there (or changed on disk) nothing is loaded, the event
    says ``missed`` and the executor sends the bytes.  Bytes that come
    along are checked against ``sha256`` and kept in the cache.  ``fast``
    opens it as a fast session (the worker's budget has room for one).
    """
    slot, worker = _slot()
    cache = _cache(worker, cache_spec)
    start = time.time()
    from_cache = model_bytes is None
    kept = False
    if from_cache:
        model_bytes = cache.get(sha256) if cache is not None else None
        if model_bytes is None:
            _log(worker, topic, {"id": ident, "start": start, "end": time.time(), "missed": True})
            return False
    else:
        if not isinstance(model_bytes, bytes):  # Dask may hand over a bytearray or memoryview
            model_bytes = bytes(model_bytes)
        got = hashlib.sha256(model_bytes).hexdigest()
        if got != sha256:
            raise ValueError(f"partition {name}: the bytes that arrived have sha256 {got}, not {sha256}")
        kept = cache is not None and cache.put(sha256, model_bytes)
    with slot.lock:
        slot.threads = threads
        slot.load(model_bytes, name, sha256, fast)
        end = time.time()
    del model_bytes
    _log(worker, topic, {"id": ident, "start": start, "end": end, "rss": current_rss(),
                         "from_cache": from_cache, "kept": kept, "fast": fast})
    return True


def unload_partition(topic: str, ident: str, sha256: str | None) -> bool:
    """Drop the session (only if it is ``sha256``, or any with None) and release its memory."""
    slot, worker = _slot()
    with slot.lock:
        dropped = False
        if sha256 is None or slot.sha256 == sha256:
            dropped = slot.unload()
    _log(worker, topic, {"id": ident, "start": time.time(), "end": time.time(), "rss": current_rss()})
    return dropped


def run_partition(topic: str, ident: str, sha256: str, name: str, outputs: Sequence[str], state: TaskState | None,
                  arrays: Mapping[str, np.ndarray], refs: Mapping[str, tuple[int, str | None]],
                  *results: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the resident session (with ``state``, what it keeps stays in it).

    ``refs`` maps input names to (index into ``results``, key in that
    result, or None when the result is the array itself).
    """
    slot, worker = _slot()
    feeds = dict(arrays)
    for tensor, (index, source) in refs.items():
        feeds[tensor] = results[index] if source is None else results[index][source]
    with slot.lock:
        start = time.time()
        out = slot.run(name, feeds, outputs, sha256=sha256, state=state)
        end = time.time()
    _log(worker, topic, {
        "id": ident, "start": start, "end": end,
        "in": {k: int(np.asarray(v).nbytes) for k, v in feeds.items()},
        "out": int(sum(v.nbytes for v in out.values())),
        "rss": current_rss(), "peak_rss": peak_rss(),
    })
    return out


def forget_state(keys: Sequence[str]) -> None:
    """Drop the state this worker's session keeps under ``keys``."""
    slot, _ = _slot()
    with slot.lock:
        slot.forget(keys)


def probe(cache_spec: CacheSpec = NO_CACHE, dask_worker: Any = None) -> dict[str, Any]:
    """This worker's clock, resident partition, cached partitions and memory (run with ``Client.run``)."""
    slot, worker = _slot(dask_worker)
    cache = _cache(worker, cache_spec)
    return {"time": time.time(), "sha256": slot.sha256, "name": slot.name, "rss": current_rss(),
            "cached": cache.digests() if cache is not None else []}


def pick(result: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """One tensor of a run's result, as its own Dask key (no copy)."""
    return result[name]
