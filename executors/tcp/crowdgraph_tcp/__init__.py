"""crowdgraph-tcp: run a crowdgraph model on workers that connect over TCP.

* :class:`TcpExecutor` -- a coordinator in this process that workers join
  (``TcpExecutor.local(workers=5)`` also starts them as local processes;
  ``TcpExecutor.from_url("tcp://host:8786")`` drives the crowd of a
  standing ``crowdgraph serve`` coordinator);
* ``crowdgraph-worker`` -- the agent a phone (Termux), a Pi or a laptop
  runs (:mod:`crowdgraph_tcp.worker`);
* ``crowdgraph serve`` -- a standing coordinator (:mod:`crowdgraph_tcp.cli`).

Everything on the wire is :mod:`crowdgraph.wire` frames; nothing received
is unpickled or evaluated.  Importing this package is cheap: the executor
(and tornado) load on first use, so the worker agent stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["TcpExecutor", "RemoteExecutor", "Coordinator"]


def __getattr__(name: str) -> Any:
    if name == "TcpExecutor":
        from .executor import TcpExecutor

        return TcpExecutor
    if name == "RemoteExecutor":
        from .client import RemoteExecutor

        return RemoteExecutor
    if name == "Coordinator":
        from .coordinator import Coordinator

        return Coordinator
    raise AttributeError(f"module 'crowdgraph_tcp' has no attribute {name!r}")
