"""The coordinator: a tornado TCP server, on its own IOLoop thread, that workers join.

One :class:`Coordinator` owns the listening socket and every connection.
Each connection's rules (the handshake of docs/protocol.md §7, who may
send what, the heartbeat deadlines) are kept by a
:class:`crowdgraph.wire.Connection`; this module moves the bytes, names
the peers and keeps each worker's actions in order.  What the frames
*mean* for a run is left to a
:class:`Listener`: the in-process :class:`~crowdgraph_tcp.TcpExecutor`
turns them into reporter notices, the standing coordinator of
``crowdgraph serve`` relays them to drivers (:mod:`crowdgraph_tcp.relay`).

Threads: everything here runs on the coordinator's IOLoop thread, except
:meth:`Coordinator.call`, :meth:`Coordinator.run_sync`,
:meth:`Coordinator.stop` and the read-only lookups, which other threads
use to hand work to that thread.

A connection that breaks the protocol (garbage, a 10 GB frame header, a
wrong token, an unknown version, frames out of order, a truncated frame)
is closed with a logged reason (logger ``crowdgraph.tcp``); nothing else
changes, other workers carry on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import ssl
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from tornado.ioloop import IOLoop, PeriodicCallback
from tornado.iostream import IOStream, StreamClosedError
from tornado.netutil import bind_sockets
from tornado.tcpserver import TCPServer

from crowdgraph import wire
from crowdgraph.errors import ProtocolError
from crowdgraph.wire import Message

from .bridge import Action, take_answer
from .common import DEFAULT_HEARTBEAT, LOG, PreAuthLimits

#: Seconds a quarantined worker's name is refused by default (an hour).
QUARANTINE_SECONDS = 3600.0
from .streams import Link, now

__all__ = ["Action", "CacheHold", "StoreStream", "RelayFetch", "Peer", "Listener", "Coordinator"]

#: Bytes of a partition per STORE frame.  The next chunk goes when the worker
#: answers the last, so a RUN sent meanwhile waits behind at most this much.
STORE_CHUNK_BYTES = 1 << 19
#: Most FETCHes one worker may have relayed through the coordinator at once.
MAX_RELAYED_FETCHES = 8


@dataclass
class CacheHold:
    """A worker's actions wait behind an unanswered LOAD from its cache.

    If the cache misses, the same partition must go first with its bytes
    (docs/protocol.md §7.4): until then later actions are held.  ``owner``
    (the executor, or a driver connection) is who may release the hold;
    ``missed`` says the cache missed and the bytes are awaited.
    """

    sha256: str
    owner: Any
    missed: bool = False


@dataclass
class StoreStream:
    """A STORE under way to a worker: ``action`` as submitted, ``offset`` the bytes sent so far,
    ``load``, a LOAD from the worker's cache that waits for the last chunk, and ``then``, the
    STORE to start after it."""

    action: Action
    offset: int = 0
    load: Action | None = None
    then: Action | None = None


@dataclass
class RelayFetch:
    """A FETCH the coordinator passes on to a holder for ``requester``, a worker that could not reach it."""

    requester: "Peer"


@dataclass(eq=False)
class Peer:
    """One authenticated connection: a worker or a driver."""

    id: str
    address: str
    link: Link
    alive: bool = True
    # Worker bookkeeping (IOLoop thread only).
    cached: set[str] = field(default_factory=set)
    expected_resident: str | None = None
    outstanding: list[Action] = field(default_factory=list)
    held: deque[Action] = field(default_factory=deque)
    hold: CacheHold | None = None
    storing: StoreStream | None = None
    relaying: int = 0  # its FETCHes on their way to holders through the coordinator

    @property
    def role(self) -> str:
        return self.link.conn.peer_role

    @property
    def hello(self) -> dict[str, Any]:
        return self.link.conn.hello_header

    @property
    def codec(self) -> str:
        return self.link.conn.codec

    @property
    def version(self) -> int:
        return self.link.conn.version

    @property
    def name(self) -> str:
        return str(self.hello.get("name", ""))

    @property
    def memory(self) -> int:
        return int(self.hello.get("memory_budget", 0))

    @property
    def stores(self) -> bool:
        """Whether the worker takes STORE (it said so in HELLO)."""
        return self.hello.get("stores") is True

    @property
    def keeps_state(self) -> bool:
        """Whether the worker keeps state between runs (HELLO ``state``)."""
        return self.hello.get("state") is True

    @property
    def peer_address(self) -> str | None:
        """Where other workers fetch what it holds (HELLO ``peer``), or None: only through the coordinator."""
        address = self.hello.get("peer")
        return address if isinstance(address, str) else None

    @property
    def host(self) -> str:
        """The host its connection comes from."""
        return self.address.rsplit(":", 1)[0]

    @property
    def floor_rss(self) -> int | None:
        rss = self.hello.get("rss")
        return int(rss) if isinstance(rss, int) else None

    def send(self, message: Message) -> int:
        """Queue ``message`` with this connection's codec and version."""
        return self.link.send(message)

    def record(self) -> dict[str, Any]:
        """This worker as a CROWD / JOINED worker record."""
        rec: dict[str, Any] = {
            "id": self.id, "name": self.name, "memory_budget": self.memory,
            "cores": int(self.hello.get("cores", 1)), "platform": str(self.hello.get("platform", "")),
            "cached": sorted(self.cached), "resident": self.expected_resident,
        }
        if self.floor_rss is not None:
            rec["rss"] = self.floor_rss
        if self.keeps_state:
            rec["state"] = True
        return rec


