"""Lane ordering: each Dask worker's actions, submitted in the scheduler's order.

Dask runs whatever is submitted as soon as its inputs are there; crowdgraph
needs a worker's Load, Unload and Run to happen in the order the scheduler
gave them.  A :class:`Lane` queues one worker's actions and says which may
be submitted now (:meth:`Lane.next_action`): a load, an unload or a reset
waits until the worker's submitted runs finished and blocks everything
after it until it is over; up to ``window`` runs of the resident partition
are submitted at once, so Dask fetches the inputs of the next while one
runs.  No I/O here; the executor submits what it is given.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from crowdgraph import Partition, WorkerInfo

TaskKey = tuple[str, int]
#: What a lane carries out.
ActionKind = Literal["run", "load", "unload", "reset"]


@dataclass(eq=False)
class Pending:
    """A submitted (or about to be submitted) action of one lane."""

    kind: ActionKind
    lane: "Lane"
    ident: str
    future: Any = None
    key: TaskKey | None = None
    partition: Partition | None = None
    name: str | None = None
    t0: float = 0.0
    from_cache: bool = False  # a load the worker reads from its disk cache
    bytes_future: Any = None
    input_keys: frozenset[str] = frozenset()
    outputs: tuple[str, ...] = ()  # a run's outputs that come back (not those its worker keeps)
    tensors: dict[str, Any] | None = None  # output name -> its own future (partitions with several outputs)
    sources: dict[str, str | None] = field(default_factory=dict)  # input -> producer worker (None: client)
    done: bool = False
    stats: dict[str, Any] | None = None
    grace: bool = False
    waiter: Any = None  # asyncio.Future resolved when the action is over


class Lane:
    """One Dask worker as a crowd worker: its info and its actions, in order."""

    def __init__(self, info: WorkerInfo, offset: float):
        self.addr = info.id
        self.info = info
        self.offset = offset  # worker clock minus client clock
        #: Actions not submitted yet: ("run", key, partition, inputs, state), ("load", partition),
        #: ("unload", name), ("forget", keys) or ("reset",).
        self.actions: deque[tuple[Any, ...]] = deque()
        #: Submitted runs not finished yet, by ident.
        self.runs: dict[str, Pending] = {}
        #: The submitted load, unload or reset everything else waits for.
        self.barrier: Pending | None = None
        self.sha256: str | None = None
        #: sha256 of the partitions in the worker's disk cache, as far as this side knows.
        self.cached: set[str] = set()
        self.lost = False

    def next_action(self, window: int) -> tuple[Any, ...] | None:
        """Take the next action that may be submitted now off the queue, or None while ordering says wait.

        >>> lane = Lane(WorkerInfo("w", 1), 0.0)
        >>> lane.actions.extend([("run", ("p0", 0)), ("run", ("p0", 1)), ("unload", "p0")])
        >>> lane.next_action(window=1)
        ('run', ('p0', 0))
        >>> lane.runs["r0"] = Pending("run", lane, "r0")
        >>> lane.next_action(window=1) is None          # the window is full
        True
        >>> lane.next_action(window=2)
        ('run', ('p0', 1))
        >>> lane.runs["r1"] = Pending("run", lane, "r1")
        >>> lane.next_action(window=3) is None          # the unload waits for both runs
        True
        >>> lane.runs.clear()
        >>> lane.next_action(window=3)
        ('unload', 'p0')
        """
        if not self.actions or self.lost or self.barrier is not None:
            return None
        if self.actions[0][0] == "run":
            return self.actions.popleft() if len(self.runs) < window else None
        if self.runs:
            return None  # a load/unload waits for the runs before it
        return self.actions.popleft()
