"""RemoteExecutor: drive the crowd of a standing ``crowdgraph serve`` coordinator.

``compiled.run(batch, executor="tcp://127.0.0.1:8786")`` ends up here
(through ``TcpExecutor.from_url``).  The executor connects to the
coordinator as a *driver* (docs/protocol.md §7.4), authenticates with the
shared token (``token=`` or ``$CROWDGRAPH_TOKEN``), learns the crowd, and
sends each LOAD / UNLOAD / RUN with the worker it is for; the coordinator
relays them and sends the answers back.  The scheduler runs here, in the
driver; the coordinator stays a thin relay.

The connection runs on its own IOLoop thread, like the coordinator.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import platform
import socket
import sys
import threading
from typing import Any, Mapping, Sequence

from tornado.ioloop import IOLoop, PeriodicCallback
from tornado.iostream import StreamClosedError
from tornado.tcpclient import TCPClient

from crowdgraph import Partition, wire
from crowdgraph.errors import ExecutionError, InputError, ProtocolError
from crowdgraph.executor import Executor, Job, Reporter
from crowdgraph.runtime import TaskState
from crowdgraph.schedule import TaskKey, WorkerInfo
from crowdgraph.wire import Message

from .bridge import Action, DriverBridge, Holding, lossy_option, take_answer
from .common import CAFILE_ENV, LOG, TOKEN_ENV, client_ssl_context, parse_url, read_token, wait_for_workers
from .streams import Link, now

__all__ = ["RemoteExecutor"]


class RemoteExecutor(Executor):
    """The crowd of a standing coordinator, driven from this process.

    Parameters
    ----------
    url:
        ``tcp://host:port`` (``tls://host:port`` for TLS) of ``crowdgraph serve``.
    token:
        The shared token; default ``$CROWDGRAPH_TOKEN``.
    cafile:
        TLS: trust this CA / self-signed certificate (default ``$CROWDGRAPH_CAFILE``);
        giving one turns TLS on for a ``tcp://`` URL too.
    min_workers, join_timeout:
        :meth:`start` waits up to ``join_timeout`` seconds for ``min_workers`` workers.
    lossy:
        ``"fp16"`` or ``"int8"``: RUN inputs travel in that encoding to the
        coordinator and on to workers that agreed it, and their RESULTs come
        back to the coordinator in it (the last hop, to this driver, is
        exact); as for :class:`~crowdgraph_tcp.TcpExecutor`.
    """

    name = "tcp"

    def __init__(self, url: str, token: str | bytes | None = None, *, cafile: str | os.PathLike | None = None,
                 min_workers: int = 1, join_timeout: float = 60.0, connect_timeout: float = 30.0,
                 max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES, lossy: str | None = None):
        self.url = url
        #: The lossy wire encoding runs ask for (None: exact), as for ``TcpExecutor``.
        self.lossy = lossy_option(lossy)
        scheme, self.host, self.port = parse_url(url)
        secret = read_token(token)
        if secret is None:
            raise InputError(f"no token to drive {url}: pass token=... or set {TOKEN_ENV} to the token "
                             "the coordinator was started with")
        self.token = secret
        cafile = cafile or os.environ.get(CAFILE_ENV) or None
        self._ssl = client_ssl_context(cafile) if scheme == "tls" or cafile else None
        self.min_workers = int(min_workers)
        self.join_timeout = float(join_timeout)
        self.max_frame_bytes = int(max_frame_bytes)
        #: The crowd as last heard: worker id -> worker record (cached as a set).
        self.crowd: dict[str, dict[str, Any]] = {}
        self.id: str | None = None
        self.bridge = DriverBridge(address_workers=True)
        self._outstanding: dict[str, list[Action]] = {}
        self._waiters: list[tuple[concurrent.futures.Future[Any], Any]] = []
        self._changed = threading.Condition()
        self._dead: str | None = None
        self._closed = False
        self._link: Link | None = None
        self._reports_lost = False  # whether the coordinator disconnects a worker this driver reports
        self._loop: IOLoop | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(ready,), daemon=True,
                                        name=f"crowdgraph-tcp-driver-{self.port}")
        self._thread.start()
        ready.wait()
        try:
            self._call_sync(self._connect, connect_timeout)
            self._crowd_snapshot(None, connect_timeout)
        except BaseException:
            self.close()
            raise

    # -- the IOLoop thread ---------------------------------------------------

    def _main(self, ready: threading.Event) -> None:
        aio = asyncio.new_event_loop()
        asyncio.set_event_loop(aio)
        self._loop = IOLoop.current()
        ready.set()
        try:
            self._loop.start()
        finally:
            self._loop.close(all_fds=True)
            asyncio.set_event_loop(None)

    def _call_sync(self, coro_fn: Any, timeout: float) -> Any:
        assert self._loop is not None
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        async def job() -> None:
            try:
                future.set_result(await coro_fn())
            except BaseException as exc:
                future.set_exception(exc)

        self._loop.add_callback(job)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise ExecutionError(f"no answer from the coordinator at {self.url} within {timeout:.0f} s") from None

    async def _connect(self) -> None:
        try:
            stream = await TCPClient().connect(self.host, self.port, ssl_options=self._ssl, timeout=30)
        except (OSError, StreamClosedError, asyncio.TimeoutError) as exc:
            raise ExecutionError(f"cannot connect to the coordinator at {self.url}: {exc}; is "
                                 "`crowdgraph serve` running there?") from None
        try:
            stream.set_nodelay(True)
        except Exception:
            pass
        conn = wire.Connection(wire.DRIVER, token=self.token, now=now(), max_frame_bytes=self.max_frame_bytes)
        link = Link(stream, conn)
        try:
            conn.hello({"name": f"driver@{socket.gethostname()}", "memory_budget": 0, "cores": 1,
                        "platform": f"{sys.platform}-{platform.machine()}", "cached": []}, now=now())
            link.flush()
            welcome, _ = await link.next()
        except wire.Refused as exc:
            stream.close()
            raise ExecutionError(f"the coordinator at {self.url} refused this driver: {exc}") from None
        except ProtocolError as exc:
            stream.close()
            raise ExecutionError(f"the coordinator at {self.url} broke the handshake: {exc}") from None
        except BaseException:
            stream.close()
            raise
        self._link, self.id = link, conn.peer_id
        self._reports_lost = welcome.header.get("takes_lost") is True
        assert conn.heartbeat is not None
        self._ticker = PeriodicCallback(self._tick, conn.heartbeat * 1000 / 4)
        self._ticker.start()
        asyncio.ensure_future(self._read_loop(link))

    def _tick(self) -> None:
        if self._dead or self._link is None:
            return
        reason = self._link.conn.expired(now())
        if reason is not None:
            self._lost(reason)
        elif self._link.conn.ping(now()):
            self._link.flush()

    async def _read_loop(self, link: Link) -> None:
        try:
            while not self._dead:
                message, size = await link.next()
                self._dispatch(message, size)
        except StreamClosedError:
            self._lost("it closed the connection")
        except ProtocolError as exc:
            await link.drain()
            self._lost(f"protocol error: {exc}")
        except Exception as exc:
            LOG.exception("driver connection to %s failed", self.url)
            self._lost(f"{type(exc).__name__}: {exc}")

    def _lost(self, reason: str) -> None:
        if self._dead:
            return
        self._dead = reason
        if self._link is not None:
            self._link.stream.close()
        if not self._closed:
            LOG.warning("lost the coordinator at %s: %s", self.url, reason)
        reporter = self.bridge.reporter
        for worker in list(self.crowd):
            if reporter is not None:
                reporter.worker_lost(worker, f"lost the coordinator at {self.url}: {reason}")
        self.crowd.clear()
        for future, _ in self._waiters:
            future.set_exception(ExecutionError(f"lost the coordinator at {self.url}: {reason}"))
        self._waiters.clear()
        with self._changed:
            self._changed.notify_all()

    def _dispatch(self, message: Message, size: int) -> None:
        h, kind = message.header, message.type
        if kind not in (wire.BYE, wire.CROWD, wire.JOINED, wire.LOST):
            self._answer(h["worker"], message, size)  # relayed; the connection checked that it names its worker
            return
        if kind == wire.BYE:
            self._lost(f"it disconnected cleanly ({h.get('reason', '')})")
        elif kind == wire.CROWD:
            self.crowd = {rec["id"]: _record(rec) for rec in h.get("workers", [])}
            if self._waiters:
                future, payload = self._waiters.pop(0)
                future.set_result(self._activate(payload))
        elif kind == wire.JOINED:
            rec = _record(h["worker"])
            self.crowd[rec["id"]] = rec
            if self.bridge.reporter is not None:
                self.bridge.reporter.worker_joined(self.bridge.info(_holding(rec)))
        elif kind == wire.LOST:
            self._forget(h["worker"], h["reason"])
        with self._changed:
            self._changed.notify_all()

    def _forget(self, worker: str, reason: str) -> None:
        """``worker`` is gone for this driver; its tasks are placed again."""
        self.crowd.pop(worker, None)
        self._outstanding.pop(worker, None)
        self.bridge.lost(worker)
        if self.bridge.reporter is not None:
            self.bridge.reporter.worker_lost(worker, reason)

    def _answer(self, worker: str, message: Message, size: int) -> None:
        received = now()
        action = take_answer(self._outstanding.get(worker, []), message)
        if action is None:
            return
        problem = self.bridge.bad_result(worker, action, message)
        if problem is not None:  # not trusted with more tasks: the coordinator disconnects it
            LOG.warning("%s", problem)
            self._report(worker, problem, quarantine=False)
            return
        rec = self.crowd.get(worker)
        if rec is not None and action.kind == wire.LOAD and action.sha256:
            if message.type == wire.LOADED:
                rec["cached"].add(action.sha256)
            elif action.from_cache:  # the worker's cache no longer holds it
                rec["cached"].discard(action.sha256)
        resend = self.bridge.answered(worker, action, message, size, received)
        if resend is not None:  # the coordinator holds the rest until these bytes come
            self._send_action(worker, resend)

    def _report(self, worker: str, reason: str, *, quarantine: bool) -> None:
        """Tell the coordinator ``worker`` broke the rules (when it takes LOST), and stop using it."""
        if self._reports_lost and self._link is not None:
            self._link.send(Message(wire.LOST, {"worker": worker, "reason": reason, "quarantine": quarantine}))
        self._forget(worker, reason)

    def _send_action(self, worker: str, action: Action) -> None:
        if self._dead or self._link is None:
            return
        if action.parts is None:
            assert action.message is not None
            action.parts = self._encode(action.message)
        action.size = self._link.send_encoded(action.kind, action.parts, {"worker": worker})
        action.parts = action.message = None
        action.sent = now()
        self._outstanding.setdefault(worker, []).append(action)
        rec = self.crowd.get(worker)
        if rec is not None:
            if action.kind == wire.LOAD:
                rec["resident"] = action.sha256
                if not action.from_cache:
                    rec["cached"].add(action.sha256)
            elif action.kind == wire.UNLOAD:
                rec["resident"] = None

    def _encode(self, message: Message) -> list[Any]:
        assert self._link is not None
        conn = self._link.conn
        return wire.encode_parts(message, codec=conn.codec, version=conn.version, lossy=conn.lossy_of(message))

    # -- crowd snapshots -----------------------------------------------------

    def _crowd_snapshot(self, payload: Any, timeout: float) -> Any:
        """Ask for the crowd; on the answer, activate ``payload`` (job, reporter) atomically."""
        assert self._loop is not None
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def ask() -> None:
            if self._dead:
                future.set_exception(ExecutionError(f"lost the coordinator at {self.url}: {self._dead}"))
                return
            assert self._link is not None
            self._waiters.append((future, payload))
            self._link.send(Message(wire.CROWD, {}))

        self._loop.add_callback(ask)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise ExecutionError(f"the coordinator at {self.url} did not send its crowd within {timeout:.0f} s") from None

    def _activate(self, payload: Any) -> list[WorkerInfo] | None:
        if payload is None:
            return None
        job, reporter = payload
        crowd, unloads = self.bridge.start(job, reporter, map(_holding, list(self.crowd.values())))
        for worker, action in unloads:
            self._send_action(worker, action)
        return crowd

    # -- the executor protocol -----------------------------------------------

    def start(self, job: Job, reporter: Reporter) -> list[WorkerInfo]:
        if self._closed or self._dead:
            raise ExecutionError(f"the connection to the coordinator at {self.url} is gone "
                                 f"({self._dead or 'closed'}); make a new executor")
        wait_for_workers(self._changed, lambda: len(self.crowd), self.min_workers, self.join_timeout, self.url,
                         gone=lambda: bool(self._dead))
        crowd = self._crowd_snapshot((job, reporter), 60.0)
        if len(crowd) < self.min_workers:
            raise ExecutionError(f"only {len(crowd)} workers are connected to {self.url}, "
                                 f"{self.min_workers} needed")
        return crowd

    def _hand(self, worker: str, action: Action | None) -> None:
        if action is not None and self._loop is not None:
            self._loop.add_callback(self._send_action, worker, action)

    def load(self, worker: str, partition: Partition) -> None:
        rec = self.crowd.get(worker)
        if rec is not None:
            self._hand(worker, self.bridge.load(worker, partition, from_cache=partition.sha256 in rec["cached"]))

    def unload(self, worker: str, partition: str) -> None:
        self._hand(worker, self.bridge.unload(worker, partition, self.bridge.reporter))

    def run(self, worker: str, key: TaskKey, partition: Partition, inputs: Mapping[str, Any], *,
            state: TaskState | None = None) -> None:
        self._hand(worker, self.bridge.run(worker, key, partition, inputs, self._encode, lossy=self.lossy,
                                           state=state))

    def forget_state(self, worker: str, keys: Sequence[str]) -> None:
        self.bridge.forget_state(worker, keys)

    def quarantine(self, worker: str, reason: str) -> None:
        """The run's spot checks outvoted ``worker``: the coordinator drops it and refuses
        its name for its quarantine time (when it takes LOST from drivers)."""
        self._loop.add_callback(self._report, worker, reason, quarantine=True)

    def reset(self) -> None:
        def unload_all() -> None:
            for worker, action in self.bridge.reset(map(_holding, list(self.crowd.values()))):
                self._send_action(worker, action)

        if self._loop is not None and not self._dead:
            self._loop.add_callback(unload_all)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if loop is None or not self._thread.is_alive():
            return

        async def shutdown() -> None:
            link = self._link
            self._dead = self._dead or "closed"
            if getattr(self, "_ticker", None) is not None:
                self._ticker.stop()
            if link is not None:
                link.conn.goodbye("the driver closed", now=now())
                await link.drain(1.0)
                link.stream.close()
            await asyncio.sleep(0)
            loop.stop()

        loop.add_callback(shutdown)
        self._thread.join(10)

    def __repr__(self) -> str:
        return f"<RemoteExecutor {self.url} workers={len(self.crowd)}>"


def _holding(rec: dict[str, Any]) -> Holding:
    return Holding(rec["id"], rec["memory_budget"], rec["cached"], rec["resident"], rec.get("rss"),
                   keeps_state=rec.get("state") is True)


def _record(rec: dict[str, Any]) -> dict[str, Any]:
    out = dict(rec)
    out["cached"] = set(rec.get("cached", []))
    return out