class Listener:
    """What a coordinator's frames mean; every method runs on the IOLoop thread."""

    #: Whether driver connections (``role: "driver"`` in HELLO) are accepted.
    accepts_drivers = False

    def worker_joined(self, worker: Peer) -> None:
        """``worker`` finished its handshake."""

    def worker_lost(self, worker: Peer, reason: str) -> None:
        """``worker`` is gone; its unanswered actions will not be answered."""

    def reply(self, worker: Peer, action: Action | None, message: Message, size: int, received: float) -> None:
        """``worker`` answered ``action`` (None when no sent action matches)."""

    def fetched_problem(self, holder: str, message: Message) -> str | None:
        """What is wrong with the tensors of ``holder``'s FETCHED (their dtypes and shapes against what
        it said it holds), or None; the coordinator drops a holder whose relayed answer is wrong."""
        return None

    def dropped(self, worker_id: str, action: Action) -> None:
        """``action`` was submitted for a worker that is not connected."""

    def driver_joined(self, driver: Peer) -> None:
        """A driver finished its handshake."""

    def driver_message(self, driver: Peer, message: Message, size: int) -> None:
        """A driver sent ``message`` (CROWD, LOAD, UNLOAD, RUN)."""

    def driver_lost(self, driver: Peer, reason: str) -> None:
        """A driver is gone."""


@dataclass
class _PreAuthGate:
    """One connection's share of the coordinator's :class:`PreAuthLimits` while it shakes hands."""

    limits: PreAuthLimits
    host: str
    charged: int = 0

    def allow(self, wanted: int) -> int:
        room = self.limits.room(self.host)
        if room <= 0:
            raise ProtocolError(f"connections from {self.host} still in their handshake hold too many bytes "
                                f"(at most {self.limits.bytes_per_address} per address, {self.limits.bytes} "
                                "in all); finish the handshake before sending more")
        return min(wanted, room)

    def charge(self, size: int) -> None:
        reason = self.limits.charge(self.host, size)
        if reason is not None:
            raise ProtocolError(f"{reason}; finish the handshake before sending more")
        self.charged += size


class _Server(TCPServer):
    def __init__(self, coordinator: "Coordinator", ssl_options: Any):
        super().__init__(ssl_options=ssl_options)
        self.coordinator = coordinator

    def handle_stream(self, stream: IOStream, address: Any) -> None:
        self.coordinator._spawn(self.coordinator._handle(stream, address))


