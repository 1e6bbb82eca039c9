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
from typing import Any, Mapping

import numpy as np
from tornado.ioloop import IOLoop, PeriodicCallback
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient

from crowdgraph import Partition, wire
from crowdgraph.errors import ExecutionError, InputError, ProtocolError
from crowdgraph.executor import Executor, Job, Reporter
from crowdgraph.schedule import TaskKey, WorkerInfo
from crowdgraph.wire import Message

from .common import (
    CAFILE_ENV, LOG, PendingLoad, Refused, PendingRun, PendingUnload, SHUFFLE_TENSORS, TOKEN_ENV,
    client_ssl_context, join, parse_url, read_token, wait_for_workers,
)
from .coordinator import Action, _pop
from .streams import FrameReader, now, write_message, write_parts

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
    """

    name = "tcp"

    def __init__(self, url: str, token: str | bytes | None = None, *, cafile: str | os.PathLike | None = None,
                 min_workers: int = 1, join_timeout: float = 60.0, connect_timeout: float = 30.0,
                 max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES):
        self.url = url
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
        self.codec, self.version, self.heartbeat = "none", 1, 5.0
        self._outstanding: dict[str, list[Action]] = {}
        self._offsets: dict[str, float] = {}
        self._reporter: Reporter | None = None
        self._by_sha: dict[str, str] = {}
        self._waiters: list[tuple[concurrent.futures.Future[Any], Any]] = []
        self._changed = threading.Condition()
        self._dead: str | None = None
        self._closed = False
        self._stream: IOStream | None = None
        self._last_recv = self._last_sent = now()
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
        reader = FrameReader(stream, wire.FrameDecoder(wire.HANDSHAKE_MAX_FRAME_BYTES))
        try:
            hello = {"versions": list(wire.SUPPORTED_VERSIONS), "name": f"driver@{socket.gethostname()}",
                     "memory_budget": 0, "cores": 1, "platform": f"{sys.platform}-{platform.machine()}",
                     "codecs": list(wire.CODECS), "cached": [], "role": "driver"}

            async def send(data: bytes) -> None:
                await stream.write(data)

            async def receive() -> Message:
                return (await reader.next())[0]

            try:
                welcome, version, codec = await join(send, receive, self.token, hello, self.url)
            except Refused as exc:
                raise ExecutionError(f"the coordinator at {self.url} refused this driver: {exc}") from None
            if welcome.get("role") != "driver":
                raise ExecutionError(f"the coordinator at {self.url} does not take drivers; run "
                                     "`crowdgraph serve` there (an in-process TcpExecutor serves only itself)")
        except BaseException:
            stream.close()
            raise
        reader.decoder.max_frame_bytes = self.max_frame_bytes
        reader.on_bytes = self._got_bytes
        self._stream, self.codec, self.version = stream, codec, version
        self.id, self.heartbeat = welcome["worker_id"], float(welcome["heartbeat"])
        self._last_recv = self._last_sent = now()
        self._ticker = PeriodicCallback(self._tick, self.heartbeat * 1000 / 4)
        self._ticker.start()
        asyncio.ensure_future(self._read_loop(reader))

    def _got_bytes(self) -> None:
        self._last_recv = now()

    def _send(self, message: Message, shuffle: bool = False) -> int:
        if self._stream is None or self._dead:
            return 0
        self._last_sent = now()
        return write_message(self._stream, message, codec=self.codec, version=self.version, shuffle=shuffle)

    def _tick(self) -> None:
        if self._dead:
            return
        t = now()
        if t - self._last_recv > wire.HEARTBEAT_MISSES * self.heartbeat:
            self._lost(f"no frame from it for {t - self._last_recv:.1f} s")
        elif t - self._last_sent >= self.heartbeat:
            self._send(Message(wire.PING, {"seq": 0}))

    async def _read_loop(self, reader: FrameReader) -> None:
        try:
            while not self._dead:
                message, size = await reader.next()
                self._dispatch(message, size)
        except StreamClosedError:
            self._lost("it closed the connection")
        except ProtocolError as exc:
            self._lost(f"protocol error: {exc}")
        except Exception as exc:
            LOG.exception("driver connection to %s failed", self.url)
            self._lost(f"{type(exc).__name__}: {exc}")

    def _lost(self, reason: str) -> None:
        if self._dead:
            return
        self._dead = reason
        if self._stream is not None:
            self._stream.close()
        if not self._closed:
            LOG.warning("lost the coordinator at %s: %s", self.url, reason)
        reporter = self._reporter
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
        if kind == wire.PING:
            self._send(Message(wire.PONG, {"seq": h["seq"]}))
        elif kind == wire.PONG:
            pass
        elif kind == wire.BYE:
            self._lost(f"it said goodbye ({h.get('reason', '')})")
        elif kind == wire.CROWD:
            self.crowd = {rec["id"]: _record(rec) for rec in h.get("workers", [])}
            if self._waiters:
                future, payload = self._waiters.pop(0)
                future.set_result(self._activate(payload))
            with self._changed:
                self._changed.notify_all()
        elif kind == wire.JOINED:
            rec = _record(h["worker"])
            self.crowd[rec["id"]] = rec
            if self._reporter is not None:
                self._reporter.worker_joined(self._info(rec))
            with self._changed:
                self._changed.notify_all()
        elif kind == wire.LOST:
            worker = h["worker"]
            self.crowd.pop(worker, None)
            self._outstanding.pop(worker, None)
            if self._reporter is not None:
                self._reporter.worker_lost(worker, h["reason"])
            with self._changed:
                self._changed.notify_all()
        elif kind in (wire.LOADED, wire.UNLOADED, wire.RESULT, wire.FAILED) and isinstance(h.get("worker"), str):
            self._answer(h["worker"], message, size)
        else:
            raise ProtocolError(f"a coordinator may not send {kind} to a driver")

    def _answer(self, worker: str, message: Message, size: int) -> None:
        received = now()
        h, kind = message.header, message.type
        pending = self._outstanding.get(worker, [])
        if kind == wire.RESULT or (kind == wire.FAILED and "task" in h):
            key = (h["task"][0], h["task"][1])
            action = _pop(pending, lambda a: a.kind == "run" and a.key == key)
        elif kind == wire.LOADED or (kind == wire.FAILED and "load" in h):
            name = h.get("partition", h.get("load"))
            action = _pop(pending, lambda a: a.kind == "load" and a.partition == name)
        else:
            action = _pop(pending, lambda a: a.kind == "unload" and a.partition == h["partition"])
        if action is None or action.token is None:
            return
        token = action.token
        rec = self.crowd.get(worker)
        if isinstance(token, PendingRun):
            if kind == wire.RESULT:
                offset = min(self._offsets.get(worker, received - h["end"]), received - h["end"])
                self._offsets[worker] = offset
                start = max(h["start"] + offset, action.sent)
                end = max(start, min(received, h["end"] + offset))
                token.reporter.task_finished(
                    worker, token.key, message.tensors, start=start, end=end, bytes_in=token.bytes_in,
                    bytes_out=sum(v.nbytes for v in message.tensors.values()), wire_in=action.size,
                    wire_out=size, peak_rss=h["peak_rss"], rss=h["rss"])
            else:
                token.reporter.task_failed(worker, token.key, h.get("error", "failed"))
        elif isinstance(token, PendingLoad):
            if kind == wire.LOADED:
                if rec is not None:
                    rec["cached"].add(action.sha256)
                token.reporter.loaded(worker, action.partition, start=max(action.sent, received - h["seconds"]),
                                      end=received, bytes_sent=0 if action.from_cache else action.size,
                                      from_cache=action.from_cache, rss=h["rss"])
            elif action.from_cache:  # the worker's cache lost it: send the bytes (the coordinator holds the rest)
                LOG.info("worker %s no longer caches %s (%s); sending its bytes", worker, action.partition,
                         h.get("error"))
                if rec is not None:
                    rec["cached"].discard(action.sha256)
                self._send_action(worker, self._load_action(worker, token, from_cache=False))
            else:
                token.reporter.load_failed(worker, action.partition, h.get("error", "failed"))
        elif isinstance(token, PendingUnload) and token.reporter is not None and kind == wire.UNLOADED:
            token.reporter.unloaded(worker, action.partition, rss=h["rss"])

    def _send_action(self, worker: str, action: Action) -> None:
        if self._dead or self._stream is None:
            return
        assert action.parts is not None
        action.size = write_parts(self._stream, action.parts)
        action.parts = None
        action.sent = self._last_sent = now()
        self._outstanding.setdefault(worker, []).append(action)
        rec = self.crowd.get(worker)
        if rec is not None:
            if action.kind == "load":
                rec["resident"] = action.sha256
                if not action.from_cache:
                    rec["cached"].add(action.sha256)
            elif action.kind == "unload":
                rec["resident"] = None

    # -- crowd snapshots -----------------------------------------------------

    def _crowd_snapshot(self, payload: Any, timeout: float) -> Any:
        """Ask for the crowd; on the answer, activate ``payload`` (reporter, job) atomically."""
        assert self._loop is not None
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def ask() -> None:
            if self._dead:
                future.set_exception(ExecutionError(f"lost the coordinator at {self.url}: {self._dead}"))
                return
            self._waiters.append((future, payload))
            self._send(Message(wire.CROWD, {}))

        self._loop.add_callback(ask)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise ExecutionError(f"the coordinator at {self.url} did not send its crowd within {timeout:.0f} s") from None

    def _activate(self, payload: Any) -> list[WorkerInfo] | None:
        if payload is None:
            return None
        reporter, by_sha = payload
        self._reporter, self._by_sha = reporter, by_sha
        crowd = []
        for rec in self.crowd.values():
            sha = rec["resident"]
            resident = by_sha.get(sha) if sha else None
            if sha and resident is None:  # a partition of another plan: free that memory
                self._send_action(rec["id"], self._unload_action(rec["id"], "resident", None))
            crowd.append(self._info(rec, resident))
        return crowd

    def _info(self, rec: dict[str, Any], resident: str | None = None) -> WorkerInfo:
        cached = frozenset(self._by_sha[s] for s in rec["cached"] if s in self._by_sha)
        return WorkerInfo(rec["id"], memory=rec["memory_budget"], speed=1.0, cached=cached, resident=resident)

    # -- the executor protocol -----------------------------------------------

    def start(self, job: Job, reporter: Reporter) -> list[WorkerInfo]:
        if self._closed or self._dead:
            raise ExecutionError(f"the connection to the coordinator at {self.url} is gone "
                                 f"({self._dead or 'closed'}); make a new executor")
        wait_for_workers(self._changed, lambda: len(self.crowd), self.min_workers, self.join_timeout, self.url,
                         gone=lambda: bool(self._dead))
        by_sha = {p.sha256: name for name, p in job.partitions.items()}
        crowd = self._crowd_snapshot((reporter, by_sha), 60.0)
        if len(crowd) < self.min_workers:
            raise ExecutionError(f"only {len(crowd)} workers are connected to {self.url}, "
                                 f"{self.min_workers} needed")
        return crowd

    def _load_action(self, worker: str, token: PendingLoad, *, from_cache: bool) -> Action:
        part = token.partition
        header = {"partition": part.name, "sha256": part.sha256, "from_cache": from_cache, "worker": worker}
        blobs = {} if from_cache else {"model": part.model_bytes}
        parts = wire.encode_parts(Message(wire.LOAD, header, blobs=blobs), codec=self.codec, version=self.version)
        return Action("load", part.name, token=token, parts=parts, sha256=part.sha256, from_cache=from_cache)

    def _unload_action(self, worker: str, name: str, reporter: Reporter | None) -> Action:
        parts = wire.encode_parts(Message(wire.UNLOAD, {"partition": name, "worker": worker}), version=self.version)
        return Action("unload", name, token=PendingUnload(reporter), parts=parts)

    def _hand(self, worker: str, action: Action) -> None:
        assert self._loop is not None
        self._loop.add_callback(self._send_action, worker, action)

    def load(self, worker: str, partition: Partition) -> None:
        rec = self.crowd.get(worker)
        if rec is None or self._reporter is None:
            return
        cached = partition.sha256 in rec["cached"]
        self._hand(worker, self._load_action(worker, PendingLoad(self._reporter, partition), from_cache=cached))

    def unload(self, worker: str, partition: str) -> None:
        self._hand(worker, self._unload_action(worker, partition, self._reporter))

    def run(self, worker: str, key: TaskKey, partition: Partition, inputs: Mapping[str, Any]) -> None:
        reporter = self._reporter
        if reporter is None:
            return
        key = (str(key[0]), int(key[1]))
        try:
            arrays = {name: np.asarray(value) for name, value in inputs.items()}
            parts = wire.encode_parts(Message(wire.RUN, {"task": list(key), "outputs": list(partition.outputs),
                                                         "worker": worker}, tensors=arrays),
                                      codec=self.codec, version=self.version, shuffle=SHUFFLE_TENSORS)
        except (TypeError, ValueError) as exc:
            reporter.task_failed(worker, key, f"cannot send the inputs: {exc}")
            return
        self._hand(worker, Action("run", partition.name, token=PendingRun(reporter, key, sum(a.nbytes for a in arrays.values())),
                                  parts=parts, key=key))

    def reset(self) -> None:
        def unload_all() -> None:
            for rec in list(self.crowd.values()):
                if rec["resident"] is not None:
                    self._send_action(rec["id"], self._unload_action(rec["id"], self._by_sha.get(rec["resident"], "resident"), None))

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
            if self._stream is not None and not self._dead:
                try:
                    await asyncio.wait_for(self._stream.write(wire.encode(
                        Message(wire.BYE, {"reason": "the driver closed"}), version=self.version)), 1.0)
                except (StreamClosedError, asyncio.TimeoutError):
                    pass
            self._dead = self._dead or "closed"
            if getattr(self, "_ticker", None) is not None:
                self._ticker.stop()
            if self._stream is not None:
                self._stream.close()
            await asyncio.sleep(0)
            loop.stop()

        loop.add_callback(shutdown)
        self._thread.join(10)

    def __repr__(self) -> str:
        return f"<RemoteExecutor {self.url} workers={len(self.crowd)}>"


def _record(rec: dict[str, Any]) -> dict[str, Any]:
    out = dict(rec)
    out["cached"] = set(rec.get("cached", []))
    return out
