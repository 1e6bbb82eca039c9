"""A :class:`crowdgraph.wire.Connection` over a tornado IOStream: the thin I/O around the rules.

:class:`Link` reads from the stream no more than the connection still
needs for the frame being received, so each read completes at most one
frame and the size of every frame on the wire is exact (the run report
counts it).  Every chunk received counts as a sign of life for the
heartbeat, a large frame still arriving included.  Whatever the
connection has to say (a CHALLENGE, a PONG, a BYE telling the peer why
it is being closed) is written out after each read.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamClosedError

from crowdgraph import wire

from .common import frame_size

#: Largest chunk read from a socket at once.
CHUNK = 1 << 20
#: Frames larger than this are decoded on a worker thread, not the IOLoop's.
OFF_LOOP_BYTES = 1 << 20


def now() -> float:
    """The clock the coordinator and drivers report in (``time.perf_counter``)."""
    return time.perf_counter()


class Gate(Protocol):
    """What bytes a connection may still read (the pre-handshake limits, see :class:`~crowdgraph_tcp.common.PreAuthLimits`)."""

    def allow(self, wanted: int) -> int:
        """How many of ``wanted`` bytes may be read now (at least 1); raises ProtocolError when none."""

    def charge(self, size: int) -> None:
        """``size`` bytes were read; raises ProtocolError when they are more than allowed."""


class Link:
    """One connection: ``stream`` carries the bytes, ``conn`` keeps the protocol's rules."""

    def __init__(self, stream: IOStream, conn: wire.Connection):
        self.stream = stream
        self.conn = conn

    async def next(self, gate: Gate | None = None) -> tuple[wire.Message, int]:
        """The next message the caller must act on, and its size on the wire in bytes.

        Raises :class:`~crowdgraph.errors.ProtocolError` for bad bytes or
        order (:meth:`drain` the frame saying why, then close) and
        :class:`tornado.iostream.StreamClosedError` when the peer closed.
        With a ``gate``, no read exceeds what it allows, and each is charged to it.
        """
        while True:
            wanted = min(self.conn.needed, CHUNK)
            chunk = await self.stream.read_bytes(wanted if gate is None else gate.allow(wanted), partial=True)
            if gate is not None:
                gate.charge(len(chunk))
            if len(chunk) == self.conn.needed and self.conn.buffered + len(chunk) > OFF_LOOP_BYTES:
                # A large frame is complete: decode it off the loop, which goes on
                # answering heartbeats and serving the other connections meanwhile.
                frames = await IOLoop.current().run_in_executor(None, self.conn.decode_frames, chunk)
            else:
                frames = self.conn.decode_frames(chunk)
            try:
                messages = self.conn.take_frames(frames, now=now())
            finally:
                self.flush()
            if messages:
                return messages[0], self.conn.last_frame_bytes

    def send(self, message: wire.Message) -> int:
        """Send ``message`` with the agreed codec; return its size (0 once closed)."""
        size = self.conn.send(message, now=now())
        self.flush()
        return size

    def send_encoded(self, type_name: str, parts: list[Any], header: dict[str, Any] | None = None) -> int:
        """Send a frame encoded elsewhere (``encode_parts`` buffers); return its size (0 once closed)."""
        if not self.conn.sending(type_name, now=now(), header=header):
            return 0
        return frame_size(parts) if self._write(parts) is not None else 0

    def flush(self) -> Any:
        """Write what the connection queued; return the last write's future (None if nothing)."""
        parts = self.conn.data_to_send()
        return self._write(parts) if parts else None

    def _write(self, parts: list[Any]) -> Any:
        last = None
        try:
            for part in parts:
                last = self.stream.write(part)
        except StreamClosedError:
            return None
        return last

    async def drain(self, timeout: float = 2.0) -> None:
        """Write what is queued and wait at most ``timeout`` seconds for it to leave (before a close)."""
        written = self.flush()
        if written is not None:
            try:
                await asyncio.wait_for(written, timeout)
            except (StreamClosedError, asyncio.TimeoutError):
                pass
