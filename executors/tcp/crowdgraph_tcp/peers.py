"""Links between workers: a worker holds outputs for the tasks that read them, and serves them.

Without these links every tensor between two partitions crosses the
coordinator twice (RESULT in, RUN out).  With them, a RUN may ask its
worker to *hold* some outputs (RUN ``hold``): the RESULT then names them
(``held``: dtype and shape) instead of carrying them, and the RUN of a task
that reads one names where it is (``fetch``: the holder's id and, when the
two can reach each other, its peer address).  The reading worker fetches it
straight from the holder's peer port, or through the coordinator when that
fails or no address was given (docs/protocol.md §11).

This module is the worker's side, as thin I/O around
:class:`crowdgraph.wire.Connection` (roles :data:`~crowdgraph.wire.HOLDER`
and :data:`~crowdgraph.wire.FETCHER`, with the same frames, limits and
token proof as the link to the coordinator):

* :class:`HeldOutputs`: what this worker holds, within a byte bound;
* :class:`PeerServer`: the peer port, answering FETCH from other workers;
* :class:`PeerLinks`: this worker's links to other workers' peer ports,
  one per address, opened on first use and reused.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Iterable, Mapping

import numpy as np

from crowdgraph import wire
from crowdgraph.errors import CrowdgraphError, ProtocolError
from crowdgraph.wire import Message

__all__ = ["HeldOutputs", "PeerServer", "PeerLinks", "FetchError", "fetched_problem", "form_problem", "answer_fetch",
           "encode_answer"]

#: Largest read from a peer socket at once.
CHUNK = 1 << 20
#: A worker encodes and decodes frames larger than this on a thread, so its loop keeps
#: answering heartbeats and serving other links; smaller ones (a few milliseconds of
#: CRC32 and copying: a boundary tensor of 8x128 rows is 3 MB) inline, as the
#: hand-off to a thread and back costs more on a busy machine.
OFF_LOOP_BYTES = 1 << 23
#: Largest frame a holder takes from a fetcher: FETCH frames are a few hundred bytes.
FETCH_FRAME_BYTES = 1 << 16
#: Most peer connections a holder serves at once (each costs a few buffers).
MAX_PEER_CONNECTIONS = 64
#: Seconds to connect to a peer and prove the token before the coordinator's star is used instead.
CONNECT_TIMEOUT = 3.0
#: Seconds a fetcher waits for the next bytes of an answer before it asks the coordinator instead
#: (which loses a holder that stopped answering after three heartbeats).
READ_TIMEOUT = 30.0

TaskKey = tuple[str, int]


class FetchError(CrowdgraphError):
    """A held input could not be had from ``holder`` (it does not hold it, or it is gone)."""

    def __init__(self, holder: str, text: str):
        super().__init__(text)
        self.holder = holder


class HeldOutputs:
    """The outputs this worker holds for other tasks, by task key and output name.

    Thread-safe: the compute thread adds, the I/O loop serves and drops.
    ``limit`` bounds the bytes held; an output that would pass it is sent
    back with the RESULT instead (the coordinator's own bound normally
    keeps far below it).

    >>> held = HeldOutputs(limit=100)
    >>> held.keep(("p0", 0), {"y": np.zeros(4, np.float32), "big": np.zeros(100, np.uint8)})
    {'y': {'dtype': 'float32', 'shape': [4]}}
    >>> held.get(("p0", 0), ["y"])["y"].shape, held.bytes
    ((4,), 16)
    >>> held.drop(("p0", 0), ["y"]); held.bytes
    0
    """

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.bytes = 0
        self._held: dict[TaskKey, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()

    def keep(self, task: TaskKey, outputs: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
        """Hold those of ``outputs`` that fit; return RESULT ``held`` entries for them.

        The caller sends the others back and leaves out those it holds.
        """
        entries: dict[str, dict[str, Any]] = {}
        with self._lock:
            for name, value in outputs.items():
                if value.dtype.kind not in "biufc" or self.bytes + value.nbytes > self.limit:
                    continue
                self._held.setdefault(task, {})[name] = value
                self.bytes += value.nbytes
                entries[name] = {"dtype": value.dtype.name, "shape": [int(d) for d in value.shape]}
        return entries

    def get(self, task: TaskKey, names: Iterable[str]) -> dict[str, np.ndarray]:
        """The held outputs ``names`` of ``task``; KeyError names what is not held."""
        with self._lock:
            outputs = self._held.get(task, {})
            missing = [n for n in names if n not in outputs]
            if missing:
                raise KeyError(f"outputs {missing} of task {list(task)} are not held here")
            return {n: outputs[n] for n in names}

    def drop(self, task: TaskKey, names: Iterable[str]) -> None:
        """Forget the held outputs ``names`` of ``task`` (those not held are ignored)."""
        with self._lock:
            outputs = self._held.get(task, {})
            for n in names:
                value = outputs.pop(n, None)
                if value is not None:
                    self.bytes -= value.nbytes
            if not outputs:
                self._held.pop(task, None)

    def clear(self) -> None:
        """Forget everything (the coordinator link closed: no one will ask for them)."""
        with self._lock:
            self._held.clear()
            self.bytes = 0


def fetched_problem(message: Message, task: TaskKey, holder: str, names: Iterable[str]) -> str | None:
    """What is wrong with ``message`` as the answer to a FETCH of ``names`` of ``task`` from ``holder``.

    >>> answer = Message(wire.FETCHED, {"task": ["p0", 1], "holder": "w1"}, tensors={"y": np.zeros(2)})
    >>> fetched_problem(answer, ("p0", 1), "w1", ["y"]) is None
    True
    >>> fetched_problem(answer, ("p0", 1), "w1", ["y", "z"])
    "FETCHED from w1 carries ['y'], not the outputs asked for, ['y', 'z']"
    """
    h = message.header
    if message.type != wire.FETCHED or tuple(h["task"]) != tuple(task) or h["holder"] != holder:
        return f"{holder} answered a FETCH of task {list(task)} with {message.type} {h}"
    if "error" in h:
        return f"{holder} could not send outputs of task {list(task)}: {h['error']}"
    if sorted(message.tensors) != sorted(names):
        return f"FETCHED from {holder} carries {sorted(message.tensors)}, not the outputs asked for, {sorted(names)}"
    return None


def form_problem(name: str, value: np.ndarray, dtype: str, shape: Iterable[int]) -> str | None:
    """Why output ``name``, fetched as ``value``, is not of the ``dtype`` and ``shape`` its holder announced, or None.

    >>> form_problem("h", np.zeros((2, 3), np.float32), "float32", [2, 3]) is None
    True
    >>> form_problem("h", np.zeros(2), "float32", [2])
    "output 'h' came as float64 [2], not the float32 [2] its holder announced"
    """
    if value.dtype.name == dtype and list(value.shape) == list(shape):
        return None
    return (f"output {name!r} came as {value.dtype.name} {list(value.shape)}, "
            f"not the {dtype} {list(shape)} its holder announced")


def answer_fetch(held: HeldOutputs, message: Message, me: str) -> Message:
    """The FETCHED answering ``message``, a FETCH of outputs this worker (``me``) should hold."""
    h = message.header
    if h["holder"] != me:
        return Message(wire.FETCHED, {"task": h["task"], "holder": h["holder"],
                                      "error": f"this is worker {me}, not {h['holder']}"})
    try:
        tensors = held.get((h["task"][0], h["task"][1]), h["outputs"])
    except KeyError as exc:
        return Message(wire.FETCHED, {"task": h["task"], "holder": me, "error": str(exc.args[0])})
    return Message(wire.FETCHED, {"task": h["task"], "holder": me}, tensors=tensors)


async def encode_answer(answer: Message, codec: str, version: int) -> list[Any]:
    """``answer``'s frame as :func:`crowdgraph.wire.encode_parts` buffers, encoded on a
    thread when its tensors pass :data:`OFF_LOOP_BYTES`."""
    encode = lambda: wire.encode_parts(answer, codec=codec, version=version)  # noqa: E731
    if sum(t.nbytes for t in answer.tensors.values()) > OFF_LOOP_BYTES:
        return await asyncio.get_running_loop().run_in_executor(None, encode)
    return encode()


async def _next_message(reader: asyncio.StreamReader, conn: wire.Connection, writer: asyncio.StreamWriter,
                        timeout: float | None) -> Message:
    """Read until ``conn`` yields a message (what it answers itself is written at once)."""
    loop = asyncio.get_running_loop()
    while True:
        data = await asyncio.wait_for(reader.read(min(max(conn.needed, 1), CHUNK)), timeout)
        if not data:
            raise EOFError("the peer closed the connection")
        if len(data) == conn.needed and conn.buffered + len(data) > OFF_LOOP_BYTES:
            frames = await loop.run_in_executor(None, conn.decode_frames, data)
        else:
            frames = conn.decode_frames(data)
        try:
            messages = conn.take_frames(frames, now=time.monotonic())
        finally:
            writer.writelines(conn.data_to_send())
        if messages:
            return messages[0]  # a fetcher asks one FETCH at a time: never more than one


class PeerServer:
    """This worker's peer port: other workers of the crowd fetch what it holds.

    Each connection must prove the shared token (HELLO role ``fetcher``)
    within the handshake timeout, may then only send FETCH (and heartbeats),
    and is closed after three heartbeats of silence.  At most
    :data:`MAX_PEER_CONNECTIONS` are served at once; frames from a fetcher
    are capped at :data:`FETCH_FRAME_BYTES`.
    """

    def __init__(self, held: HeldOutputs, token: bytes, *, codecs: Iterable[str] = wire.CODECS,
                 heartbeat: float = 5.0, log: Any = None):
        self.held = held
        self.token = token
        self.codecs = tuple(codecs)
        self.heartbeat = heartbeat
        self.log = log
        #: This worker's id at the coordinator: FETCHes must name it.
        self.me = ""
        self._server: asyncio.base_events.Server | None = None
        self._open = 0

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` (0: a free port); return the address bound."""
        self._server = await asyncio.start_server(self._handle, host, port)
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_PEER_CONNECTIONS or not self.me:
            writer.close()
            return
        self._open += 1
        conn = wire.Connection(wire.HOLDER, token=self.token, now=time.monotonic(), heartbeat=self.heartbeat,
                               codecs=self.codecs, lossy=(), max_frame_bytes=FETCH_FRAME_BYTES)
        try:
            hello = await asyncio.wait_for(_next_message(reader, conn, writer, None), wire.HANDSHAKE_TIMEOUT)
            conn.welcome(f"fetcher {hello.header['name']}"[:wire.MAX_NAME_CHARS], now=time.monotonic())
            writer.writelines(conn.data_to_send())
            while True:
                message = await _next_message(reader, conn, writer, wire.HEARTBEAT_MISSES * self.heartbeat)
                if message.type == wire.BYE:
                    return
                parts = await encode_answer(answer_fetch(self.held, message, self.me), conn.codec, conn.version)
                if conn.sending(wire.FETCHED, now=time.monotonic()):
                    writer.writelines(parts)
                    await writer.drain()
        except (OSError, EOFError, asyncio.TimeoutError, ProtocolError) as exc:
            writer.writelines(conn.data_to_send())  # the REFUSE or BYE saying why, if any
            if self.log is not None and not isinstance(exc, (EOFError, asyncio.TimeoutError)):
                print(f"crowdgraph-worker: closed a peer link: {exc}", file=self.log, flush=True)
        finally:
            self._open -= 1
            writer.close()


