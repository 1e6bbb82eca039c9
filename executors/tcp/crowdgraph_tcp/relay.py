"""The standing coordinator of ``crowdgraph serve``: workers join it, drivers use it.

It holds no model and runs no scheduler.  It relays (docs/protocol.md §7.4):

* a driver's LOAD / UNLOAD / RUN, addressed with ``worker``, to that worker
  (re-encoded with the codec agreed with the worker, without the field);
* each worker's answer back to the driver whose action it answers, with
  the worker's id in ``worker``;
* JOINED / LOST to every driver, and the crowd (CROWD) to a driver that asks.

All of it runs on the coordinator's IOLoop thread.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

from crowdgraph import wire
from crowdgraph.wire import Message

from .common import DEFAULT_HEARTBEAT, LOG, parse_listen
from .coordinator import Action, Coordinator, Listener, Peer

__all__ = ["Relay", "standing_coordinator"]


class Relay(Listener):
    """A :class:`Listener` that relays between drivers and workers."""

    accepts_drivers = True

    def __init__(self) -> None:
        self.coordinator: Coordinator | None = None

    def _drivers(self) -> list[Peer]:
        assert self.coordinator is not None
        return [d for d in self.coordinator.drivers.values() if d.alive]

    def worker_joined(self, worker: Peer) -> None:
        for driver in self._drivers():
            driver.send(Message(wire.JOINED, {"worker": worker.record()}))

    def worker_lost(self, worker: Peer, reason: str) -> None:
        for driver in self._drivers():
            driver.send(Message(wire.LOST, {"worker": worker.id, "reason": reason}))

    def reply(self, worker: Peer, action: Action | None, message: Message, size: int, received: float) -> None:
        if action is None or not isinstance(action.purpose, Peer) or not action.purpose.alive:
            return  # an answer nobody waits for any more (its driver left)
        header = dict(message.header, worker=worker.id)
        action.purpose.send(Message(message.type, header, tensors=message.tensors))

    def dropped(self, worker_id: str, action: Action) -> None:
        driver = action.purpose
        if isinstance(driver, Peer) and driver.alive:
            driver.send(Message(wire.LOST, {"worker": worker_id, "reason": "no such worker (it left)"}))

    def driver_message(self, driver: Peer, message: Message, size: int) -> None:
        assert self.coordinator is not None
        h = message.header
        if message.type == wire.CROWD:
            workers = [w.record() for w in self.coordinator.workers.values() if w.alive]
            driver.send(Message(wire.CROWD, {"workers": workers}))
            return
        worker = h["worker"]  # the connection checked that a driver names it
        header = {k: v for k, v in h.items() if k != "worker"}
        key = (h["task"][0], h["task"][1]) if message.type == wire.RUN else None
        self.coordinator.submit(worker, Action(
            message.type, h["task"][0] if key else h["partition"], purpose=driver, owner=driver,
            message=Message(message.type, header, tensors=message.tensors, blobs=message.blobs),
            sha256=h.get("sha256"), from_cache=bool(h.get("from_cache", False)), key=key))

    def driver_lost(self, driver: Peer, reason: str) -> None:
        LOG.info("driver %s left: %s", driver.id, reason)


def standing_coordinator(token: bytes, listen: str = "127.0.0.1:8786", *,
                         certfile: str | os.PathLike | None = None, keyfile: str | os.PathLike | None = None,
                         heartbeat: float = DEFAULT_HEARTBEAT, **kwargs: Any) -> Coordinator:
    """Start a relaying coordinator (what ``crowdgraph serve`` runs); ``.stop()`` it when done."""
    from .common import server_ssl_context

    host, port = parse_listen(listen)
    relay = Relay()
    ssl_options: ssl.SSLContext | None = server_ssl_context(certfile, keyfile) if certfile else None
    coordinator = Coordinator(token, host, port, listener=relay, ssl_options=ssl_options, heartbeat=heartbeat,
                              **kwargs)
    relay.coordinator = coordinator
    return coordinator.start()
