"""DaskExecutor: a ``dask.distributed`` cluster as the crowd.

crowdgraph's scheduler still decides which worker runs what; Dask carries
it out and watches the workers.  Each Dask worker is one crowd worker
(its id is the worker's address).  ``Load``, ``Unload`` and ``Run`` become
``Client.submit`` calls pinned to that worker (``workers=[address],
allow_other_workers=False``, unique keys), the session a worker holds lives
in worker-local state between tasks, and tensors travel through Dask's own
worker-to-worker transfers: a task's outputs stay on its worker as the
task's result, and the values reported to the driver are
:class:`TensorHandle` objects (future, tensor name) that come back as
inputs of later ``run`` calls.

How actions map to Dask
-----------------------
All bookkeeping lives on the client's event loop thread (the driver's
calls hop onto it with ``loop.add_callback``), so it needs no locks.  It
is split by concern: the order of each worker's actions in ``_lanes``,
workers joining and leaving in ``_cluster``, which results the driver
still reads (and which are lost) in ``_results``; this module submits
actions and turns their outcomes into notices.

* every worker has a *lane*: the actions for it, carried out in order.  A
  ``Load``, ``Unload`` or reset waits until the worker's submitted runs
  finished, and runs wait for the load before them; up to ``prefetch``
  further runs of the resident partition are submitted while one runs, so
  Dask fetches their inputs in the meantime;
* a load first sends the partition's bytes to its worker alone with
  ``Client.scatter`` (once per load; released when the session is open),
  unless the worker announced the partition in its disk cache: then it
  reads it there (tier 2), and only if the cached copy is gone or changed
  do the bytes follow;
* each task logs its measurements (worker clock, bytes, RSS) as a Dask
  event on a topic of this executor; a future's done-callback and that
  event together become ``reporter.task_finished`` (or ``loaded`` ...);
* a worker that leaves the cluster (the scheduler's ``remove-worker``
  event on the worker's topic, or a poll of the scheduler's worker list,
  whichever comes first) is reported with ``reporter.worker_lost``; its
  unfinished futures are cancelled (a pinned task would otherwise wait for
  its worker forever), and finished results held only on it are reported
  with ``reporter.results_lost``.  Those futures are released, together
  with any submitted run that was waiting to read them (the driver places
  those again): releasing is what cancels a Dask future, without
  ``Client.cancel``'s cascade onto finished results that read it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import uuid
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from crowdgraph import Executor, Job, Partition, Reporter, TaskStats, WorkerInfo, parse_bytes
from crowdgraph.errors import ExecutionError, InputError, PlanningError
from crowdgraph.runtime import TaskState

from . import _worker
from ._cluster import ClusterWatch, leaving_error, running
from ._lanes import Lane, Pending
from ._results import Results, TensorHandle

logger = logging.getLogger("crowdgraph_dask")

#: Name of the Dask worker resource that sets a worker's crowdgraph budget (bytes).
MEMORY_RESOURCE = "crowdgraph_memory"

#: Seconds to wait for a task's measurements after its future finished.
STATS_GRACE = 5.0
#: Seconds ``reset``/``close`` wait for workers to drop their sessions.
RESET_TIMEOUT = 30.0
TaskKey = tuple[str, int]


class DaskExecutor(Executor):
    """Carry out crowdgraph's schedule on a ``dask.distributed`` cluster.

    Parameters
    ----------
    client:
        A synchronous ``distributed.Client``.  It stays the caller's: the
        executor never closes it (unless made by :meth:`from_url`).
    threads_per_worker:
        onnxruntime intra-op threads of each worker's session (Dask's own
        ``nthreads`` is not used: a crowd worker runs one task at a time).
    prefetch:
        Runs submitted to a worker beyond the one it is running, so Dask
        fetches their inputs meanwhile (0: one task at a time).
    poll_interval:
        Seconds between checks of the scheduler's worker list (joins, and
        departures the scheduler's events did not announce).
    cache_dir:
        Folder, on each worker's machine, under which every worker keeps the
        partitions it loaded (one subfolder per worker name), so they outlive
        the worker.  By default each worker keeps them in its Dask local
        directory, for as long as the worker lives.
    cache_size:
        Bytes of partitions each worker keeps ("1GB"), least recently used
        out first; 0 keeps none.  A later load of a kept partition reads it
        from the worker's disk (tier 2) instead of the network.

    Each worker's memory budget is its ``crowdgraph_memory`` resource when
    it declares one (``dask worker ... --resources crowdgraph_memory=64e6``),
    else its Dask ``memory_limit``.  Workers need crowdgraph and
    crowdgraph-dask installed.

    Examples
    --------
    >>> from dask.distributed import Client, LocalCluster      # doctest: +SKIP
    >>> with LocalCluster(n_workers=4, threads_per_worker=1) as cluster, Client(cluster) as client:
    ...     outputs = compiled.run(batch, executor=client)     # doctest: +SKIP
    """

    name = "dask"

    def __init__(self, client: Any, *, threads_per_worker: int = 1, prefetch: int = 1,
                 poll_interval: float = 0.5, cache_dir: str | os.PathLike[str] | None = None,
                 cache_size: int | str = "1GB", _owns_client: bool = False):
        if not self.accepts(client):
            raise InputError(f"DaskExecutor needs a distributed.Client, not {type(client).__name__}")
        if getattr(client, "asynchronous", False):
            raise InputError("DaskExecutor needs a synchronous Client; create it with asynchronous=False")
        if prefetch < 0:
            raise InputError(f"prefetch must be 0 or more, got {prefetch}")
        self.client = client
        self._owns_client = _owns_client
        self._threads = max(1, int(threads_per_worker))
        self._window = 1 + int(prefetch)
        self._topic = f"crowdgraph-{uuid.uuid4().hex[:12]}"
        self._cache_spec: _worker.CacheSpec = (None if cache_dir is None else os.fspath(cache_dir),
                                               parse_bytes(cache_size))
        # State below is only touched on the client's event loop thread.
        self._lanes: dict[str, Lane] = {}
        self._subscribed = False  # to this executor's topic of measurements
        self._pending: dict[str, Pending] = {}
        self._results = Results()
        self._watch = ClusterWatch(client, float(poll_interval), known=lambda: list(self._lanes),
                                   active=lambda: not self._closing and self._reporter is not None,
                                   joined=self._join, left=self._lose, cache_spec=self._cache_spec)
        self._reporter: Reporter | None = None
        self._job: Job | None = None
        self._closing = False
        self._closed = False

    # -- making one --------------------------------------------------------

    @classmethod
    def accepts(cls, obj: Any) -> bool:
        """True for a ``distributed.Client`` (without importing distributed)."""
        distributed = sys.modules.get("distributed")
        return distributed is not None and isinstance(obj, distributed.Client)

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 10.0, **kwargs: Any) -> "DaskExecutor":
        """Connect to the scheduler at ``dask://host:port``; the executor owns that Client.

        ``dask://tls://host:port`` keeps Dask's own scheme.
        """
        from distributed import Client

        scheme, sep, rest = url.partition("://")
        if scheme != "dask" or not sep or not rest:
            raise InputError(f"expected a URL such as 'dask://127.0.0.1:8786', got {url!r}")
        address = rest if "://" in rest else f"tcp://{rest}"
        try:
            client = Client(address, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise ExecutionError(
                f"cannot reach the Dask scheduler at {address} ({exc}); start one with "
                f"`dask scheduler` and workers with `dask worker {address}`"
            ) from exc
        return cls(client, _owns_client=True, **kwargs)

    # -- the executor protocol ---------------------------------------------

    def now(self) -> float:
        """Wall-clock seconds; worker times are shifted onto this clock."""
        return time.time()

    def start(self, job: Job, reporter: Reporter) -> list[WorkerInfo]:
        self._check_open()
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        workers = {a: w for a, w in workers.items() if running(w)}
        if not workers:
            raise PlanningError(
                "the Dask cluster has no workers; start some with `dask worker <scheduler address>` "
                "(or wait for them with client.wait_for_workers(n))"
            )
        t0 = time.time()
        probes = self.client.run(_worker.probe, self._cache_spec, workers=list(workers), on_error="return")
        t1 = time.time()
        for addr, result in list(probes.items()):
            if leaving_error(result):
                del probes[addr]  # it is leaving the cluster right now
            elif isinstance(result, BaseException):
                raise ExecutionError(
                    f"Dask worker {addr} cannot run crowdgraph tasks ({type(result).__name__}: {result}); "
                    "install crowdgraph and crowdgraph-dask on every worker"
                )
        if not probes:
            raise PlanningError("every Dask worker left the cluster while the run started; start workers again")
        return self.client.sync(self._astart, job, reporter, workers, probes, (t0 + t1) / 2, (t1 - t0) / 2)

    def load(self, worker: str, partition: Partition) -> None:
        self._post(worker, ("load", partition))

    def unload(self, worker: str, partition: str) -> None:
        self._post(worker, ("unload", partition))

    def run(self, worker: str, key: TaskKey, partition: Partition, inputs: Mapping[str, Any], *,
            state: TaskState | None = None) -> None:
        self._post(worker, ("run", tuple(key), partition, dict(inputs), state))

    def forget_state(self, worker: str, keys: Sequence[str]) -> None:
        self._post(worker, ("forget", list(keys)))

    def gather(self, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Fetch the arrays behind ``values`` (handles) to this process."""
        out = {n: np.asarray(v) for n, v in values.items() if not isinstance(v, TensorHandle)}
        handles = {n: v for n, v in values.items() if isinstance(v, TensorHandle)}
        if handles:
            futures = list({h.key: h.future for h in handles.values()}.values())
            fetched = self.client.sync(self._results.gather, self.client, futures)
            results = dict(zip((str(f.key) for f in futures), fetched))
            for n, h in handles.items():
                out[n] = np.asarray(h.value_of(results[h.key]))
        return {n: out[n] for n in values}

    def forget(self, values: Sequence[Any]) -> None:
        handles = [v for v in values if isinstance(v, TensorHandle)]
        if handles and not self._closed:
            self.client.loop.add_callback(self._results.forget, handles)

    def reset(self) -> None:
        """Cancel what is queued or running and drop every worker's session."""
        if self._closed or self.client.status not in ("running", "connecting"):
            return
        try:
            self.client.sync(self._areset, callback_timeout=RESET_TIMEOUT + 10)
        except Exception as exc:  # reset runs while an error propagates: never mask it
            logger.warning("crowdgraph-dask: reset did not finish: %s", exc)

    def close(self) -> None:
        """Drop every session, release every future and stop watching the cluster.

        The Client is closed only when :meth:`from_url` made it.
        """
        if self._closed:
            return
        self._closing = True
        try:
            if self.client.status in ("running", "connecting"):
                self.client.sync(self._aclose, callback_timeout=RESET_TIMEOUT + 10)
        except Exception as exc:
            logger.warning("crowdgraph-dask: close did not finish cleanly: %s", exc)
        finally:
            self._closed = True
            if self._owns_client:
                self.client.close()

    def __repr__(self) -> str:
        return f"<DaskExecutor {self.client.scheduler.address if self.client.scheduler else '?'}: {len(self._lanes)} workers>"

    # -- driver-thread helpers -----------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ExecutionError("this DaskExecutor is closed; make a new one")
        if self.client.status not in ("running", "connecting"):
            raise ExecutionError(f"the Dask client is {self.client.status}; connect it again")

    def _post(self, worker: str, action: tuple[Any, ...]) -> None:
        if not self._closed:
            self.client.loop.add_callback(self._apost, worker, action)

    # -- on the event loop: starting -----------------------------------------

    async def _astart(self, job: Job, reporter: Reporter, workers: Mapping[str, Any],
                      probes: Mapping[str, Any], mid: float, uncertainty: float) -> list[WorkerInfo]:
        self._reporter, self._job = reporter, job
        if not self._subscribed:
            self.client.subscribe_topic(self._topic, self._on_stats)
            self._subscribed = True
        for addr in list(self._lanes):
            if addr not in probes:
                self._drop_lane(self._lanes.pop(addr))
        self._results.release_all()
        self._results.lost_keys.clear()
        for addr, probe in probes.items():
            lane = self._lanes.get(addr)
            if lane is None:
                lane = self._add_lane(addr, workers[addr], probe, mid, uncertainty)
            else:
                lane.cached = set(probe["cached"])
                lane.info = self._info(addr, workers[addr], lane.cached)
            lane.sha256 = probe["sha256"]
        crowd, clear = self.crowd_for(job, [(self._lanes[addr].info, self._lanes[addr].sha256) for addr in probes])
        for addr in clear:  # a session this run does not use
            self._lanes[addr].actions.append(("reset",))
            self._pump(self._lanes[addr])
        self._watch.start()
        return crowd

    def _info(self, addr: str, w: Mapping[str, Any], cached: set[str]) -> WorkerInfo:
        assert self._job is not None
        resources = w.get("resources") or {}
        if resources.get(MEMORY_RESOURCE):
            memory = int(resources[MEMORY_RESOURCE])
        elif w.get("memory_limit"):
            memory = int(w["memory_limit"])
        else:  # no limit: any partition fits
            parts = self._job.partitions.values()
            memory = max([self._job.memory_budget or 0] + [p.resident_bytes for p in parts])
        names = frozenset(name for name, p in self._job.partitions.items() if p.sha256 in cached)
        return WorkerInfo(addr, memory=memory, speed=1.0, cached=names, keeps_state=True)

    def _add_lane(self, addr: str, w: Mapping[str, Any], probe: Mapping[str, Any],
                  mid: float, uncertainty: float) -> Lane:
        skew = float(probe["time"]) - mid
        cached = set(probe["cached"])
        lane = Lane(self._info(addr, w, cached), skew if abs(skew) > uncertainty + 0.005 else 0.0)
        lane.cached = cached
        self._lanes[addr] = lane
        self._watch.follow(addr)
        return lane

    # -- on the event loop: carrying actions out -----------------------------

    def _apost(self, addr: str, action: tuple[Any, ...]) -> None:
        lane = self._lanes.get(addr)
        if lane is None or lane.lost:
            return  # the worker is gone; the scheduler places its work again
        lane.actions.append(action)
        self._pump(lane)

    def _pump(self, lane: Lane) -> None:
        """Submit the lane's next actions as far as ordering allows."""
        while (action := lane.next_action(self._window)) is not None:
            kind = action[0]
            if kind == "run":
                _, key, part, inputs, state = action
                self._guarded(self._submit_run, lane, key, part, inputs, state)
            elif kind == "forget":  # after the runs before it; nothing waits for it
                from distributed import fire_and_forget

                fire_and_forget(self.client.submit(_worker.forget_state, action[1], workers=[lane.addr],
                                                   allow_other_workers=False, pure=False))
            elif kind == "load":
                part = action[1]
                self._start_load(lane, part, self.now(), from_cache=part.sha256 in lane.cached)
            else:
                self._guarded(self._submit_unload, lane, kind, action[1] if kind == "unload" else None)

    def _guarded(self, fn: Any, lane: Lane, *args: Any) -> None:
        try:
            fn(lane, *args)
        except Exception as exc:  # a bug or a refused submit: fail the run, never hang it
            logger.exception("crowdgraph-dask: submitting to %s failed", lane.addr)
            if self._reporter is not None and fn == self._submit_run:
                self._reporter.task_failed(lane.addr, args[0], f"{type(exc).__name__}: {exc}")

    def _submit_run(self, lane: Lane, key: TaskKey, part: Partition, inputs: Mapping[str, Any],
                    state: TaskState | None) -> None:
        futures: list[Any] = []
        index: dict[str, int] = {}
        refs: dict[str, tuple[int, str | None]] = {}
        arrays: dict[str, np.ndarray] = {}
        sources: dict[str, str | None] = {}
        for tensor, value in inputs.items():
            if isinstance(value, TensorHandle):
                fkey = value.key
                if fkey in self._results.lost_keys:
                    return  # its input was lost; the driver places this task again
                if fkey not in index:
                    index[fkey] = len(futures)
                    futures.append(value.future)
                refs[tensor] = (index[fkey], value.item)
                sources[tensor] = self._results.worker_of(fkey) or lane.addr
            else:
                arrays[tensor] = np.asarray(value)
                sources[tensor] = None
        ident = f"crowdgraph-{key[0]}-{key[1]}-{uuid.uuid4().hex[:12]}"
        kept = {o for o, _ in state.pairs if o not in state.shared} if state is not None and state.keep else set()
        pend = Pending("run", lane, ident, key=key, partition=part, name=part.name,
                       input_keys=frozenset(index), sources=sources,
                       outputs=tuple(o for o in part.outputs if o not in kept))
        pend.future = self.client.submit(
            _worker.run_partition, self._topic, ident, part.sha256, part.name, list(part.outputs), state,
            arrays, refs, *futures,
            key=ident, workers=[lane.addr], allow_other_workers=False, pure=False,
        )
        if len(pend.outputs) > 1:
            # One key per output tensor, so a consumer fetches only the tensors it reads
            # (Dask moves whole results).  They run on the same worker right after the run.
            pend.tensors = {
                name: self.client.submit(
                    _worker.pick, pend.future, name, key=f"{ident}-{n}", workers=[lane.addr],
                    allow_other_workers=False, pure=False, priority=1,
                )
                for n, name in enumerate(pend.outputs)
            }
        lane.runs[ident] = pend
        self._pending[ident] = pend
        pend.future.add_done_callback(self._done_callback)

    def _start_load(self, lane: Lane, part: Partition, t0: float, *, from_cache: bool) -> None:
        pend = Pending("load", lane, f"crowdgraph-load-{part.name}-{uuid.uuid4().hex[:12]}",
                       partition=part, name=part.name, t0=t0, from_cache=from_cache)
        lane.barrier = pend
        asyncio.ensure_future(self._aload(pend))

    async def _aload(self, pend: Pending) -> None:
        lane, part = pend.lane, pend.partition
        assert part is not None
        if pend.from_cache:  # the worker reads it from its disk
            if not lane.lost and lane.barrier is pend:  # not lost or reset meanwhile
                self._submit_load(pend, None)
            return
        try:
            [bytes_future] = await self.client.scatter([part.model_bytes], workers=[lane.addr], hash=False,
                                                       asynchronous=True)
        except Exception as exc:
            if lane.lost or lane.barrier is not pend:
                return
            lane.barrier = None
            if await self._watch.present(lane.addr):
                if self._reporter is not None:
                    self._reporter.load_failed(lane.addr, part.name, f"sending the partition failed: {exc}")
            else:
                await self._lose(lane.addr, "left the Dask cluster while a partition was sent to it")
            return
        if lane.lost or lane.barrier is not pend:  # lost or reset meanwhile
            bytes_future.release()
            return
        pend.bytes_future = bytes_future
        self._submit_load(pend, bytes_future)

    def _submit_load(self, pend: Pending, bytes_future: Any) -> None:
        lane, part = pend.lane, pend.partition
        assert part is not None
        try:
            pend.future = self.client.submit(
                _worker.load_partition, self._topic, pend.ident, bytes_future, part.sha256, part.name,
                self._threads, self._cache_spec, part.opens_fast(lane.info.memory),
                key=pend.ident, workers=[lane.addr], allow_other_workers=False, pure=False,
            )
        except Exception as exc:  # never leave the driver waiting for a load that was not sent
            self._unlink(pend)
            if self._reporter is not None:
                self._reporter.load_failed(lane.addr, part.name, f"{type(exc).__name__}: {exc}")
            return
        self._pending[pend.ident] = pend
        pend.future.add_done_callback(self._done_callback)

    def _submit_unload(self, lane: Lane, kind: Literal["unload", "reset"], name: str | None) -> Pending:
        ident = f"crowdgraph-{kind}-{uuid.uuid4().hex[:12]}"
        pend = Pending(kind, lane, ident, name=name)
        if kind == "reset":
            pend.waiter = asyncio.get_running_loop().create_future()
        sha = None
        if kind == "unload" and self._job is not None and name in self._job.partitions:
            sha = self._job.partitions[name].sha256
        lane.barrier = pend
        pend.future = self.client.submit(
            _worker.unload_partition, self._topic, ident, sha,
            key=ident, workers=[lane.addr], allow_other_workers=False, pure=False,
        )
        self._pending[ident] = pend
        pend.future.add_done_callback(self._done_callback)
        return pend

    # -- on the event loop: hearing back -------------------------------------

    def _done_callback(self, future: Any) -> None:
        """Runs on Dask's callback thread: read the outcome, then hop onto the loop."""
        if self._closed:
            return
        status, error, killed = future.status, None, False
        if status == "error":
            try:
                exc = future.exception(timeout=10)
                from distributed import KilledWorker

                killed = isinstance(exc, KilledWorker)
                error = f"{type(exc).__name__}: {exc}"
            except Exception as exc:
                error = f"the task failed and its error could not be read ({exc})"
        try:
            self.client.loop.add_callback(self._on_done, str(future.key), status, error, killed)
        except RuntimeError:  # the loop is closed
            pass

    def _on_stats(self, event: tuple[float, Mapping[str, Any]]) -> None:
        _, msg = event
        pend = self._pending.get(msg.get("id")) if isinstance(msg, Mapping) else None
        if pend is not None:
            pend.stats = dict(msg)
            self._maybe_complete(pend)

    def _on_done(self, ident: str, status: str, error: str | None, killed: bool) -> None:
        pend = self._pending.get(ident)
        if pend is None:
            return
        lane = pend.lane
        if status == "finished":
            pend.done = True
            self._maybe_complete(pend)
            return
        self._unlink(pend)
        if status == "error" and killed:
            asyncio.ensure_future(self._lose(lane.addr, f"Dask gave up on the worker ({error})"))
            return
        if self._reporter is not None and not self._closing:
            if status == "error":
                if pend.kind == "run":
                    assert pend.key is not None
                    self._reporter.task_failed(lane.addr, pend.key, error or "failed")
                elif pend.kind == "load":
                    self._reporter.load_failed(lane.addr, pend.name or "?", error or "failed")
                else:
                    logger.warning("crowdgraph-dask: %s on %s failed: %s", pend.kind, lane.addr, error)
            elif status == "cancelled" and pend.kind in ("run", "load"):
                why = "the Dask future was cancelled outside crowdgraph (or the client lost the scheduler)"
                if pend.kind == "run":
                    assert pend.key is not None
                    self._reporter.task_failed(lane.addr, pend.key, why)
                else:
                    self._reporter.load_failed(lane.addr, pend.name or "?", why)
        self._pump(lane)

    def _maybe_complete(self, pend: Pending) -> None:
        if not pend.done or self._pending.get(pend.ident) is not pend:
            return
        if pend.stats is None and pend.kind != "reset":
            if not pend.grace:
                pend.grace = True
                asyncio.get_running_loop().call_later(STATS_GRACE, self._complete_late, pend)
            return
        self._complete(pend)

    def _complete_late(self, pend: Pending) -> None:
        if self._pending.get(pend.ident) is pend and pend.stats is None:
            logger.warning("crowdgraph-dask: no measurements arrived for %s; reporting without them", pend.ident)
            pend.stats = {}
            self._complete(pend)

    def _complete(self, pend: Pending) -> None:
        lane, stats = pend.lane, pend.stats or {}
        self._unlink(pend, keep=pend.kind == "run")
        now = self.now()
        end = float(stats["end"]) - lane.offset if "end" in stats else now
        start = min(float(stats["start"]) - lane.offset, end) if "start" in stats else end
        reporter = self._reporter
        if pend.kind == "run":
            part, key = pend.partition, pend.key
            assert part is not None and key is not None
            if pend.tensors is None:
                handles = {n: TensorHandle(pend.future, n, n) for n in pend.outputs}
            else:
                handles = {n: TensorHandle(f, n) for n, f in pend.tensors.items()}
                pend.future.release()  # the tensors' own futures keep what is needed
            self._results.hold(pend.ident, handles, lane.addr, key)
            sizes = stats.get("in") or {}
            wire_in = sum(int(sizes.get(t, 0)) for t, src in pend.sources.items() if src != lane.addr)
            if reporter is not None:
                reporter.task_finished(lane.addr, key, dict(handles), TaskStats(
                    start, end, bytes_in=int(sum(sizes.values())), bytes_out=int(stats.get("out", 0)),
                    wire_in=wire_in, wire_out=0, peak_rss=stats.get("peak_rss"), rss=stats.get("rss")))
        elif pend.kind == "load":
            part = pend.partition
            assert part is not None
            if stats.get("missed"):  # no longer in the worker's cache (or changed there): send the bytes
                logger.info("crowdgraph-dask: %s no longer caches %s; sending its bytes", lane.addr, part.name)
                lane.cached.discard(part.sha256)
                self._start_load(lane, part, pend.t0, from_cache=False)
                return
            lane.sha256 = part.sha256
            if pend.from_cache or stats.get("kept"):
                lane.cached.add(part.sha256)
            if pend.bytes_future is not None:
                pend.bytes_future.release()
                pend.bytes_future = None
            if reporter is not None:
                reporter.loaded(lane.addr, part.name, start=min(pend.t0, end), end=end,
                                bytes_sent=0 if pend.from_cache else len(part.model_bytes),
                                from_cache=pend.from_cache, rss=stats.get("rss"), fast=stats.get("fast", False))
        else:
            lane.sha256 = None
            if pend.kind == "unload" and reporter is not None:
                reporter.unloaded(lane.addr, pend.name or "?", rss=stats.get("rss"))
        self._pump(lane)

    def _unlink(self, pend: Pending, keep: bool = False) -> None:
        """Take a finished, failed or dropped action off its lane (releasing its future unless ``keep``)."""
        if pend.future is not None and not keep:
            pend.future.release()
            for tensor_future in (pend.tensors or {}).values():
                tensor_future.release()
        if self._pending.get(pend.ident) is pend:
            del self._pending[pend.ident]
        lane = pend.lane
        lane.runs.pop(pend.ident, None)
        if lane.barrier is pend:
            lane.barrier = None
        if pend.bytes_future is not None:
            pend.bytes_future.release()
            pend.bytes_future = None
        if pend.waiter is not None and not pend.waiter.done():
            pend.waiter.set_result(None)

    # -- on the event loop: workers coming and going --------------------------

    def _join(self, addr: str, w: Mapping[str, Any], probe: Mapping[str, Any], mid: float,
              uncertainty: float) -> None:
        """A new worker (probed by the cluster watch) joins the crowd, with the partitions it caches."""
        assert self._reporter is not None
        lane = self._add_lane(addr, w, probe, mid, uncertainty)
        if probe.get("sha256"):
            lane.actions.append(("reset",))
            self._pump(lane)
        self._reporter.worker_joined(lane.info)

    async def _lose(self, addr: str, reason: str) -> None:
        """``addr`` is gone: report it, cancel its work, give up results only it held."""
        lane = self._lanes.pop(addr, None)
        if lane is None or lane.lost:
            return
        lane.lost = True  # the scheduler no longer lists it: if the address comes back, it is a new worker
        if self._reporter is not None and not self._closing:
            self._reporter.worker_lost(addr, f"Dask worker {addr} {reason}")
        self._drop_lane(lane)
        held = self._results.held_on(addr)
        lost: list[str] = []
        if held:
            keys = [f.key for h in held.values() for f in h.futures()]
            try:
                who = await self.client.scheduler.who_has(keys=keys)
            except Exception:
                who = {}
            for ident, h in held.items():
                replicas = [{w for w in who.get(f.key, ()) if w != addr and w in self._lanes} for f in h.futures()]
                if all(replicas):
                    h.worker = sorted(replicas[0])[0]  # copies survive elsewhere: nothing to recompute
                else:
                    lost.append(ident)
        pumps = set()
        if lost:
            tasks, lost_keys = self._results.give_up(lost)
            for pend in list(self._pending.values()):
                if pend.kind == "run" and pend.input_keys & lost_keys:
                    self._unlink(pend)  # waiting for data that is gone: the driver places it again
                    pumps.add(pend.lane)
            if self._reporter is not None and not self._closing:
                self._reporter.results_lost(tasks)
        for other in pumps:
            if not other.lost:
                self._pump(other)

    # -- on the event loop: reset and close ----------------------------------

    def _drop_lane(self, lane: Lane) -> None:
        """Forget a lane's queued and submitted actions.

        Releasing a future is what cancels it: the client marks it cancelled
        and the scheduler forgets the task (nothing else wants it), so a task
        pinned to a lost worker never waits for it.
        """
        for pend in [p for p in self._pending.values() if p.lane is lane]:
            self._unlink(pend)
        if lane.barrier is not None:  # a load still sending its bytes
            self._unlink(lane.barrier)
        lane.actions.clear()

    async def _areset(self) -> None:
        for lane in self._lanes.values():
            self._drop_lane(lane)
        self._results.release_all()
        waiters = [self._submit_unload(lane, "reset", None).waiter for lane in self._lanes.values()]
        if waiters:
            await asyncio.wait(waiters, timeout=RESET_TIMEOUT)

    async def _aclose(self) -> None:
        self._closing = True
        await self._areset()
        self._watch.stop()
        if self._subscribed:
            self.client.unsubscribe_topic(self._topic)
            self._subscribed = False
        for pend in list(self._pending.values()):
            self._unlink(pend)
        self._pending.clear()
        self._lanes.clear()
        self._reporter = None