class PeerLinks:
    """This worker's links to the peer ports of the workers holding what its tasks read.

    One link per address, opened on first use (the token proved both ways)
    and reused; one FETCH at a time on each.  An address that cannot be
    reached, or whose handshake fails, is remembered: its fetches go
    through the coordinator from then on (:meth:`unreachable`).
    """

    def __init__(self, token: bytes, hello: Mapping[str, Any], *, max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES):
        self.token = token
        self.hello = dict(hello, cached=[])
        self.max_frame_bytes = max_frame_bytes
        self._links: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter, wire.Connection]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._unreachable: dict[str, str] = {}

    def unreachable(self, address: str) -> str | None:
        """Why ``address`` is not tried again (its fetches take the star), or None."""
        return self._unreachable.get(address)

    async def fetch(self, address: str, holder: str, task: TaskKey, names: list[str]) -> dict[str, np.ndarray]:
        """The held outputs ``names`` of ``task`` from ``holder`` at ``address``.

        Raises :class:`FetchError` when the holder answers that it does not
        hold them, and OSError / ProtocolError / TimeoutError when the link
        fails (the address is then remembered as unreachable).
        """
        lock = self._locks.setdefault(address, asyncio.Lock())
        async with lock:
            for attempt in (0, 1):  # a reused link the holder closed for silence is opened again once
                fresh = address not in self._links
                try:
                    reader, writer, conn = await self._link(address)
                    conn.send(Message(wire.FETCH, {"task": list(task), "outputs": names, "holder": holder}),
                              now=time.monotonic())
                    writer.writelines(conn.data_to_send())
                    answer = await _next_message(reader, conn, writer, READ_TIMEOUT)
                    break
                except (OSError, EOFError, asyncio.TimeoutError, ProtocolError) as exc:
                    self._close(address)
                    if fresh or attempt:
                        self._unreachable[address] = f"{type(exc).__name__}: {exc}"
                        raise
        problem = fetched_problem(answer, task, holder, names)
        if problem is not None:
            raise FetchError(holder, problem)
        return dict(answer.tensors)

    async def _link(self, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, wire.Connection]:
        link = self._links.get(address)
        if link is not None:
            return link
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), CONNECT_TIMEOUT)
        conn = wire.Connection(wire.FETCHER, token=self.token, now=time.monotonic(), lossy=(),
                               max_frame_bytes=self.max_frame_bytes)
        try:
            conn.hello(self.hello, now=time.monotonic())
            writer.writelines(conn.data_to_send())
            await _next_message(reader, conn, writer, CONNECT_TIMEOUT)  # WELCOME
        except BaseException:
            writer.close()
            raise
        self._links[address] = (reader, writer, conn)
        return self._links[address]

    def _close(self, address: str) -> None:
        link = self._links.pop(address, None)
        if link is not None:
            link[1].close()

    def close(self) -> None:
        for address in list(self._links):
            self._close(address)
