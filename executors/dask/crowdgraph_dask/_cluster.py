"""Cluster watching: Dask workers joining and leaving, told to the executor.

Two sources, whichever comes first: the Dask scheduler's ``remove-worker``
event on each known worker's topic, and a poll of the scheduler's worker
list every ``interval`` seconds (joins, and departures no event
announced).  A new worker is probed first (its clock, whether it can run
crowdgraph tasks, what it holds in memory and in its cache); one that cannot is never asked again.
Everything here runs on the client's event loop thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any, Awaitable, Callable, Iterable, Mapping

from . import _worker

logger = logging.getLogger("crowdgraph_dask")

#: Dask worker states of a worker on its way out.
LEAVING = {"closing_gracefully", "closing", "closed", "failed"}


def leaving_error(result: Any) -> bool:
    """Whether ``result`` is the error of a worker that could not be reached (it is leaving)."""
    return isinstance(result, (OSError, TimeoutError)) or type(result).__name__ == "CommClosedError"


def running(worker: Mapping[str, Any]) -> bool:
    """Whether the scheduler's record of a worker says it stays (no status counts as running).

    >>> running({"status": "running"}), running({}), running({"status": "closing_gracefully"})
    (True, True, False)
    """
    return worker.get("status", "running") not in LEAVING


#: ``joined(address, scheduler record, probe, clock midpoint, clock uncertainty)``
Joined = Callable[[str, Mapping[str, Any], Mapping[str, Any], float, float], None]
#: ``left(address, reason)``
Left = Callable[[str, str], Awaitable[None]]


class ClusterWatch:
    """Tells ``joined``/``left`` of workers that come and go while ``active()`` holds.

    ``known()`` lists the workers the executor uses now.
    """

    def __init__(self, client: Any, interval: float, *, known: Callable[[], Iterable[str]],
                 active: Callable[[], bool], joined: Joined, left: Left,
                 cache_spec: _worker.CacheSpec = _worker.NO_CACHE):
        self.client = client
        self.cache_spec = cache_spec
        self.interval = interval
        self.known, self.active, self.joined, self.left = known, active, joined, left
        #: Workers that cannot run crowdgraph tasks (crowdgraph-dask missing there).
        self.unusable: set[str] = set()
        self._joining: set[str] = set()
        self._topics: set[str] = set()
        self._poller: Any = None

    def follow(self, addr: str) -> None:
        """Hear of ``addr`` leaving from the scheduler's event on its topic."""
        self.unusable.discard(addr)
        if addr not in self._topics:
            self.client.subscribe_topic(addr, functools.partial(self._on_event, addr))
            self._topics.add(addr)

    def start(self) -> None:
        """Poll the scheduler's worker list from now on (once started, it keeps polling)."""
        if self._poller is None and self.interval > 0:
            from tornado.ioloop import PeriodicCallback

            self._poller = PeriodicCallback(self.poll, self.interval * 1000)
            self._poller.start()

    def stop(self) -> None:
        """Stop polling and listening."""
        if self._poller is not None:
            self._poller.stop()
            self._poller = None
        for topic in self._topics:
            self.client.unsubscribe_topic(topic)
        self._topics.clear()

    def _on_event(self, addr: str, event: tuple[float, Any]) -> None:
        _, msg = event
        if isinstance(msg, Mapping) and msg.get("action") == "remove-worker":
            asyncio.ensure_future(self.left(addr, "left the Dask cluster"))

    async def present(self, addr: str) -> bool:
        """Whether the scheduler lists ``addr`` as staying (False when it cannot be asked)."""
        try:
            ident = await self.client.scheduler.identity(n_workers=-1)
        except Exception:
            return False
        w = ident["workers"].get(addr)
        return w is not None and running(w)

    async def poll(self) -> None:
        """Compare the scheduler's worker list with the known workers once."""
        if not self.active():
            return
        try:
            ident = await self.client.scheduler.identity(n_workers=-1)
        except Exception:
            return  # the scheduler is unreachable for now; Dask reconnects or the driver times out
        workers = ident["workers"]
        known = set(self.known())
        for addr in known:
            w = workers.get(addr)
            if w is None:
                await self.left(addr, "left the Dask cluster")
            elif not running(w):
                await self.left(addr, f"is leaving the Dask cluster ({w['status']})")
        for addr, w in workers.items():
            if (addr not in known and addr not in self.unusable and addr not in self._joining
                    and w.get("status", "running") == "running"):
                self._joining.add(addr)
                try:
                    await self._probe(addr, w)
                finally:
                    self._joining.discard(addr)

    async def _probe(self, addr: str, w: Mapping[str, Any]) -> None:
        t0 = time.time()
        try:
            probes = await self.client.run(_worker.probe, self.cache_spec, workers=[addr], on_error="return",
                                           asynchronous=True)
        except Exception as exc:
            logger.warning("crowdgraph-dask: new worker %s could not be probed: %s", addr, exc)
            return
        t1 = time.time()
        probe = probes.get(addr)
        if probe is None or leaving_error(probe):
            return  # already gone again
        if not isinstance(probe, Mapping):
            logger.warning("crowdgraph-dask: worker %s cannot run crowdgraph tasks (%s); not using it", addr, probe)
            self.unusable.add(addr)
            return
        if self.active() and addr not in set(self.known()):
            self.joined(addr, w, probe, (t0 + t1) / 2, (t1 - t0) / 2)
