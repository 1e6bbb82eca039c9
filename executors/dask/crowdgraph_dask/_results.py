"""Result ownership: which finished run's outputs the driver may still read, and which are lost.

A task's outputs stay on its Dask worker as the result of its future; the
driver holds :class:`TensorHandle` objects for them.  :class:`Results`
keeps each run's futures alive until the driver forgets every tensor of
it, knows which worker holds them, and, when that worker leaves with the
only copy, marks them lost so that nothing waits for them (a fetch raises
:class:`~crowdgraph.errors.WorkerLostError`, the driver computes them
again).  Everything here runs on the client's event loop thread.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Sequence

from crowdgraph.errors import ExecutionError, WorkerLostError

TaskKey = tuple[str, int]


class TensorHandle:
    """One output tensor of a finished task; the data stays on its Dask worker.

    The executor reports these as task outputs; the driver hands them back
    as inputs of later tasks, and :meth:`DaskExecutor.gather` fetches them.
    ``future`` holds the array itself, or (``item`` set) a dict holding it
    under ``item``.
    """

    __slots__ = ("future", "name", "item")

    def __init__(self, future: Any, name: str, item: str | None = None):
        self.future = future
        self.name = name
        self.item = item

    @property
    def key(self) -> str:
        """The Dask key of the result holding this tensor."""
        return str(self.future.key)

    def value_of(self, result: Any) -> Any:
        """This tensor, out of its future's result."""
        return result if self.item is None else result[self.item]

    def __repr__(self) -> str:
        return f"<TensorHandle {self.name!r} of {self.key} ({self.future.status})>"


@dataclass(eq=False)
class Held:
    """A finished run's outputs the driver may still read."""

    handles: dict[str, TensorHandle]
    worker: str
    key: TaskKey
    names: set[str]  # not forgotten yet

    def futures(self) -> list[Any]:
        """The distinct futures behind the handles."""
        return list({h.key: h.future for h in self.handles.values()}.values())


class Results:
    """The runs whose outputs are held, by run ident, and the Dask keys lost with a worker."""

    def __init__(self) -> None:
        self._held: dict[str, Held] = {}
        self._owner: dict[str, str] = {}  # Dask key of a tensor's future -> run ident
        #: Dask keys whose data left with a worker.
        self.lost_keys: set[str] = set()
        self._gathers: dict[Any, frozenset[str]] = {}  # waiter -> keys it fetches

    def hold(self, ident: str, handles: dict[str, TensorHandle], worker: str, key: TaskKey) -> None:
        """Keep run ``ident``'s outputs (on ``worker``) until the driver forgets them."""
        self._held[ident] = Held(handles, worker, key, set(handles))
        for h in handles.values():
            self._owner[h.key] = ident

    def worker_of(self, dask_key: str) -> str | None:
        """The worker holding the result ``dask_key``, when it is held."""
        held = self._held.get(self._owner.get(dask_key, ""))
        return held.worker if held is not None else None

    def forget(self, handles: Sequence[TensorHandle]) -> None:
        """The driver no longer reads ``handles``; a run none of whose tensors it reads is released."""
        for h in handles:
            ident = self._owner.get(h.key)
            held = self._held.get(ident) if ident is not None else None
            if held is None:
                continue
            held.names.discard(h.name)
            if not held.names:
                self._drop(ident)  # type: ignore[arg-type]

    def _drop(self, ident: str) -> Held:
        held = self._held.pop(ident)
        for f in held.futures():
            self._owner.pop(str(f.key), None)
            f.release()
        return held

    def release_all(self) -> None:
        """Release every held run (a reset, the start of a run)."""
        for ident in list(self._held):
            self._drop(ident)

    def held_on(self, worker: str) -> dict[str, Held]:
        """The held runs whose outputs live on ``worker``."""
        return {ident: h for ident, h in self._held.items() if h.worker == worker}

    def give_up(self, idents: Sequence[str]) -> tuple[list[TaskKey], set[str]]:
        """Runs ``idents`` lost their only copy: release them, mark their keys lost, wake fetches of them.

        Returns the lost tasks and their Dask keys.
        """
        gone = [self._drop(ident) for ident in idents if ident in self._held]
        keys = {str(f.key) for h in gone for f in h.futures()}
        self.lost_keys |= keys
        for waiter, wanted in list(self._gathers.items()):
            if wanted & keys and not waiter.done():
                waiter.set_result(None)
        return sorted(h.key for h in gone), keys

    async def gather(self, client: Any, futures: list[Any]) -> list[Any]:
        """The results of ``futures``; raises WorkerLostError when one is lost meanwhile."""
        keys = frozenset(str(f.key) for f in futures)
        if keys & self.lost_keys:
            raise WorkerLostError(_gone_message(keys & self.lost_keys))
        lost = asyncio.get_running_loop().create_future()
        self._gathers[lost] = keys
        task = asyncio.ensure_future(client.gather(futures, asynchronous=True))
        try:
            await asyncio.wait([task, lost], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._gathers.pop(lost, None)
        if not task.done():
            task.cancel()
            raise WorkerLostError(_gone_message(keys & self.lost_keys))
        try:
            return task.result()
        except Exception as exc:
            raise ExecutionError(f"fetching the model outputs from the Dask workers failed: "
                                 f"{type(exc).__name__}: {exc}") from exc


def _gone_message(keys: frozenset[str]) -> str:
    return (f"outputs {sorted(keys)} were lost with their Dask worker before they were fetched; "
            "run the batch again")
