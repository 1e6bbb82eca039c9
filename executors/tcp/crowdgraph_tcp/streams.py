"""Frames over tornado IOStreams: one reader per connection, exact frame sizes.

The reader hands every byte to a :class:`crowdgraph.wire.FrameDecoder`, so
the decoder's checks (magic, version, size limit from the header alone)
apply before the body is buffered.  It reads one frame at a time, which
gives the exact size of each frame on the wire for the run report, and it
notes the time of every chunk received: a large frame still arriving
counts as a sign of life for the heartbeat.
"""

from __future__ import annotations

import struct
import time
from typing import Any, Callable

from tornado.iostream import IOStream, StreamClosedError

from crowdgraph import wire
from crowdgraph.errors import ProtocolError

from .common import frame_size

#: Largest chunk read from a socket at once.
CHUNK = 1 << 20
_BODY_LENGTH = struct.Struct("<Q")  # at offset 8 of the fixed header (docs/protocol.md §2)


class FrameReader:
    """Read whole messages from ``stream`` through ``decoder``."""

    def __init__(self, stream: IOStream, decoder: wire.FrameDecoder,
                 on_bytes: Callable[[], None] | None = None):
        self.stream = stream
        self.decoder = decoder
        self.on_bytes = on_bytes

    async def next(self) -> tuple[wire.Message, int]:
        """The next message and its size on the wire in bytes.

        Raises :class:`ProtocolError` for bad bytes and
        :class:`tornado.iostream.StreamClosedError` when the peer closed.
        """
        header = bytearray()
        messages: list[wire.Message] = []
        while len(header) < wire.HEADER_SIZE:
            chunk = await self.stream.read_bytes(wire.HEADER_SIZE - len(header), partial=True)
            self._got()
            header += chunk
            messages += self.decoder.feed(chunk)  # bad magic fails after 4 bytes, limits at 24
        remaining = _BODY_LENGTH.unpack_from(header, 8)[0]
        while remaining > 0:
            chunk = await self.stream.read_bytes(min(remaining, CHUNK), partial=True)
            self._got()
            remaining -= len(chunk)
            messages += self.decoder.feed(chunk)
        if len(messages) != 1:  # cannot happen with a correct decoder; never trust silently
            raise ProtocolError(f"expected one frame, decoded {len(messages)}")
        return messages[0], len(header) + _BODY_LENGTH.unpack_from(header, 8)[0]

    def _got(self) -> None:
        if self.on_bytes is not None:
            self.on_bytes()


def write_parts(stream: IOStream, parts: list[Any]) -> int:
    """Queue a frame (``encode_parts`` buffers) on ``stream``; return its size.

    Returns 0 when the stream is closed already (the peer is being lost).
    """
    try:
        for part in parts:
            stream.write(part)
    except StreamClosedError:
        return 0
    return frame_size(parts)


def write_message(stream: IOStream, message: wire.Message, *, codec: str = "none", version: int = 1,
                  shuffle: bool = False) -> int:
    """Encode and queue ``message``; return its size on the wire (0 if closed)."""
    return write_parts(stream, wire.encode_parts(message, codec=codec, version=version, shuffle=shuffle))


def now() -> float:
    """The clock the coordinator and drivers report in (``time.perf_counter``)."""
    return time.perf_counter()