class Coordinator:
    """A TCP server that authenticates workers and keeps them alive.

    Parameters
    ----------
    token:
        The shared secret (bytes).  It never crosses the wire: both sides
        prove they know it with HMACs of fresh nonces.
    host, port:
        Where to listen; loopback and a free port by default.  Listening on
        another interface exposes the coordinator to that network: use a
        long random token, and TLS where the network is not yours.
    listener:
        What to do with workers' frames (see :class:`Listener`).
    ssl_options:
        An :class:`ssl.SSLContext` (see :func:`crowdgraph_tcp.common.server_ssl_context`)
        to serve TLS.
    heartbeat:
        Interval announced in WELCOME; a peer silent for
        ``wire.HEARTBEAT_MISSES`` intervals is lost.
    handshake_timeout:
        Seconds a new connection has to complete the handshake.
    max_frame_bytes:
        Largest frame after the handshake (before it: 1 MiB).
    web_port:
        Also serve the browser worker page (:mod:`crowdgraph_tcp.web`) and
        its WebSocket endpoint over HTTP on this port of ``host`` (0: a
        free one); None (the default) serves no page.
    allowed_origins:
        The page origins (``http://host:port``) whose WebSockets are
        accepted on the web port; by default the origin of :attr:`web_url`.
        A WebSocket without an Origin header, or from any other origin, is
        refused.
    preauth:
        What connections that have not yet proved the token may hold, on
        both ports together (the defaults of :class:`PreAuthLimits`).
    quarantine_seconds:
        How long a worker quarantined by a run's spot checks
        (:meth:`quarantine`) is refused when it connects again under the
        same name.
    """

    def __init__(self, token: bytes, host: str = "127.0.0.1", port: int = 0, *,
                 listener: Listener | None = None, ssl_options: ssl.SSLContext | None = None,
                 heartbeat: float = DEFAULT_HEARTBEAT, handshake_timeout: float = wire.HANDSHAKE_TIMEOUT,
                 max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES,
                 codecs: Sequence[str] = wire.CODECS, web_port: int | None = None,
                 allowed_origins: Sequence[str] | None = None, preauth: PreAuthLimits | None = None,
                 quarantine_seconds: float = QUARANTINE_SECONDS):
        if not token:
            raise ValueError("the coordinator needs a non-empty shared token")
        if heartbeat <= 0:
            raise ValueError(f"heartbeat must be > 0 seconds, got {heartbeat}")
        self.token = bytes(token)
        self.listener = listener or Listener()
        self.ssl_options = ssl_options
        self.heartbeat = float(heartbeat)
        self.handshake_timeout = float(handshake_timeout)
        self.max_frame_bytes = int(max_frame_bytes)
        self.codecs = tuple(codecs)
        self.quarantine_seconds = float(quarantine_seconds)
        self._quarantined: dict[str, float] = {}  # worker name -> when its quarantine ends
        self.workers: dict[str, Peer] = {}
        self.drivers: dict[str, Peer] = {}
        #: Bytes of FETCHED frames passed on to workers that could not reach a holder themselves.
        self.relayed_bytes = 0
        self._ids = itertools.count(1)
        self._sockets = bind_sockets(port, address=host or None)
        self.host, self.port = self._sockets[0].getsockname()[:2]
        self._web_sockets = bind_sockets(web_port, address=host or None) if web_port is not None else []
        self.web_port: int | None = self._web_sockets[0].getsockname()[1] if self._web_sockets else None
        self.preauth = preauth or PreAuthLimits()
        self.allowed_origins: frozenset[str] = frozenset()
        if self.web_url is not None:
            from .web import origin_of

            self.allowed_origins = frozenset(origin_of(url) for url in allowed_origins or [self.web_url])
        self._loop: IOLoop | None = None
        self._server: _Server | None = None
        self._web_server: Any = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- life cycle (any thread) -------------------------------------------

    @property
    def url(self) -> str:
        """``tcp://host:port`` (``tls://`` with TLS) for workers to connect to."""
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"{'tls' if self.ssl_options else 'tcp'}://{host}:{self.port}"

    @property
    def web_url(self) -> str | None:
        """``http://host:webport/`` (``https://`` with TLS) of the worker page, or None."""
        if self.web_port is None:
            return None
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"{'https' if self.ssl_options else 'http'}://{host}:{self.web_port}/"

    def join_url(self, host: str | None = None) -> str | None:
        """The URL a phone opens (the token in its fragment), or None without a page."""
        if self.web_port is None:
            return None
        from .web import join_url

        return join_url(host or str(self.host), self.web_port, self.token, tls=self.ssl_options is not None)

    def start(self) -> "Coordinator":
        """Start the IOLoop thread and serve; returns at once."""
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._main, args=(ready, failure),
                                        name=f"crowdgraph-tcp-coordinator-{self.port}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        LOG.info("coordinator listening on %s", self.url)
        return self

    def _main(self, ready: threading.Event, failure: list[BaseException]) -> None:
        aio = asyncio.new_event_loop()
        asyncio.set_event_loop(aio)
        try:
            self._loop = IOLoop.current()
            self._server = _Server(self, self.ssl_options)
            self._server.add_sockets(self._sockets)
            if self._web_sockets:
                from tornado.httpserver import HTTPServer

                from .web import MAX_REQUEST_BODY, make_app

                self._web_server = HTTPServer(make_app(self), ssl_options=self.ssl_options,
                                              max_body_size=MAX_REQUEST_BODY,
                                              max_buffer_size=self.max_frame_bytes + 2**20)
                self._web_server.add_sockets(self._web_sockets)
            ticker = PeriodicCallback(self._tick, self.heartbeat * 1000 / 4)
            ticker.start()
        except BaseException as exc:  # reported to start()
            failure.append(exc)
            ready.set()
            aio.close()
            return
        ready.set()
        try:
            self._loop.start()
        finally:
            ticker.stop()
            self._loop.close(all_fds=True)
            asyncio.set_event_loop(None)

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the IOLoop thread soon (from any thread)."""
        loop = self._loop
        if loop is not None and not self._stopping:
            loop.add_callback(self._guarded, fn, *args)

    @staticmethod
    def _guarded(fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # a bug; never let it kill the loop
            LOG.exception("error in %s on the coordinator thread", getattr(fn, "__name__", fn))

    def run_sync(self, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Run ``fn()`` on the IOLoop thread and return its result (from another thread)."""
        if self._loop is None or self._stopping:
            raise RuntimeError("the coordinator is not running")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def job() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self._loop.add_callback(job)
        return future.result(timeout)

    def stop(self, reason: str = "the coordinator is shutting down", timeout: float = 10.0) -> None:
        """Say BYE to every peer, close everything and end the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None or not thread.is_alive():
            for s in self._sockets + self._web_sockets:
                s.close()
            return
        loop.add_callback(self._shutdown, reason)
        thread.join(timeout)

    async def _shutdown(self, reason: str) -> None:
        self._stopping = True
        assert self._server is not None and self._loop is not None
        self._server.stop()
        if self._web_server is not None:
            self._web_server.stop()
        writes = []
        for peer in list(self.workers.values()) + list(self.drivers.values()):
            peer.link.conn.goodbye(reason, now=now())
            written = peer.link.flush()
            if written is not None:
                writes.append(written)
        if writes:
            await asyncio.wait(writes, timeout=1.0)
        for peer in list(self.workers.values()) + list(self.drivers.values()):
            peer.alive = False
            peer.link.stream.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        self._loop.stop()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- connections (IOLoop thread) ---------------------------------------

    async def _handle(self, stream: IOStream, address: Any) -> None:
        where = _address(address)
        if self._stopping:
            stream.close()
            return
        try:
            stream.set_nodelay(True)
        except Exception:  # not a TCP socket (tests may use others)
            pass
        host = address[0] if isinstance(address, tuple) else where
        refusal = self.preauth.open(host)
        if refusal is not None:
            LOG.warning("refused %s: %s", where, refusal)
            stream.close()
            return
        conn = wire.Connection(wire.COORDINATOR, token=self.token, now=now(), heartbeat=self.heartbeat,
                               codecs=self.codecs, max_frame_bytes=self.max_frame_bytes,
                               handshake_timeout=self.handshake_timeout, admit=self._admit)
        link = Link(stream, conn)
        gate = _PreAuthGate(self.preauth, host)
        charge_to = getattr(stream, "charge_to", None)
        try:
            if charge_to is not None:  # a WebSocket: each message is charged as it arrives, whole
                charge_to(gate)
            hello, _ = await asyncio.wait_for(link.next(None if charge_to else gate), conn.handshake_deadline - now())
        except asyncio.TimeoutError:
            LOG.warning("closing %s: the handshake did not complete within %.0f s", where, self.handshake_timeout)
            stream.close()
            return
        except StreamClosedError as exc:
            LOG.warning("%s closed the connection during the handshake%s", where,
                        f" ({exc.real_error})" if getattr(exc, "real_error", None) else "")
            stream.close()
            return
        except ProtocolError as exc:
            LOG.warning("refused %s: %s", where, exc)
            await link.drain()
            stream.close()
            return
        except Exception:
            LOG.exception("closing %s: unexpected error during the handshake", where)
            stream.close()
            return
        finally:
            self.preauth.close(host, gate.charged)
        authenticated = getattr(stream, "authenticated", None)
        if authenticated is not None:  # a WebSocket: from now on frames up to max_frame_bytes
            authenticated(self.max_frame_bytes)
        driver = conn.peer_role == wire.DRIVER
        peer = Peer(f"{'d' if driver else 'w'}{next(self._ids)}", where, link,
                    cached=set() if driver else set(hello.header.get("cached", [])))
        conn.welcome(peer.id, now=now())
        link.flush()
        if driver:
            self.drivers[peer.id] = peer
            LOG.info("driver %s joined from %s", peer.id, where)
            self._notify(self.listener.driver_joined, peer)
        elif self._quarantine_left(peer.name) > 0:
            self.drop(peer, f"a worker named {peer.name!r} is quarantined for {self._quarantine_left(peer.name):.0f} "
                            "more seconds: its results disagreed with other workers'; fix it and join later")
            return
        else:
            self.workers[peer.id] = peer
            LOG.info("worker %s (%s, budget %s bytes) joined from %s", peer.id, peer.name, peer.memory, where)
            self._notify(self.listener.worker_joined, peer)
        await self._serve(peer)

    def _admit(self, hello: dict[str, Any]) -> str | None:
        """Why a HELLO is refused before the token is even checked, or None."""
        if hello.get("role", wire.WORKER) == wire.DRIVER and not self.listener.accepts_drivers:
            return ("this coordinator belongs to an in-process executor and takes no drivers; run a "
                    "standing one with `crowdgraph serve` to drive it from another process")
        return None

    async def _serve(self, peer: Peer) -> None:
        try:
            while peer.alive:
                message, size = await peer.link.next()
                if not peer.alive:
                    break  # dropped while this frame came: its BYE is on its way
                if message.type == wire.BYE:
                    self._lose(peer, f"it said BYE ({message.header.get('reason', 'no reason given')})",
                               clean=True)
                elif peer.role == wire.WORKER:
                    self._on_reply(peer, message, size)
                elif message.type == wire.LOST:
                    self._expel(peer, message.header["worker"], message.header["reason"],
                                message.header.get("quarantine", False))
                else:
                    self._notify(self.listener.driver_message, peer, message, size)
        except StreamClosedError:
            self._lose(peer, "its connection closed")
        except ProtocolError as exc:
            if peer.alive:
                await peer.link.drain()
            self._lose(peer, f"protocol error: {exc}")
        except Exception as exc:
            LOG.exception("error serving %s", peer.id)
            self._lose(peer, f"internal error: {type(exc).__name__}: {exc}")

    def _notify(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._stopping:
            return
        try:
            fn(*args)
        except Exception:
            LOG.exception("listener %s failed", getattr(fn, "__name__", fn))

    def _expel(self, driver: Peer, worker_id: str, reason: str, quarantine: bool) -> None:
        """A driver found ``worker_id`` broke the rules (a result that fails its checks, or
        outvoted by spot checks when ``quarantine``): disconnect it, and quarantine it if asked.

        Otherwise it would stay in the crowd and every other driver would
        give it tasks; each driver hears of it with LOST, as of any loss.
        """
        worker = self.workers.get(worker_id)
        if worker is not None:
            LOG.warning("driver %s reports worker %s: %s", driver.id, worker_id, reason)
            if quarantine:
                self.quarantine(worker_id, f"{reason} (reported by driver {driver.id})")
            else:
                self.drop(worker, f"{reason} (reported by driver {driver.id})")

    def drop(self, peer: Peer, reason: str) -> None:
        """Say BYE to ``peer`` with ``reason`` and lose it (IOLoop thread): it broke the rules.

        It is lost at once; its connection closes once the BYE has left (a
        close with the BYE still queued would drop it, and the peer would
        not learn why), or after a second.
        """
        peer.link.conn.goodbye(reason, now=now())
        self._lose(peer, reason, farewell=True)

    def drop_worker(self, worker_id: str, reason: str) -> None:
        """:meth:`drop` worker ``worker_id``, if it is still connected (IOLoop thread)."""
        w = self.workers.get(worker_id)
        if w is not None and w.alive:
            self.drop(w, reason)

    def quarantine(self, worker_id: str, reason: str) -> None:
        """Drop worker ``worker_id`` and refuse its name for :attr:`quarantine_seconds` (IOLoop thread).

        A run's spot checks found its results wrong.  Names are what a
        worker says it is (``--name``, by default its host name): a worker
        that lies about its name comes back, and is checked again as an
        unproven worker.
        """
        peer = self.workers.get(worker_id)
        if peer is None:
            return
        if peer.name:
            self._quarantined[peer.name] = now() + self.quarantine_seconds
        LOG.warning("quarantining worker %s (%s) for %.0f s: %s", peer.id, peer.name, self.quarantine_seconds, reason)
        self.drop(peer, f"quarantined: {reason}")

    def _quarantine_left(self, name: str) -> float:
        """Seconds the quarantine of workers named ``name`` still lasts (0: none)."""
        until = self._quarantined.get(name) if name else None
        if until is None:
            return 0.0
        if until <= now():
            del self._quarantined[name]
            return 0.0
        return until - now()

    def _lose(self, peer: Peer, reason: str, *, clean: bool = False, farewell: bool = False) -> None:
        peer.alive = False
        table = self.drivers if peer.role == wire.DRIVER else self.workers
        mine = table.get(peer.id) is peer
        if mine:  # out of the table before the peer can see its connection close
            del table[peer.id]
        if farewell:
            self._spawn(_close_when_sent(peer.link))
        else:
            peer.link.stream.close()
        if not mine or self._stopping:
            return
        if clean:
            LOG.info("%s %s (%s) disconnected cleanly: %s", peer.role, peer.id, peer.address, reason)
        else:
            LOG.warning("%s %s (%s) lost: %s", peer.role, peer.id, peer.address, reason)
        if peer.role == wire.DRIVER:
            for w in list(self.workers.values()):
                if w.hold is not None and w.hold.owner is peer:
                    self.release(w)
            self._notify(self.listener.driver_lost, peer, reason)
        else:
            for action in peer.outstanding:  # a relayed FETCH is answered: the holder is gone
                if isinstance(action.purpose, RelayFetch):
                    self._relayed(action, Message(wire.FETCHED, {"task": list(action.key), "holder": peer.id,
                                                                 "error": f"worker {peer.id} is gone: {reason}"}))
            peer.outstanding.clear()
            peer.held.clear()
            self._notify(self.listener.worker_lost, peer, reason)

    def _tick(self) -> None:
        t = now()
        for peer in list(self.workers.values()) + list(self.drivers.values()):
            reason = peer.link.conn.expired(t)
            if reason is not None:
                self._lose(peer, reason)
            elif peer.link.conn.ping(t):
                peer.link.flush()

    # -- actions for workers (IOLoop thread) -------------------------------

    def submit(self, worker_id: str, action: Action) -> None:
        """Send ``action`` to worker ``worker_id`` in order (IOLoop thread).

        While a LOAD from the worker's cache is unanswered, later actions
        wait (see :class:`CacheHold`).  A STORE goes in chunks beside the
        other actions, one chunk at a time (:data:`STORE_CHUNK_BYTES`).  A
        LOAD of that partition from the worker's cache waits for the last
        chunk, and what follows it waits too; a LOAD with its bytes, or
        another STORE, ends it.
        """
        w = self.workers.get(worker_id)
        if w is None or not w.alive:
            self._notify(self.listener.dropped, worker_id, action)
            return
        if action.kind in (wire.FETCH, wire.DROP):  # served beside the work, not after it
            self._send(w, action)
            return
        if action.kind == wire.STORE:
            if w.storing is not None and w.storing.load is not None:
                w.storing.then = action  # a LOAD waits for the one under way
            else:
                w.storing = StoreStream(action)
                self._send_store_chunk(w)
            return
        if w.storing is not None and action.kind == wire.LOAD and action.sha256 == w.storing.action.sha256:
            if action.from_cache and w.hold is None:  # sent once the STORE is over
                w.storing.load, w.hold = action, CacheHold(action.sha256, action.owner)
                w.expected_resident = action.sha256
                return
            w.storing = None  # the LOAD brings the bytes itself
        if action.kind == wire.LOAD:
            w.expected_resident = action.sha256
        elif action.kind == wire.UNLOAD:
            w.expected_resident = None
        if w.hold is None:
            self._send(w, action)
        elif w.hold.missed and action.kind == wire.LOAD and not action.from_cache and action.sha256 == w.hold.sha256:
            self.release(w, first=action)
        else:
            w.held.append(action)

    def release(self, w: Peer, first: Action | None = None) -> None:
        """End ``w``'s cache hold: send ``first`` (the missed partition's bytes), then what waited."""
        w.hold = None
        if first is not None:
            self._send(w, first)
        while w.held and w.hold is None and w.alive:
            self._send(w, w.held.popleft())

    def _send(self, w: Peer, action: Action) -> None:
        if action.parts is None:
            assert action.message is not None
            action.parts = wire.encode_parts(action.message, codec=w.codec, version=w.version,
                                             lossy=w.link.conn.lossy_of(action.message))
        action.message = None
        action.size = w.link.send_encoded(action.kind, action.parts)
        action.parts = None
        action.sent = now()
        if action.kind != wire.DROP:  # the one message no answer follows
            w.outstanding.append(action)
        if action.kind == wire.LOAD and action.sha256:
            if action.from_cache:
                w.hold = CacheHold(action.sha256, action.owner)
            else:
                w.cached.add(action.sha256)

    def _on_reply(self, w: Peer, message: Message, size: int) -> None:
        received = now()
        if message.type == wire.FETCH:
            self._relay_fetch(w, message)
            return
        action = take_answer(w.outstanding, message)
        if action is not None and isinstance(action.purpose, RelayFetch):
            self._relayed(action, message)
            return
        if action is None:
            LOG.warning("worker %s answered %s %s, which matches nothing sent to it; ignored",
                        w.id, message.type, message.header)
        release = False
        if action is not None and action.kind == wire.LOAD and action.sha256:
            hold = w.hold if w.hold is not None and w.hold.sha256 == action.sha256 else None
            if message.type == wire.LOADED:
                w.cached.add(action.sha256)
                release = action.from_cache and hold is not None and not hold.missed
            elif action.from_cache and hold is not None:
                w.cached.discard(action.sha256)
                hold.missed = True  # held until the bytes come (submit) or release()
            elif w.expected_resident == action.sha256:
                w.expected_resident = None
        elif action is not None and action.kind == wire.STORE:
            self._stored(w, action, message.header)
        self._notify(self.listener.reply, w, action, message, size, received)
        if release:
            self.release(w)

    def _relay_fetch(self, w: Peer, message: Message) -> None:
        """Pass ``w``'s FETCH on to the holder it names; the FETCHED goes back to ``w`` (:meth:`_relayed`)."""
        h = message.header
        holder = self.workers.get(h["holder"])
        if holder is None or not holder.alive:
            error = f"worker {h['holder']} is not connected"
        elif w.relaying >= MAX_RELAYED_FETCHES:
            error = f"worker {w.id} has {MAX_RELAYED_FETCHES} fetches through the coordinator under way"
        else:
            error = None
        if error is not None:
            w.send(Message(wire.FETCHED, {"task": h["task"], "holder": h["holder"], "error": error}))
            return
        w.relaying += 1
        self._send(holder, Action(wire.FETCH, h["task"][0], purpose=RelayFetch(w), key=(h["task"][0], h["task"][1]),
                                  message=Message(wire.FETCH, dict(h))))

    def _relayed(self, action: Action, answer: Message) -> None:
        """Hand the holder's FETCHED (or why there is none) to the worker that asked for it.

        A holder that answers with an error does not have what its RESULT
        said it holds: it is dropped, and what it held is computed again.
        """
        requester = action.purpose.requester
        requester.relaying -= 1
        holder = self.workers.get(answer.header["holder"])
        problem = answer.header.get("error") or self.listener.fetched_problem(answer.header["holder"], answer)
        if problem is not None:
            answer = Message(wire.FETCHED, {"task": answer.header["task"], "holder": answer.header["holder"],
                                            "error": problem})
        if requester.alive:
            self.relayed_bytes += requester.send(Message(wire.FETCHED, dict(answer.header), tensors=answer.tensors))
        if problem is not None and holder is not None and holder.alive:
            self.drop(holder, f"it did not send outputs it holds: {problem}")

    def peer_address_for(self, reader_id: str, holder_id: str) -> str | None:
        """The address at which worker ``reader_id`` can fetch what ``holder_id`` holds, or None (through here).

        A loopback address is only given to a worker connected from the
        same host as the holder.
        """
        reader, holder = self.workers.get(reader_id), self.workers.get(holder_id)
        if reader is None or holder is None or holder.peer_address is None or reader.peer_address is None:
            return None
        host = holder.peer_address.rsplit(":", 1)[0].strip("[]")
        loopback = host in ("localhost", "::1") or host.startswith("127.")
        return holder.peer_address if not loopback or reader.host == holder.host else None

    def _send_store_chunk(self, w: Peer) -> None:
        """Send the next chunk of the STORE under way to ``w``."""
        stream = w.storing
        assert stream is not None
        data = stream.action.purpose.data
        chunk = bytes(memoryview(data)[stream.offset:stream.offset + STORE_CHUNK_BYTES])
        header = {"partition": stream.action.partition, "sha256": stream.action.sha256,
                  "offset": stream.offset, "size": len(data)}
        stream.offset += len(chunk)
        self._send(w, Action(wire.STORE, stream.action.partition, purpose=stream.action.purpose,
                             message=Message(wire.STORE, header, blobs={"model": chunk}),
                             sha256=stream.action.sha256, owner=stream.action.owner))

    def _stored(self, w: Peer, action: Action, answer: dict[str, Any]) -> None:
        """A STORED: at the end, the partition is cached (or not); before it, the next chunk goes."""
        stream = w.storing
        ours = stream is not None and stream.action.sha256 == action.sha256
        if "kept" in answer:
            if answer["kept"]:
                w.cached.add(action.sha256)  # LOADs of it now read it from the worker's cache
            if ours:
                w.storing = None
                if stream.load is not None:  # (a miss, when not kept, brings the bytes)
                    w.hold = None
                    self._send(w, stream.load)
                if stream.then is not None:
                    w.storing = StoreStream(stream.then)
                    self._send_store_chunk(w)
        elif ours and stream.offset == answer["received"] < len(stream.action.purpose.data):
            self._send_store_chunk(w)
        elif ours:  # the worker lost count: leave it
            w.storing = None

    def cancel_stores(self) -> None:
        """Send no more chunks of the STOREs under way (a new run decides anew; IOLoop thread),
        but those a LOAD waits for."""
        for w in self.workers.values():
            if w.storing is not None and w.storing.load is None:
                w.storing = None
            elif w.storing is not None:
                w.storing.then = None

    # -- lookups (any thread) ----------------------------------------------

    def codec_of(self, worker_id: str) -> tuple[str, int] | None:
        """(codec, version) agreed with a worker, or None if it is not connected."""
        w = self.workers.get(worker_id)
        return None if w is None else (w.codec, w.version)

    def lossy_for(self, worker_id: str, wanted: str | None) -> str | None:
        """The lossy encoding to send a worker when ``wanted`` is asked: it where agreed, else None."""
        w = self.workers.get(worker_id)
        return None if w is None else w.link.conn.lossy_for(wanted)

    def has_cached(self, worker_id: str, sha256: str) -> bool:
        """Whether the worker is believed to hold ``sha256`` in its cache, or
        to be receiving it in a STORE (a hint)."""
        w = self.workers.get(worker_id)
        if w is None:
            return False
        return sha256 in w.cached or (w.storing is not None and w.storing.action.sha256 == sha256)


async def _close_when_sent(link: Link) -> None:
    """Close ``link`` once what it queued (a BYE) has left, or after a second (a shutdown waits 2 s)."""
    await link.drain(1.0)
    link.stream.close()


def _address(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = address[0]
        return f"[{host}]:{address[1]}" if ":" in str(host) else f"{host}:{address[1]}"
    return str(address)
