"""The crowdgraph wire format and protocol: frames, messages and the connection rules, sans-io.

This is the one file where the bytes exchanged between a coordinator and its
workers are defined.  It holds no sockets, no asyncio and no threads: bytes go
in, :class:`Message` objects come out, and the other way round.  The TCP
transport and the WebSocket endpoint both use it; a Kotlin or JavaScript
client is written from ``docs/protocol.md``, which specifies the same format
byte by byte.  The protocol's rules (handshake order, who may send what,
frame limits, heartbeat deadlines) live here too, in :class:`Connection`.

A frame is::

    fixed header (24 bytes) | control part (UTF-8 JSON object) | sections...

The fixed header carries the magic ``b"CRWD"``, the protocol version, the
message type, reserved flags and the lengths, so a receiver knows the size
of the frame (and can refuse it) before it buffers a single byte of the body.
The control part is JSON because it is compact enough, cannot execute code
and every client language parses it.  Each section holds one tensor or one
blob (ONNX model bytes) with its name, dtype, shape, codec, raw length and the
CRC32 of the raw bytes, so corruption is caught after decompression.

Nothing received is ever pickled, evaluated or imported: dtypes are small
integer codes looked up in a fixed table, message types likewise, and the
control part is checked against the message catalogue before a
:class:`Message` is returned.  Every malformed input raises
:class:`~crowdgraph.errors.ProtocolError`; the connection it came from must
then be closed.

Examples
--------
>>> import numpy as np
>>> msg = Message(RUN, {"task": ["p0", 3], "outputs": ["y"]},
...               tensors={"x": np.arange(6, dtype=np.float32).reshape(2, 3)})
>>> frame = encode(msg)
>>> back = decode(frame)
>>> back.type, back.header["task"], back.tensors["x"].tolist()
('RUN', ['p0', 3], [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])

A stream decoder takes whatever chunks the socket delivers:

>>> decoder = FrameDecoder()
>>> decoder.feed(frame[:10])
[]
>>> [m.type for m in decoder.feed(frame[10:] + encode(Message(PING, {"seq": 1})))]
['RUN', 'PING']
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from crowdgraph.errors import AuthenticationError, ProtocolError
from crowdgraph.units import format_bytes

try:  # lz4 is a dependency of crowdgraph, but a stripped-down peer may lack it.
    import lz4.block as _lz4
except ImportError:  # pragma: no cover - exercised only where lz4 is missing
    _lz4 = None

__all__ = [
    "MAGIC", "PROTOCOL_VERSION", "SUPPORTED_VERSIONS", "HEADER_SIZE", "SECTION_HEADER_SIZE",
    "DEFAULT_MAX_FRAME_BYTES", "HANDSHAKE_MAX_FRAME_BYTES", "MAX_NDIM", "MAX_STRINGS", "MAX_NAME_CHARS", "MAX_TEXT_CHARS", "is_name", "CODECS", "HEARTBEAT_MISSES", "HANDSHAKE_TIMEOUT",
    "LOSSY", "lossy_encode", "lossy_decode",
    "HELLO", "CHALLENGE", "AUTH", "WELCOME", "REFUSE", "BYE", "PING", "PONG",
    "LOAD", "LOADED", "UNLOAD", "UNLOADED", "STORE", "STORED", "RUN", "RESULT", "FAILED",
    "FETCH", "FETCHED", "DROP", "CROWD", "JOINED", "LOST", "ROLES",
    "MESSAGE_TYPES", "Message", "encode", "encode_parts", "decode", "FrameDecoder",
    "make_nonce", "sign", "verify", "negotiate", "frame_length",
    "COORDINATOR", "WORKER", "DRIVER", "HOLDER", "FETCHER", "Connection", "Refused", "BlobHead", "read_blob_head",
    "SEND_HELLO", "AWAIT_CHALLENGE", "AWAIT_WELCOME", "AWAIT_HELLO", "AWAIT_AUTH", "AUTHENTICATED",
    "OPEN", "CLOSED", "ERROR",
]

# --------------------------------------------------------------------------
# Constants of the format.  Changing any of them is a new protocol version.
# --------------------------------------------------------------------------

#: First four bytes of every frame.
MAGIC = b"CRWD"
#: The protocol version this module writes by default.
PROTOCOL_VERSION = 1
#: Versions this module can read and write, oldest first.
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)

# Fixed header, little-endian: magic, version u8, type u8, flags u16,
# body length u64, control length u32, section count u32.
_HEADER = struct.Struct("<4sBBHQII")
#: Size of the fixed header in bytes.
HEADER_SIZE = _HEADER.size  # 24

# Section header, little-endian: kind u8, dtype u8, codec u8, flags u8,
# name length u16, ndim u8, reserved u8, raw length u64, payload length u64,
# CRC32 u32.  Followed by the name, ndim u64 dimensions, then the payload.
_SECTION = struct.Struct("<BBBBHBBQQI")
#: Size of the fixed part of a section header in bytes.
SECTION_HEADER_SIZE = _SECTION.size  # 28

#: Frames larger than this (header included) are refused by default.
DEFAULT_MAX_FRAME_BYTES = 256 * 2**20
#: Limit for frames before the handshake is done (HELLO, AUTH): an
#: unauthenticated peer should not make the coordinator buffer 256 MiB.
#: :class:`Connection` holds both sides to it until WELCOME, then raises it.
HANDSHAKE_MAX_FRAME_BYTES = 2**20
#: Highest tensor rank on the wire (numpy 1.x allows 32).
MAX_NDIM = 32
#: Longest name a peer may give (a worker, a partition, a tensor), in characters.
MAX_NAME_CHARS = 1024
#: Longest free text in a header (an error, a reason), in characters.
MAX_TEXT_CHARS = 65536
#: Most string elements in one frame.  Each costs a Python object to decode,
#: far more than its 4-byte length on the wire: 64 Mi empty strings fit a
#: 1 MB lz4 frame and would take a minute and gigabytes to decode.
MAX_STRINGS = 2**20
#: A peer that has received no frame for this many heartbeat intervals
#: considers the other side lost and closes the connection.
HEARTBEAT_MISSES = 3
#: Seconds within which HELLO ... WELCOME must complete, else close.
HANDSHAKE_TIMEOUT = 30.0

_KIND_TENSOR, _KIND_BLOB = 1, 2
_MAX_RATIO = {"lz4": 255, "zlib": 1032}  # most output bytes one compressed byte can yield
_FLAG_SHUFFLE = 0x01
# Section flag bits 1-2: a float32 tensor sent with a lossy encoding (§4.8).
_LOSSY_FLAGS = {"fp16": 0x02, "int8": 0x04}
_LOSSY_NAMES = {bit: name for name, bit in _LOSSY_FLAGS.items()}
_FLAGS_KNOWN = _FLAG_SHUFFLE | 0x02 | 0x04
#: Lossy tensor encodings this process can decode and send, on links whose
#: handshake agreed them; none is used unless a run asks for it.
LOSSY: tuple[str, ...] = ("fp16", "int8")
_FP16_MAX = 65504.0  # largest finite float16
_INT8_PREFIX = 8  # float32 scale, float32 offset, then one uint8 code per element
_MAX_INT = 2**63 - 1  # JSON integers must fit a signed 64-bit int (Kotlin Long)

# Codec codes on the wire.  "none" must be understood by every peer.
_CODEC_CODES = {"none": 0, "lz4": 1, "zlib": 2}
_CODEC_NAMES = {code: name for name, code in _CODEC_CODES.items()}
#: Codecs this process can encode and decode, in order of preference.
CODECS: tuple[str, ...] = ("lz4", "zlib", "none") if _lz4 is not None else ("zlib", "none")
# zlib level 1: on float activations levels 6-9 gain a few percent for 3-10x
# the time; a phone is better off sending a little more.
_ZLIB_LEVEL = 1
#: Sections at least this large are compressed only when samples of them
#: come out smaller (as dask.distributed's ``maybe_compress``): unshuffled
#: float activations grow to about 1.004 of their size under lz4, and the
#: attempt costs more than the CRC32 and the send together.
SAMPLED_BYTES = 1 << 18
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 12
_GOLDEN = (5**0.5 - 1) / 2

# --------------------------------------------------------------------------
# Message catalogue.
# --------------------------------------------------------------------------

HELLO = "HELLO"          #: worker -> coordinator: who I am, what I speak
CHALLENGE = "CHALLENGE"  #: coordinator -> worker: nonce, chosen version and codec
AUTH = "AUTH"            #: worker -> coordinator: HMAC of the nonce, own nonce
WELCOME = "WELCOME"      #: coordinator -> worker: id, HMAC of the worker's nonce
REFUSE = "REFUSE"        #: coordinator -> worker: reason; then the connection closes
BYE = "BYE"              #: either way: orderly close
PING = "PING"            #: either way: heartbeat
PONG = "PONG"            #: either way: answer to PING
LOAD = "LOAD"            #: coordinator -> worker: load a partition (bytes or from cache)
LOADED = "LOADED"        #: worker -> coordinator: partition ready
UNLOAD = "UNLOAD"        #: coordinator -> worker: drop a partition
UNLOADED = "UNLOADED"    #: worker -> coordinator: partition dropped
STORE = "STORE"          #: coordinator -> worker: a chunk of a partition for local storage, not for memory
STORED = "STORED"        #: worker -> coordinator: how much of it is there; at the end, whether it was kept
RUN = "RUN"              #: coordinator -> worker: run one task on input tensors
RESULT = "RESULT"        #: worker -> coordinator: output tensors of a task
FAILED = "FAILED"        #: worker -> coordinator: a task or a load failed
# Tensors a worker holds for the tasks that read them (RUN ``hold``): any of
# them may be fetched by the worker that needs them, directly from the
# holder's peer port (FETCHER -> HOLDER) or through the coordinator.
FETCH = "FETCH"          #: fetcher -> holder, coordinator <-> worker: send me these held outputs
FETCHED = "FETCHED"      #: answer to FETCH: the tensors, or why not
DROP = "DROP"            #: coordinator -> worker: forget these held outputs
# Driver connections (a program that runs models on a standing coordinator's
# crowd; HELLO says role "driver"): workers never send or receive these.
CROWD = "CROWD"          #: driver -> coordinator: ask for the crowd; coordinator -> driver: the crowd
JOINED = "JOINED"        #: coordinator -> driver: a worker joined
LOST = "LOST"            #: coordinator -> driver: a worker is gone; driver -> coordinator: drop it
#: Values of HELLO's optional ``role`` field: who opens the connection.
ROLES = ("worker", "driver", "fetcher")

#: Message type name -> the code in byte 5 of the fixed header.
MESSAGE_TYPES: dict[str, int] = {
    HELLO: 0x01, CHALLENGE: 0x02, AUTH: 0x03, WELCOME: 0x04, REFUSE: 0x05,
    BYE: 0x06, PING: 0x07, PONG: 0x08,
    LOAD: 0x10, LOADED: 0x11, UNLOAD: 0x12, UNLOADED: 0x13, STORE: 0x14, STORED: 0x15,
    RUN: 0x20, RESULT: 0x21, FAILED: 0x22, FETCH: 0x23, FETCHED: 0x24, DROP: 0x25,
    CROWD: 0x30, JOINED: 0x31, LOST: 0x32,
}
_TYPE_NAMES = {code: name for name, code in MESSAGE_TYPES.items()}


@dataclass(eq=False)
class Message:
    """One protocol message: a type, a JSON header and optional binary sections.

    Parameters
    ----------
    type
        One of the catalogue constants (:data:`RUN`, :data:`RESULT`, ...).
    header
        JSON-able fields of the message; which keys each type needs is in
        ``docs/protocol.md``.  Keys a receiver does not know are kept and
        ignored, so newer peers may add fields.
    tensors
        Named arrays (inputs of RUN, outputs of RESULT).  Decoded arrays are
        C-contiguous, native-endian, writable and own their memory; string
        tensors come back as ``object`` arrays of ``str``.
    blobs
        Named byte strings (the ONNX model of LOAD, under ``"model"``).
    """

    type: str
    header: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in MESSAGE_TYPES:
            raise ValueError(
                f"unknown message type {self.type!r}; use one of {', '.join(MESSAGE_TYPES)}"
            )

    def __repr__(self) -> str:  # arrays can be huge: show shapes, not values
        parts = [f"{self.type}", f"header={self.header!r}"]
        if self.tensors:
            shapes = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in self.tensors.items())
            parts.append(f"tensors={{{shapes}}}")
        if self.blobs:
            sizes = ", ".join(f"{k}: {len(v)} B" for k, v in self.blobs.items())
            parts.append(f"blobs={{{sizes}}}")
        return f"Message({', '.join(parts)})"


# --------------------------------------------------------------------------
# Dtypes.  Codes are ONNX TensorProto.DataType numbers, so clients that talk
# to onnxruntime already know them.  0 (UNDEFINED) marks a blob.
# --------------------------------------------------------------------------

_STRING = 8
_DTYPE_CODES: dict[str, int] = {
    "float32": 1, "uint8": 2, "int8": 3, "uint16": 4, "int16": 5, "int32": 6,
    "int64": 7, "bool": 9, "float16": 10, "float64": 11, "uint32": 12,
    "uint64": 13, "complex64": 14, "complex128": 15, "bfloat16": 16,
    "float8_e4m3fn": 17, "float8_e4m3fnuz": 18, "float8_e5m2": 19, "float8_e5m2fnuz": 20,
}
_DTYPE_NAMES = {code: name for name, code in _DTYPE_CODES.items()}
_DTYPE_NAMES[_STRING] = "string"
_ML_DTYPES = {"bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz"}
_wire_dtypes: dict[int, np.dtype] = {}


def _wire_dtype(code: int) -> np.dtype:
    """Return the little-endian numpy dtype for a fixed-size dtype code."""
    dt = _wire_dtypes.get(code)
    if dt is None:
        name = _DTYPE_NAMES[code]
        if name in _ML_DTYPES:  # imported lazily: only peers that use them pay
            try:
                import ml_dtypes
            except ImportError:
                raise ProtocolError(
                    f"received a {name} tensor but ml_dtypes is not installed here; "
                    "pip install ml_dtypes (onnx depends on it)"
                ) from None
            dt = np.dtype(getattr(ml_dtypes, name))
        else:
            dt = np.dtype(name).newbyteorder("<")
        _wire_dtypes[code] = dt
    return dt


def _dtype_code(dtype: np.dtype) -> int:
    if dtype.kind in "UO":
        return _STRING
    code = _DTYPE_CODES.get(dtype.name) if dtype.fields is None else None
    if code is None:
        raise ValueError(
            f"dtype {dtype} cannot be sent; supported: {', '.join(_DTYPE_CODES)}, "
            "and str/object arrays of str"
        )
    return code


# --------------------------------------------------------------------------
# Shuffle and codecs.
# --------------------------------------------------------------------------


def _shuffle(raw: np.ndarray, itemsize: int) -> np.ndarray:
    """Group byte ``j`` of every element together (blosc's shuffle).

    Float exponents and sign bytes vary little between neighbours, so after
    the shuffle they form long runs that lz4 and zlib compress well.

    >>> _shuffle(np.frombuffer(b"ABCDabcd", np.uint8), 4).tobytes()
    b'AaBbCcDd'
    """
    return np.ascontiguousarray(raw.reshape(-1, itemsize).T).reshape(-1)


def _unshuffle(data: np.ndarray, itemsize: int) -> np.ndarray:
    """Invert :func:`_shuffle`; returns a new, writable array.

    >>> _unshuffle(np.frombuffer(b"AaBbCcDd", np.uint8), 4).tobytes()
    b'ABCDabcd'
    """
    return data.reshape(itemsize, -1).T.copy().reshape(-1)  # copy() even when n == 1


def _compress(codec: str, data: Any) -> bytes:
    if codec == "lz4":
        if _lz4 is None:
            raise ValueError("codec 'lz4' needs the lz4 package; pip install lz4, or use 'zlib'")
        # Raw LZ4 *block*, no size prefix: the size is in the section header.
        return _lz4.compress(data, mode="default", store_size=False)
    return zlib.compress(data, _ZLIB_LEVEL)


def _compressible(codec: str, data: Any) -> bool:
    """Whether ``data`` (bytes-like, or a uint8 array) may come out smaller compressed.

    Sixteen 4 KiB pieces stand for the whole.  They start at multiples of
    the golden ratio (mod 1) of its length, not evenly spaced: a batch is
    periodic (sequences, rows, and with shuffle byte planes of each), and
    even spacing would sample every period at the same place, such as
    always the start of a sequence and never its padding.

    >>> _compressible("lz4", bytes(1 << 20)), _compressible("lz4", np.random.bytes(1 << 20))
    (True, False)
    """
    n = len(data)
    if n < SAMPLED_BYTES:
        return True
    sample = b"".join(memoryview(data)[int((0.5 + i * _GOLDEN) % 1 * n):][:_SAMPLE_BYTES] for i in range(_SAMPLES))
    return len(_compress(codec, sample)) < len(sample)


def _decompress(codec: str, payload: memoryview, raw_len: int, where: str) -> bytes | bytearray:
    """Decompress exactly ``raw_len`` bytes, or raise ProtocolError."""
    if codec == "none":
        return payload  # type: ignore[return-value]  # caller copies
    if codec == "lz4":
        if _lz4 is None:
            raise ProtocolError(f"{where} uses codec lz4, which this peer cannot decode "
                                "(lz4 is not installed); it was not negotiated")
        try:
            out = _lz4.decompress(payload, uncompressed_size=raw_len, return_bytearray=True)
        except Exception as exc:  # LZ4BlockError subclasses Exception directly
            raise ProtocolError(f"{where}: corrupt lz4 block ({exc})") from None
        if len(out) != raw_len:
            raise ProtocolError(f"{where}: lz4 block decompressed to {len(out)} bytes, "
                                f"the section header announces {raw_len}")
        return out
    # zlib: cap the output at raw_len + 1 so a bomb cannot allocate more.
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(payload, raw_len + 1)
    except zlib.error as exc:
        raise ProtocolError(f"{where}: corrupt zlib stream ({exc})") from None
    if len(out) != raw_len or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        got = (f"{len(out)} bytes" if inflater.eof else f"{len(out)} bytes before the stream ended")
        extra = ", with data after the stream end" if inflater.unused_data else ""
        raise ProtocolError(f"{where}: zlib stream does not decompress to exactly the {raw_len} "
                            f"bytes the section header announces (got {got}{extra})")
    return out


def lossy_encode(array: np.ndarray, lossy: str) -> np.ndarray | None:
    """The raw bytes of a float32 tensor in a lossy encoding, or None to send it exact.

    ``"fp16"``: each element rounded to the nearest float16 (half an fp16
    ulp of error).  ``"int8"``: one affine 8-bit code per element over the
    tensor's own range: ``offset`` is its minimum, ``scale = (max - min) /
    255`` (in float32, rounded up), ``code = round((x - offset) / scale)``, so nothing is clipped and
    each element is off by at most ``scale / 2``.  A tensor that one of them
    cannot carry (an empty one, NaN or infinity, fp16 beyond 65504) is sent
    exact; so is every tensor that is not float32.

    >>> x = np.array([-1.0, 0.0, 0.5, 1.0], np.float32)
    >>> lossy_encode(x, "fp16").view("<f2").tolist()
    [-1.0, 0.0, 0.5, 1.0]
    >>> raw = lossy_encode(x, "int8")
    >>> raw[:8].view("<f4").tolist(), raw[8:].tolist()   # scale 2/255, offset -1
    ([0.007843137718737125, -1.0], [0, 127, 191, 255])
    >>> lossy_decode(raw, "int8", (4,)).tolist()   # 0.0 is off by less than scale / 2
    [-1.0, -0.0039215087890625, 0.49803924560546875, 1.0]
    """
    if array.dtype != np.float32 or array.size == 0:
        return None
    flat = np.ascontiguousarray(array).reshape(-1)
    low, high = float(flat.min()), float(flat.max())  # NaN propagates into both
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    if lossy == "fp16":
        if max(-low, high) > _FP16_MAX:
            return None
        return flat.astype("<f2").view(np.uint8)
    if lossy != "int8":
        raise ValueError(f"unknown lossy encoding {lossy!r}; use one of {', '.join(LOSSY)}")
    scale = np.float32((high - low) / 255)
    if float(scale) * 255 < high - low:  # rounded down (coarse among subnormals): a code would pass 255
        scale = np.nextafter(scale, np.float32(np.inf))
    out = np.empty(_INT8_PREFIX + flat.size, np.uint8)
    out[:_INT8_PREFIX].view("<f4")[:] = (scale, low)
    if scale > 0:
        codes = np.rint((flat.astype(np.float64) - low) / float(scale))
        out[_INT8_PREFIX:] = np.clip(codes, 0, 255)
    else:  # a constant tensor: every code 0, the offset is the value
        out[_INT8_PREFIX:] = 0
    return out


def lossy_decode(raw: np.ndarray, lossy: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 tensor that :func:`lossy_encode`'s ``raw`` bytes stand for.

    >>> lossy_decode(lossy_encode(np.array([[3.0]], np.float32), "fp16"), "fp16", (1, 1))
    array([[3.]], dtype=float32)
    """
    if lossy == "fp16":
        return raw.view("<f2").astype(np.float32).reshape(shape)
    scale, offset = raw[:_INT8_PREFIX].view("<f4").tolist()
    values = raw[_INT8_PREFIX:].astype(np.float32)
    values *= np.float32(scale)
    values += np.float32(offset)
    return values.reshape(shape)


def _lossy_raw_length(lossy: str, count: int) -> int:
    """Raw bytes of ``count`` float32 elements in a lossy encoding."""
    return 2 * count if lossy == "fp16" else _INT8_PREFIX + count


# --------------------------------------------------------------------------
# Encoding.
# --------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    # numpy scalars sneak into headers (rss from a numpy sum, a shape entry).
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def _tensor_raw(name: str, array: np.ndarray) -> tuple[int, np.ndarray]:
    """Return (dtype code, raw little-endian C-order bytes as a uint8 array)."""
    code = _dtype_code(array.dtype)
    if code == _STRING:
        if array.size > MAX_STRINGS:
            raise ValueError(f"string tensor {name!r} has {array.size} elements; the wire allows "
                             f"{MAX_STRINGS} per message")
        encoded = []
        for i, item in enumerate(array.reshape(-1).tolist()):
            if not isinstance(item, str):
                raise TypeError(f"string tensor {name!r}: element {i} is "
                                f"{type(item).__name__}, not str")
            try:
                encoded.append(item.encode("utf-8"))
            except UnicodeEncodeError as exc:
                raise ValueError(f"string tensor {name!r}: element {i} is not "
                                 f"encodable as UTF-8 ({exc})") from None
        if any(len(b) > 0xFFFFFFFF for b in encoded):
            raise ValueError(f"string tensor {name!r} has an element over 4 GiB")
        lengths = np.array([len(b) for b in encoded], dtype="<u4")
        return code, np.frombuffer(lengths.tobytes() + b"".join(encoded), np.uint8)
    wire_dtype = _wire_dtype(code)
    if array.dtype != wire_dtype:
        array = array.astype(wire_dtype)  # big-endian input: swap into wire order
    array = np.ascontiguousarray(array)  # no copy when already contiguous
    return code, array.reshape(-1).view(np.uint8)


def _section(kind: int, name: str, dtype_code: int, shape: tuple[int, ...],
             raw: np.ndarray | bytes | memoryview, itemsize: int,
             codec: str, shuffle: bool, lossy_flag: int = 0) -> list[bytes | memoryview]:
    if not isinstance(name, str) or not name:
        raise TypeError(f"section names must be non-empty str, got {name!r}")
    name_bytes = name.encode("utf-8")
    if len(name_bytes) > 0xFFFF:
        raise ValueError(f"section name {name[:40]!r}... is over 65535 UTF-8 bytes")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"tensor {name!r} has rank {len(shape)}; the wire allows {MAX_NDIM}")
    raw_len = len(raw) if not isinstance(raw, np.ndarray) else raw.nbytes
    crc = zlib.crc32(raw)
    payload: Any = raw if not isinstance(raw, np.ndarray) else memoryview(raw)
    used, flags = "none", 0
    if codec != "none" and raw_len:
        data = raw
        if shuffle and itemsize > 1:
            data, flags = _shuffle(raw, itemsize), _FLAG_SHUFFLE  # type: ignore[arg-type]
        packed = _compress(codec, data) if _compressible(codec, data) else None
        if packed is not None and len(packed) < raw_len:  # else incompressible (random, tiny): sent as is
            payload, used = packed, codec
        else:
            flags = 0
    head = _SECTION.pack(kind, dtype_code, _CODEC_CODES[used], flags | lossy_flag, len(name_bytes),
                         len(shape), 0, raw_len, len(payload) if used != "none" else raw_len, crc)
    return [head + name_bytes + struct.pack(f"<{len(shape)}Q", *shape), payload]


def encode_parts(message: Message, *, codec: str = "lz4", shuffle: bool = False,
                 version: int = PROTOCOL_VERSION, lossy: str | None = None) -> list[bytes | memoryview]:
    """Encode ``message`` as a list of buffers whose concatenation is one frame.

    Sections sent uncompressed are memoryviews of the caller's arrays, not
    copies, so ``transport.writelines(parts)`` or ``socket.sendmsg(parts)``
    avoid a copy of large tensors.  Do not modify the arrays until the parts
    are written.  Parameters are those of :func:`encode`.
    """
    if not isinstance(message, Message):
        raise TypeError(f"encode() takes a Message, got {type(message).__name__}")
    if codec not in _CODEC_CODES:
        raise ValueError(f"unknown codec {codec!r}; use one of {', '.join(_CODEC_CODES)}")
    if lossy is not None and lossy not in LOSSY:
        raise ValueError(f"unknown lossy encoding {lossy!r}; use one of {', '.join(LOSSY)} or None")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"cannot write protocol version {version}; this crowdgraph "
                         f"writes {list(SUPPORTED_VERSIONS)}")
    if not isinstance(message.header, dict):
        raise TypeError(f"{message.type} header must be a dict, "
                        f"got {type(message.header).__name__}")
    for kind, mapping in (("tensors", message.tensors), ("blobs", message.blobs)):
        if not isinstance(mapping, dict):
            raise TypeError(f"{message.type} {kind} must be a dict, got {type(mapping).__name__}")
    try:
        control = json.dumps(message.header, ensure_ascii=False, allow_nan=False,
                             separators=(",", ":"), default=_json_default).encode("utf-8")
        header = json.loads(control)  # what the peer will see (tuples -> lists, ...)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{message.type} header is not JSON-able: {exc}") from None
    problem = _catalogue_problem(message.type, header, list(message.tensors), list(message.blobs))
    if problem:
        raise ValueError(problem)

    parts: list[bytes | memoryview] = []
    for name, array in message.tensors.items():
        if isinstance(array, np.generic):
            array = np.asarray(array)
        if not isinstance(array, np.ndarray):
            raise TypeError(f"tensor {name!r} must be a numpy array, got {type(array).__name__}")
        lossy_raw = lossy_encode(array, lossy) if lossy is not None else None
        if lossy_raw is not None:
            parts += _section(_KIND_TENSOR, name, _DTYPE_CODES["float32"], array.shape, lossy_raw,
                              1 if lossy == "int8" else 2, codec, shuffle,
                              _LOSSY_FLAGS[lossy])  # type: ignore[index]
            continue
        code, raw = _tensor_raw(name, array)
        itemsize = 0 if code == _STRING else array.dtype.itemsize
        parts += _section(_KIND_TENSOR, name, code, array.shape, raw, itemsize, codec, shuffle)
    for name, blob in message.blobs.items():
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise TypeError(f"blob {name!r} must be bytes, got {type(blob).__name__}")
        blob_view = memoryview(blob).cast("B")  # uncompressed, so a receiver may stream it (read_blob_head)
        parts += _section(_KIND_BLOB, name, 0, (), blob_view, 1, "none", False)
    body_len = len(control) + sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    fixed = _HEADER.pack(MAGIC, version, MESSAGE_TYPES[message.type], 0, body_len,
                         len(control), (len(message.tensors) + len(message.blobs)))
    return [fixed + control, *parts]


def encode(message: Message, *, codec: str = "lz4", shuffle: bool = False,
           version: int = PROTOCOL_VERSION, lossy: str | None = None) -> bytes:
    """Encode ``message`` into one frame.

    Parameters
    ----------
    message
        The message; its header is checked against the catalogue, so a
        missing or mistyped field fails here rather than at the peer.
    codec
        ``"lz4"`` (fast, the default), ``"zlib"`` (for peers without lz4,
        e.g. browsers) or ``"none"``.  Use the codec negotiated in CHALLENGE.
        A section that does not shrink is sent with ``"none"``.
    shuffle
        Byte-shuffle tensors whose elements are wider than one byte before
        compressing them; it helps float activations most.
    version
        Protocol version to write, the negotiated one.
    lossy
        ``"fp16"`` or ``"int8"``: send float32 tensors in that lossy
        encoding (see :func:`lossy_encode`); only on a link whose handshake
        agreed it (:attr:`Connection.lossy`).  None (the default) is exact.

    Returns
    -------
    bytes
        The frame.

    Raises
    ------
    ValueError, TypeError
        The message cannot be encoded (unknown dtype, missing header field, ...).

    Examples
    --------
    >>> frame = encode(Message(PING, {"seq": 7}))
    >>> frame[:4], len(frame)
    (b'CRWD', 33)
    """
    return b"".join(encode_parts(message, codec=codec, shuffle=shuffle, version=version, lossy=lossy))


# --------------------------------------------------------------------------
# Decoding.
# --------------------------------------------------------------------------

_KNOWN_NON_PROTOCOLS = {b"GET ": "an HTTP request (browsers must use the WebSocket endpoint)",
                        b"POST": "an HTTP request", b"HTTP": "an HTTP response",
                        b"\x16\x03": "a TLS handshake (is the peer using TLS and this side not?)"}


def _bad_magic(prefix: bytes) -> ProtocolError:
    guess = next((what for start, what in _KNOWN_NON_PROTOCOLS.items()
                  if prefix.startswith(start)), None)
    return ProtocolError(
        f"frame starts with {prefix!r}, not the magic {MAGIC!r}: the peer does not speak "
        f"the crowdgraph wire protocol{f'; this looks like {guess}' if guess else ''}"
    )


def _limit_error(what: str, size: int, limit: int) -> ProtocolError:
    return ProtocolError(
        f"{what} {format_bytes(size)} ({size} bytes), above the {format_bytes(limit)} "
        f"({limit} bytes) limit; raise max_frame_bytes on both ends if this is intended"
    )


def _read_header(view: memoryview, max_frame_bytes: int,
                 versions: Sequence[int]) -> tuple[str, int, int, int, int]:
    """Check a fixed header; return (type, version, control length, sections, frame length)."""
    magic, version, type_code, flags, body_len, control_len, count = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise _bad_magic(bytes(magic))
    if version not in versions:
        raise ProtocolError(f"frame has protocol version {version}; this peer reads "
                            f"{list(versions)} (upgrade the older side)")
    type_name = _TYPE_NAMES.get(type_code)
    if type_name is None:
        raise ProtocolError(f"unknown message type code 0x{type_code:02x} in a version "
                            f"{version} frame")
    if flags:
        raise ProtocolError(f"{type_name} frame has reserved header flags 0x{flags:04x} set")
    if HEADER_SIZE + body_len > max_frame_bytes:
        raise _limit_error(f"{type_name} frame announces", HEADER_SIZE + body_len, max_frame_bytes)
    if control_len + count * SECTION_HEADER_SIZE > body_len:
        raise ProtocolError(
            f"{type_name} frame lengths do not add up: a {control_len}-byte control part and "
            f"{count} sections of at least {SECTION_HEADER_SIZE} bytes do not fit a "
            f"{body_len}-byte body"
        )
    return type_name, version, control_len, count, HEADER_SIZE + body_len


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in the control part")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} overflows a double")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return result


def _parse_control(data: memoryview, type_name: str) -> dict[str, Any]:
    try:
        header = json.loads(str(data, "utf-8"), object_pairs_hook=_unique_keys,
                            parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ProtocolError(f"control part of a {type_name} frame nests too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise ProtocolError(
            f"control part of a {type_name} frame is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"control part of a {type_name} frame is a JSON "
                            f"{type(header).__name__}, not an object")
    try:  # a JSON escape such as "\ud800" decodes to a lone surrogate, which no UTF-8 can carry back
        json.dumps(header, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(f"control part of a {type_name} frame holds a string with a lone surrogate "
                            "(not Unicode text); send valid UTF-8") from None
    return header


@dataclass
class _SectionInfo:
    kind: int
    name: str
    dtype: int
    codec: str
    shuffled: bool
    lossy: str | None
    shape: tuple[int, ...]
    raw_len: int
    crc: int
    payload: memoryview


def _read_sections(body: memoryview, offset: int, count: int, type_name: str,
                   max_frame_bytes: int) -> list[_SectionInfo]:
    """Parse section headers (no decompression yet) and check they tile the body."""
    sections: list[_SectionInfo] = []
    names: dict[int, set[str]] = {_KIND_TENSOR: set(), _KIND_BLOB: set()}
    total_raw = strings = 0
    for index in range(count):
        where = f"{type_name} section {index}"
        if offset + SECTION_HEADER_SIZE > len(body):
            raise ProtocolError(f"{where}: header runs past the end of the frame")
        (kind, dtype, codec_code, flags, name_len, ndim, reserved, raw_len, payload_len,
         crc) = _SECTION.unpack_from(body, offset)
        offset += SECTION_HEADER_SIZE
        if kind not in names:
            raise ProtocolError(f"{where}: unknown section kind {kind}")
        codec = _CODEC_NAMES.get(codec_code)
        if codec is None:
            raise ProtocolError(f"{where}: unknown codec code {codec_code}")
        if reserved or flags & ~_FLAGS_KNOWN:
            raise ProtocolError(f"{where}: reserved bits set (flags 0x{flags:02x}, "
                                f"reserved 0x{reserved:02x})")
        if offset + name_len + 8 * ndim + payload_len > len(body):
            raise ProtocolError(f"{where}: name, shape and payload run past the end of the frame")
        try:
            name = str(body[offset:offset + name_len], "utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{where}: name is not UTF-8") from None
        offset += name_len
        where = f"{type_name} {'tensor' if kind == _KIND_TENSOR else 'blob'} {name!r}"
        if not name:
            raise ProtocolError(f"{type_name} section {index} has an empty name")
        if name in names[kind]:
            raise ProtocolError(f"{where} appears twice in one frame")
        names[kind].add(name)
        shape = struct.unpack_from(f"<{ndim}Q", body, offset)
        offset += 8 * ndim
        payload = body[offset:offset + payload_len]
        offset += payload_len

        if kind == _KIND_BLOB:
            if dtype or ndim or flags:
                raise ProtocolError(f"{where}: a blob must have dtype 0, no shape and no "
                                    f"shuffle (got dtype {dtype}, rank {ndim}, flags {flags})")
        elif dtype not in _DTYPE_NAMES:
            raise ProtocolError(f"{where}: unknown dtype code {dtype}")
        elif ndim > MAX_NDIM or any(d > _MAX_INT for d in shape):
            raise ProtocolError(f"{where}: shape {list(shape)} exceeds the wire's limits "
                                f"(rank <= {MAX_NDIM}, dimensions < 2**63)")
        elif dtype == _STRING:
            if flags:
                raise ProtocolError(f"{where}: shuffle flag set on a string tensor")
            strings += math.prod(shape)
            if strings > MAX_STRINGS:
                raise ProtocolError(f"{where}: shape {list(shape)} brings the frame to {strings} strings, "
                                    f"above the wire's limit of {MAX_STRINGS}; send fewer per message")
            if 4 * math.prod(shape) > raw_len:
                raise ProtocolError(f"{where}: {raw_len} raw bytes cannot hold the lengths "
                                    f"of {math.prod(shape)} strings of shape {list(shape)}")
        elif flags & ~_FLAG_SHUFFLE:
            lossy = _LOSSY_NAMES.get(flags & ~_FLAG_SHUFFLE)
            if lossy is None or dtype != _DTYPE_CODES["float32"]:
                raise ProtocolError(f"{where}: flags 0x{flags:02x} name no lossy encoding of a float32 "
                                    "tensor (0x02 fp16, 0x04 int8, on float32 only)")
            if lossy == "int8" and flags & _FLAG_SHUFFLE:
                raise ProtocolError(f"{where}: shuffle flag set on an int8-encoded tensor")
            expected = _lossy_raw_length(lossy, math.prod(shape))
            if raw_len != expected:
                raise ProtocolError(f"{where}: shape {list(shape)} in {lossy} needs {expected} bytes, "
                                    f"the section announces {raw_len}")
        else:
            itemsize = _wire_dtype(dtype).itemsize
            expected = math.prod(shape) * itemsize
            if raw_len != expected:
                raise ProtocolError(f"{where}: shape {list(shape)} of {_DTYPE_NAMES[dtype]} needs "
                                    f"{expected} bytes, the section announces {raw_len}")
            if flags and itemsize == 1:
                raise ProtocolError(f"{where}: shuffle flag set on 1-byte {_DTYPE_NAMES[dtype]}")
        if codec == "none" and payload_len != raw_len:
            raise ProtocolError(f"{where}: uncompressed payload of {payload_len} bytes, "
                                f"raw length announced {raw_len}")
        # No lz4 input byte yields more than 255 output bytes, no deflate byte
        # more than 1032: refuse impossible sizes before allocating for them.
        if raw_len > _MAX_RATIO.get(codec, 1) * payload_len:
            raise ProtocolError(f"{where}: {payload_len} bytes of {codec} cannot decompress "
                                f"to the {raw_len} bytes announced")
        # A lossy section decodes to float32: 2x (fp16) to 4x (int8) its raw bytes.
        total_raw += 4 * math.prod(shape) if flags & ~_FLAG_SHUFFLE else raw_len
        if total_raw > max_frame_bytes:
            raise _limit_error(f"{type_name} frame decompresses to at least", total_raw,
                               max_frame_bytes)
        sections.append(_SectionInfo(kind, name, dtype, codec, bool(flags & _FLAG_SHUFFLE),
                                     _LOSSY_NAMES.get(flags & ~_FLAG_SHUFFLE), tuple(shape),
                                     raw_len, crc, payload))
    if offset != len(body):
        raise ProtocolError(f"{type_name} frame has {len(body) - offset} bytes of trailing "
                            "garbage after its last section")
    return sections


def _decode_section(info: _SectionInfo, type_name: str) -> np.ndarray | bytes:
    where = f"{type_name} {'tensor' if info.kind == _KIND_TENSOR else 'blob'} {info.name!r}"
    data = _decompress(info.codec, info.payload, info.raw_len, where)
    if info.kind == _KIND_BLOB:
        if zlib.crc32(data) != info.crc:
            raise ProtocolError(f"{where}: CRC32 mismatch, the bytes were corrupted in transit")
        return bytes(data)
    if info.shuffled:
        itemsize = 2 if info.lossy == "fp16" else _wire_dtype(info.dtype).itemsize
        raw = _unshuffle(np.frombuffer(data, np.uint8), itemsize)
    elif isinstance(data, bytearray):
        raw = np.frombuffer(data, np.uint8)  # lz4 output: fresh and writable already
    else:
        raw = np.frombuffer(data, np.uint8).copy()  # copy out of the frame buffer
    if zlib.crc32(raw) != info.crc:
        raise ProtocolError(f"{where}: CRC32 mismatch, the bytes were corrupted in transit")
    if info.lossy is not None:
        return lossy_decode(raw, info.lossy, info.shape)
    if info.dtype == _STRING:
        return _decode_strings(raw, info.shape, where)
    if info.dtype == _DTYPE_CODES["bool"] and raw.size and raw.max() > 1:
        raise ProtocolError(f"{where}: bool tensor holds bytes other than 0 and 1")
    try:
        array = raw.view(_wire_dtype(info.dtype)).reshape(info.shape)
    except ValueError as exc:  # e.g. a zero-size tensor whose other dims overflow
        raise ProtocolError(
            f"{where}: shape {list(info.shape)} is not representable: {exc}") from None
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))  # big-endian hosts only
    return array


def _decode_strings(raw: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    count = math.prod(shape)
    lengths = raw[:4 * count].view("<u4").astype(np.int64)
    ends = np.cumsum(lengths) + 4 * count
    if 4 * count + int(lengths.sum()) != raw.size:
        raise ProtocolError(f"{where}: string lengths add up to {int(lengths.sum())} bytes, "
                            f"the section holds {raw.size - 4 * count}")
    data = raw.tobytes()
    out = np.empty(count, dtype=object)
    start = 4 * count
    try:
        for i, end in enumerate(ends.tolist()):
            out[i] = data[start:end].decode("utf-8")
            start = end
        return out.reshape(shape)
    except UnicodeDecodeError:
        raise ProtocolError(f"{where}: element {i} is not valid UTF-8") from None
    except ValueError as exc:
        raise ProtocolError(f"{where}: shape {list(shape)} is not representable: {exc}") from None


def _decode_body(body: memoryview, type_name: str, control_len: int, count: int,
                 max_frame_bytes: int) -> Message:
    header = _parse_control(body[:control_len], type_name)
    sections = _read_sections(body, control_len, count, type_name, max_frame_bytes)
    tensor_names = [s.name for s in sections if s.kind == _KIND_TENSOR]
    blob_names = [s.name for s in sections if s.kind == _KIND_BLOB]
    problem = _catalogue_problem(type_name, header, tensor_names, blob_names)
    if problem:
        raise ProtocolError(problem)
    message = Message(type_name, header)
    for info in sections:  # decompress only once everything else checked out
        value = _decode_section(info, type_name)
        if info.kind == _KIND_TENSOR:
            message.tensors[info.name] = value  # type: ignore[assignment]
        else:
            message.blobs[info.name] = value  # type: ignore[assignment]
    return message


def decode(frame: bytes | bytearray | memoryview, *,
           max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
           versions: Sequence[int] = SUPPORTED_VERSIONS) -> Message:
    """Decode exactly one complete frame, e.g. one binary WebSocket message.

    Raises
    ------
    ProtocolError
        The bytes are not exactly one valid frame.

    Examples
    --------
    >>> decode(encode(Message(PONG, {"seq": 7})))
    Message(PONG, header={'seq': 7})
    >>> decode(b"GET / HTTP/1.1\\r\\n\\r\\n")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    crowdgraph.errors.ProtocolError: frame starts with b'GET ', not the magic b'CRWD': ...
    """
    with memoryview(frame) as view:
        view = view.cast("B")
        if len(view) < HEADER_SIZE:
            if bytes(view[:4]) != MAGIC[:len(view)]:
                raise _bad_magic(bytes(view[:4]))
            raise ProtocolError(f"truncated frame: {len(view)} bytes, shorter than the "
                                f"{HEADER_SIZE}-byte fixed header")
        type_name, _, control_len, count, total = _read_header(view, max_frame_bytes, versions)
        if len(view) != total:
            raise ProtocolError(f"{type_name} frame header announces {total} bytes, "
                                f"the message holds {len(view)}")
        return _decode_body(view[HEADER_SIZE:], type_name, control_len, count, max_frame_bytes)


class FrameDecoder:
    """Turn a byte stream, in chunks of any size, into messages.

    Parameters
    ----------
    max_frame_bytes
        Largest frame accepted, fixed header included; it also bounds the
        total decompressed size of a frame's sections.  The limit is checked
        from the fixed header, before any of the body is buffered, so a peer
        cannot make this side allocate more than this.
    versions
        Protocol versions accepted in frame headers.

    Notes
    -----
    ``max_frame_bytes`` is read for every frame header as it completes, so a
    :class:`Connection` starts with :data:`HANDSHAKE_MAX_FRAME_BYTES` and raises
    it once the handshake is done (before which nobody sends anything large).

    After :meth:`feed` raised :class:`ProtocolError` the decoder is unusable:
    the stream position is lost, and every further call raises again.  Close
    the connection.  Messages completed earlier in the same ``feed`` call are
    dropped with it.

    Examples
    --------
    >>> frame = encode(Message(PING, {"seq": 1}))
    >>> decoder = FrameDecoder()
    >>> [m for b in frame for m in decoder.feed(bytes([b]))]
    [Message(PING, header={'seq': 1})]
    >>> decoder.feed(b"GET /")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    crowdgraph.errors.ProtocolError: frame starts with b'GET ', not the magic b'CRWD': ...
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, *,
                 versions: Sequence[int] = SUPPORTED_VERSIONS) -> None:
        if max_frame_bytes < HEADER_SIZE:
            raise ValueError(f"max_frame_bytes must be at least {HEADER_SIZE}")
        self.max_frame_bytes = max_frame_bytes
        self.versions = tuple(versions)
        self._buffer = bytearray()
        self._frame_len = 0  # length of the frame being buffered, once its header is in
        self._error: ProtocolError | None = None
        #: Size on the wire of the last frame decoded, fixed header included.
        self.last_frame_bytes = 0

    @property
    def needed(self) -> int:
        """Bytes still missing to complete the frame being received.

        Between frames this is the fixed header's size; once a header is in,
        the rest of that frame (its body length is at offset 8).  A reader
        that never asks for more than this gets at most one frame per
        :meth:`feed`, and so the exact size of every frame.

        >>> decoder = FrameDecoder()
        >>> decoder.needed
        24
        >>> frame = encode(Message(PING, {"seq": 1}))
        >>> decoder.feed(frame[:HEADER_SIZE]), decoder.needed == len(frame) - HEADER_SIZE
        ([], True)
        """
        return max(self._frame_len, HEADER_SIZE) - len(self._buffer)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Add received bytes; return the messages they complete, in order.

        Raises
        ------
        ProtocolError
            The stream is not valid; close the connection.
        """
        if self._error is not None:
            raise ProtocolError(f"the stream was already broken ({self._error}); "
                                "close the connection") from self._error
        try:
            return self._feed(data)
        except ProtocolError as exc:
            self._error = exc
            self._buffer = bytearray()
            raise

    def _feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        self._buffer += data
        if len(self._buffer) < max(self._frame_len, HEADER_SIZE):
            if not self._frame_len and len(self._buffer) >= 4 and self._buffer[:4] != MAGIC:
                raise _bad_magic(bytes(self._buffer[:4]))  # fail fast on HTTP, TLS, ...
            return []
        messages: list[Message] = []
        pos = 0
        with memoryview(self._buffer) as view:
            while len(view) - pos >= HEADER_SIZE:
                type_name, _, control_len, count, total = _read_header(
                    view[pos:pos + HEADER_SIZE], self.max_frame_bytes, self.versions)
                if len(view) - pos < total:
                    self._frame_len = total
                    break
                messages.append(_decode_body(view[pos + HEADER_SIZE:pos + total], type_name,
                                             control_len, count, self.max_frame_bytes))
                self.last_frame_bytes = total
                pos += total
                self._frame_len = 0
            else:
                if len(view) - pos >= 4 and view[pos:pos + 4] != MAGIC:
                    raise _bad_magic(bytes(view[pos:pos + 4]))
            # A new buffer rather than an in-place delete: slices of `view` may
            # still be referenced, and a resize would fail while they live.
            leftover = bytearray(view[pos:]) if pos else None
        if leftover is not None:
            self._buffer = leftover
        return messages


# --------------------------------------------------------------------------
# Catalogue: which header fields each message type must carry.
# --------------------------------------------------------------------------

_HEX64 = re.compile(r"[0-9a-f]{64}")


def _is_int(v: Any, low: int = 0) -> bool:
    return type(v) is int and low <= v <= _MAX_INT


def _is_number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def is_name(v: Any) -> bool:
    """Whether ``v`` may travel as a name (worker, partition, tensor): printable, bounded, not empty.

    >>> is_name("p0"), is_name(""), is_name("a\\nb"), is_name("x" * (MAX_NAME_CHARS + 1))
    (True, False, False, False)
    """
    return isinstance(v, str) and 0 < len(v) <= MAX_NAME_CHARS and v.isprintable()


def _is_task(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and is_name(v[0]) and _is_int(v[1])


_Check = tuple[Callable[[Any], bool], str]
_STR: _Check = (lambda v: isinstance(v, str) and len(v) <= MAX_TEXT_CHARS,
                f"a string of at most {MAX_TEXT_CHARS} characters")
_NAME: _Check = (is_name, f"a printable name of 1 to {MAX_NAME_CHARS} characters")
_HEX: _Check = (lambda v: isinstance(v, str) and _HEX64.fullmatch(v) is not None,
                "64 lowercase hex digits")
_COUNT: _Check = (_is_int, "an integer >= 0")
_SECONDS: _Check = (lambda v: _is_number(v) and v >= 0, "a number >= 0")
_TIME: _Check = (_is_number, "a number")
_TASK: _Check = (_is_task, "a task key [partition: name, microbatch: int >= 0]")
_STRINGS: _Check = (lambda v: isinstance(v, list) and all(is_name(x) for x in v),
                    f"a list of printable names of 1 to {MAX_NAME_CHARS} characters")

_ROLE: _Check = (lambda v: v in ROLES, f"one of {list(ROLES)}")
_BOOL: _Check = (lambda v: type(v) is bool, "true or false")
_ADDRESS = re.compile(r"[^\s/]{1,255}:[0-9]{1,5}")
#: A worker's peer address, ``HOST:PORT`` (HELLO ``peer``, RUN ``fetch``).
_PEER_ADDRESS: _Check = (lambda v: isinstance(v, str) and _ADDRESS.fullmatch(v) is not None
                         and 0 < int(v.rsplit(":", 1)[1]) < 65536, "HOST:PORT")


def _is_tensor_type(v: Any) -> bool:
    """{dtype, shape} of a tensor a worker holds."""
    return (isinstance(v, dict) and {"dtype", "shape"} <= set(v) and v["dtype"] in _DTYPE_CODES
            and isinstance(v["shape"], list) and len(v["shape"]) <= MAX_NDIM and all(_is_int(d) for d in v["shape"]))


def _is_fetch(v: Any) -> bool:
    """One RUN ``fetch`` entry: {input, task, output, holder, dtype, shape[, address]}."""
    return (isinstance(v, dict) and {"input", "task", "output", "holder", "dtype", "shape"} <= set(v)
            and set(v) <= {"input", "task", "output", "holder", "dtype", "shape", "address"}
            and is_name(v["input"]) and _is_task(v["task"]) and is_name(v["output"]) and is_name(v["holder"])
            and _is_tensor_type(v) and ("address" not in v or _PEER_ADDRESS[0](v["address"])))


def _is_held(v: Any) -> bool:
    """RESULT ``held``: {output: {dtype, shape}} for the outputs the worker holds instead of sending."""
    return (isinstance(v, dict) and len(v) <= MAX_STRINGS and all(
        is_name(name) and isinstance(t, dict) and set(t) == {"dtype", "shape"} and _is_tensor_type(t)
        for name, t in v.items()))


def _is_task_state(v: Any) -> bool:
    """A RUN's ``state``: {key, keep, pairs: [[output, input], ...], shared: [output, ...]}."""
    return (isinstance(v, dict) and set(v) == {"key", "keep", "pairs", "shared"} and is_name(v["key"])
            and type(v["keep"]) is bool and isinstance(v["pairs"], list) and 0 < len(v["pairs"]) <= MAX_STRINGS
            and all(isinstance(p, list) and len(p) == 2 and is_name(p[0]) and is_name(p[1]) for p in v["pairs"])
            and isinstance(v["shared"], list) and all(is_name(x) for x in v["shared"]))


_TASK_STATE: _Check = (_is_task_state, "a task state {key: name, keep: bool, pairs: [[output, input], ...], "
                                       "shared: [output, ...]}")


def _is_worker_record(v: Any) -> bool:
    """A worker as CROWD and JOINED describe it to a driver."""
    if not isinstance(v, dict):
        return False
    for key, check in (("id", is_name), ("name", is_name), ("memory_budget", _is_int),
                       ("cores", lambda x: _is_int(x, 1)), ("platform", is_name),
                       ("cached", lambda x: isinstance(x, list) and all(_HEX[0](d) for d in x)),
                       ("resident", lambda x: x is None or _HEX[0](x))):
        if key not in v or not check(v[key]):
            return False
    return ("rss" not in v or _is_int(v["rss"])) and ("state" not in v or type(v["state"]) is bool)


_WORKER_RECORD: _Check = (_is_worker_record, "a worker record {id, name, memory_budget, cores, "
                          "platform, cached, resident[, rss, state]}")

# type -> {field: (check, description, required)}
_FIELDS: dict[str, dict[str, tuple[Callable[[Any], bool], str, bool]]] = {
    HELLO: {
        "versions": (lambda v: isinstance(v, list) and bool(v) and all(_is_int(x, 1) for x in v),
                     "a non-empty list of integers >= 1", True),
        "name": (*_NAME, True),
        "memory_budget": (*_COUNT, True),
        "cores": ((lambda v: _is_int(v, 1)), "an integer >= 1", True),
        "platform": (*_NAME, True),
        "codecs": (*_STRINGS, True),
        "cached": ((lambda v: isinstance(v, list) and all(_HEX[0](x) for x in v)),
                   "a list of sha256 hex digests", True),
        "rss": (*_COUNT, False),
        "role": (*_ROLE, False),
        "lossy": (*_STRINGS, False),
        "stores": ((lambda v: type(v) is bool), "true or false", False),
        "state": ((lambda v: type(v) is bool), "true or false", False),
        "peer": (*_PEER_ADDRESS, False),
    },
    CHALLENGE: {"nonce": (*_HEX, True),
                "version": ((lambda v: _is_int(v, 1)), "an integer >= 1", True),
                "codec": ((lambda v: v in _CODEC_CODES), f"one of {list(_CODEC_CODES)}", True),
                "lossy": ((lambda v: isinstance(v, list) and all(x in LOSSY for x in v)),
                          f"a list of lossy encodings from {list(LOSSY)}", False)},
    AUTH: {"signature": (*_HEX, True), "nonce": (*_HEX, True)},
    WELCOME: {"worker_id": (*_NAME, True), "signature": (*_HEX, True),
              "heartbeat": ((lambda v: _is_number(v) and v > 0), "a number > 0", True),
              "role": (*_ROLE, False),
              "takes_lost": ((lambda v: type(v) is bool), "true or false", False)},
    REFUSE: {"reason": (*_STR, True)},
    BYE: {"reason": (*_STR, False)},
    PING: {"seq": (*_COUNT, True)},
    PONG: {"seq": (*_COUNT, True)},
    LOAD: {"partition": (*_NAME, True), "sha256": (*_HEX, True),
           "from_cache": ((lambda v: type(v) is bool), "true or false", True),
           "fast": ((lambda v: type(v) is bool), "true or false", False),
           "worker": (*_NAME, False)},
    LOADED: {"partition": (*_NAME, True), "sha256": (*_HEX, True),
             "seconds": (*_SECONDS, True), "rss": (*_COUNT, True),
             "fast": ((lambda v: type(v) is bool), "true or false", False), "worker": (*_NAME, False)},
    UNLOAD: {"partition": (*_NAME, True), "worker": (*_NAME, False)},
    UNLOADED: {"partition": (*_NAME, True), "rss": (*_COUNT, True), "worker": (*_NAME, False)},
    STORE: {"partition": (*_NAME, True), "sha256": (*_HEX, True), "offset": (*_COUNT, True),
            "size": ((lambda v: _is_int(v, 1)), "an integer >= 1", True)},
    STORED: {"partition": (*_NAME, True), "sha256": (*_HEX, True), "received": (*_COUNT, True),
             "kept": ((lambda v: type(v) is bool), "true or false", False)},
    RUN: {"task": (*_TASK, True), "outputs": (*_STRINGS, True), "worker": (*_NAME, False),
          "lossy": ((lambda v: v in LOSSY), f"one of {list(LOSSY)}", False),
          "state": (*_TASK_STATE, False), "forget": (*_STRINGS, False),
          "hold": (*_STRINGS, False),
          "fetch": ((lambda v: isinstance(v, list) and 0 < len(v) <= MAX_STRINGS and all(_is_fetch(x) for x in v)),
                    "a list of {input, task, output, holder, dtype, shape[, address]}", False)},
    RESULT: {"task": (*_TASK, True), "start": (*_TIME, True), "end": (*_TIME, True),
             "peak_rss": (*_COUNT, True), "rss": (*_COUNT, True), "worker": (*_NAME, False),
             "held": (_is_held, "{output: {dtype, shape}}", False)},
    FAILED: {"task": (*_TASK, False), "load": (*_NAME, False), "error": (*_STR, True),
             "worker": (*_NAME, False), "holder": (*_NAME, False)},
    FETCH: {"task": (*_TASK, True), "outputs": (*_STRINGS, True), "holder": (*_NAME, True)},
    FETCHED: {"task": (*_TASK, True), "holder": (*_NAME, True), "error": (*_STR, False)},
    DROP: {"task": (*_TASK, True), "outputs": (*_STRINGS, True)},
    CROWD: {"workers": ((lambda v: isinstance(v, list) and all(_is_worker_record(w) for w in v)),
                        "a list of worker records", False)},
    JOINED: {"worker": (*_WORKER_RECORD, True)},
    LOST: {"worker": (*_NAME, True), "reason": (*_STR, True),
           "quarantine": ((lambda v: type(v) is bool), "true or false", False)},
}


def _catalogue_problem(type_name: str, header: dict[str, Any], tensors: Iterable[str],
                       blobs: Iterable[str]) -> str | None:
    """Return what is wrong with a message's header and sections, or None."""
    for key, (check, wanted, required) in _FIELDS[type_name].items():
        if key not in header:
            if required:
                return f"{type_name} header lacks {key!r} ({wanted})"
        elif not check(header[key]):
            return f"{type_name} header field {key!r} must be {wanted}, got {header[key]!r:.80}"
    tensors, blobs = list(tensors), list(blobs)
    if type_name == FAILED and ("task" in header) == ("load" in header):
        return ("FAILED header needs exactly one of 'task' (a task failed) "
                "and 'load' (a load failed)")
    if tensors and type_name not in (RUN, RESULT, FETCHED):
        return f"{type_name} carries tensors {tensors}; only RUN, RESULT and FETCHED carry tensors"
    if type_name == FETCHED and tensors and "error" in header:
        return "FETCHED carries either tensors or an 'error', not both"
    if type_name == RUN and "fetch" in header and any(f["input"] in tensors for f in header["fetch"]):
        return "RUN names an input both in 'fetch' and among its tensors"
    if type_name == RUN and not set(header.get("hold", ())) <= set(header["outputs"]):
        return "RUN asks to hold outputs the task does not compute; 'hold' must be in 'outputs'"
    if type_name == RESULT and "held" in header and any(name in header["held"] for name in tensors):
        return "RESULT names an output both in 'held' and among its tensors"
    if type_name == RUN and "state" in header:
        state, outputs = header["state"], set(header["outputs"])
        if any(o not in outputs for o, _ in state["pairs"]) or not set(state["shared"]) <= outputs:
            return "RUN state names outputs the task does not compute; pairs and shared must be in 'outputs'"
    if type_name == LOAD:
        wanted_blobs = [] if header["from_cache"] else ["model"]
        if blobs != wanted_blobs:
            return (f"LOAD with from_cache={str(header['from_cache']).lower()} must carry "
                    f"blobs {wanted_blobs}, not {blobs}")
    elif type_name == STORE:
        if blobs != ["model"]:
            return f"STORE must carry blobs ['model'], not {blobs}"
    elif blobs:
        return f"{type_name} carries blobs {blobs}; only LOAD and STORE carry a blob"
    return None


# --------------------------------------------------------------------------
# Handshake helpers.
# --------------------------------------------------------------------------

# The sides an HMAC is made for (``role=`` of sign and verify): on a link to
# the coordinator, the side that connects signs as "worker", whether it is a
# worker or a driver (its role in HELLO, ROLES), and the coordinator as
# "coordinator"; on a link between two workers, "fetcher" and "holder", so
# that no signature made on one kind of link passes on the other.
_SIGNING_SIDES = ("worker", "coordinator", "fetcher", "holder")


def make_nonce() -> bytes:
    """Return 32 fresh random bytes for a CHALLENGE or AUTH nonce (sent as hex)."""
    return secrets.token_bytes(32)


def _auth_message(nonce: bytes, role: str) -> bytes:
    if role not in _SIGNING_SIDES:
        raise ValueError(f"role must be one of {list(_SIGNING_SIDES)}, got {role!r}")
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) < 16:
        raise ValueError("nonce must be at least 16 random bytes (make_nonce() gives 32)")
    return b"crowdgraph " + role.encode("ascii") + b" " + bytes(nonce)


def sign(token: bytes, nonce: bytes, *, role: str) -> str:
    """Prove knowledge of ``token`` for ``nonce`` without sending the token.

    Returns ``HMAC-SHA256(token, b"crowdgraph " + role + b" " + nonce)``
    as 64 lowercase hex digits.  The role (``"worker"`` for AUTH,
    ``"coordinator"`` for WELCOME) keeps one side's signature from being
    replayed as the other's: without it a fake coordinator could have one
    worker sign another worker's nonce and pass as genuine.

    Examples
    --------
    >>> sig = sign(b"secret", bytes(32), role="worker")
    >>> len(sig), verify(b"secret", bytes(32), sig, role="worker")
    (64, True)
    >>> verify(b"secret", bytes(32), sig, role="coordinator")
    False
    """
    if not isinstance(token, (bytes, bytearray)) or not token:
        raise ValueError("the shared token must be non-empty bytes (encode a str as UTF-8)")
    return hmac.new(bytes(token), _auth_message(nonce, role), hashlib.sha256).hexdigest()


def verify(token: bytes, nonce: bytes, signature: object, *, role: str) -> bool:
    """Return whether ``signature`` is :func:`sign` of ``nonce`` for ``role``.

    Compares in constant time; a signature that is not even a hex string
    is simply wrong, not an error.
    """
    expected = sign(token, nonce, role=role).encode("ascii")
    if not isinstance(signature, str):
        return False
    try:
        given = signature.encode("ascii")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(expected, given)


def negotiate(hello_header: dict[str, Any],
              supported_versions: Sequence[int] = SUPPORTED_VERSIONS,
              supported_codecs: Sequence[str] = CODECS) -> tuple[int, str]:
    """Pick the protocol version and codec for a worker from its HELLO.

    Parameters
    ----------
    hello_header
        The header of the worker's HELLO.
    supported_versions
        Versions this side speaks; the highest common one wins.
    supported_codecs
        Codecs this side can use, most preferred first; the first one the
        worker also lists wins.

    Raises
    ------
    ProtocolError
        Nothing overlaps; the message says what each side offered.  Send it
        in a REFUSE and close.

    Examples
    --------
    >>> negotiate({"versions": [1, 2], "codecs": ["zlib", "none"]}, [1], ["lz4", "zlib", "none"])
    (1, 'zlib')
    """
    versions, codecs = hello_header.get("versions"), hello_header.get("codecs")
    if not (isinstance(versions, list) and all(type(v) is int for v in versions)):
        raise ProtocolError(f"HELLO 'versions' must be a list of integers, got {versions!r:.80}")
    if not (isinstance(codecs, list) and all(isinstance(c, str) for c in codecs)):
        raise ProtocolError(f"HELLO 'codecs' must be a list of strings, got {codecs!r:.80}")
    common = set(versions) & set(supported_versions)
    if not common:
        newer = "worker" if min(versions, default=0) > max(supported_versions) else "coordinator"
        raise ProtocolError(
            f"no common protocol version: the worker speaks {sorted(versions)}, the coordinator "
            f"{sorted(supported_versions)}; upgrade crowdgraph on the side other than the {newer}"
        )
    codec = next((c for c in supported_codecs if c in codecs), None)
    if codec is None:
        raise ProtocolError(
            f"no common codec: the worker decodes {codecs}, the coordinator offers "
            f"{list(supported_codecs)}; every peer must at least list 'none'"
        )
    return max(common), codec


def frame_length(data: bytes | bytearray | memoryview) -> int:
    """Size of the frame whose fixed header starts ``data``, from its body length at offset 8.

    Only the length is read; :class:`FrameDecoder` checks the rest.

    >>> frame = encode(Message(PING, {"seq": 1}))
    >>> frame_length(frame) == len(frame)
    True
    """
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"{len(data)} bytes are shorter than the {HEADER_SIZE}-byte fixed header")
    return HEADER_SIZE + _HEADER.unpack_from(data)[4]


@dataclass
class BlobHead:
    """Everything of a one-blob frame but the blob's bytes, which follow it on the wire."""

    #: The frame's message, its blob left out.
    message: Message
    #: The blob's name, its length in bytes and its CRC32 (check it once they are in).
    name: str
    length: int
    crc: int


def read_blob_head(data: bytes | bytearray | memoryview, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                   versions: Sequence[int] = SUPPORTED_VERSIONS) -> BlobHead | int | None:
    """Check the start of a frame whose one section is an uncompressed blob, without its bytes.

    A receiver may then write the blob where it belongs (a file) as it
    arrives instead of holding the whole frame.  Returns how many more bytes
    the head needs when ``data`` is too short, None when the frame is not
    one uncompressed blob (decode it whole), and otherwise a
    :class:`BlobHead`: everything but the blob's bytes checked as
    :func:`decode` checks it.  Raises :class:`ProtocolError` as decode does.

    >>> frame = encode(Message(LOAD, {"partition": "p0", "sha256": "ab" * 32, "from_cache": False},
    ...                        blobs={"model": b"weights"}))
    >>> read_blob_head(frame[:HEADER_SIZE])  # the control part and section header are next
    141
    >>> head = read_blob_head(frame[:-7])
    >>> head.message.header["partition"], head.name, head.length, head.crc == zlib.crc32(b"weights")
    ('p0', 'model', 7, True)
    >>> read_blob_head(encode(Message(PING, {"seq": 1}))) is None
    True
    """
    view = memoryview(data).cast("B")
    if len(view) < HEADER_SIZE:
        return HEADER_SIZE - len(view)
    _, _, control_len, count, total = _read_header(view[:HEADER_SIZE], max_frame_bytes, versions)
    section = HEADER_SIZE + control_len
    if count != 1:
        return None
    if len(view) < section + SECTION_HEADER_SIZE:
        return section + SECTION_HEADER_SIZE - len(view)
    kind, _, codec, _, name_len, ndim, _, raw_len, length, crc = _SECTION.unpack_from(view, section)
    if kind != _KIND_BLOB or codec != _CODEC_CODES["none"]:
        return None
    head = section + SECTION_HEADER_SIZE + name_len + 8 * ndim
    if len(view) < head:
        return head - len(view)
    if head + length != total or raw_len != length:
        raise ProtocolError(f"frame lengths do not add up: a {head}-byte head and a {length}-byte blob "
                            f"(raw length {raw_len}) are not the {total} bytes announced")
    # Check the rest as decode does: the same frame with an empty blob.
    skeleton = bytearray(view[:head])
    struct.pack_into("<Q", skeleton, 8, head - HEADER_SIZE)
    struct.pack_into("<QQI", skeleton, section + 8, 0, 0, zlib.crc32(b""))
    message = decode(skeleton, max_frame_bytes=max_frame_bytes, versions=versions)
    (name,) = message.blobs
    del message.blobs[name]
    return BlobHead(message, name, length, crc)


# --------------------------------------------------------------------------
# The connection state machine (h11-style: bytes in, messages out, no I/O).
# --------------------------------------------------------------------------

#: Who is at either end of a connection.  Workers and drivers open it
#: (HELLO says which, :data:`ROLES`); the coordinator accepts it.
COORDINATOR, WORKER, DRIVER = "coordinator", "worker", "driver"
#: The two ends of a link between workers: a worker fetching held tensors
#: opens it (HELLO role "fetcher") to the peer port of the worker holding them.
HOLDER, FETCHER = "holder", "fetcher"
_ACCEPTS = {COORDINATOR: (WORKER, DRIVER), HOLDER: (FETCHER,)}  # accepting side -> who may open

# Handshake and life states.  The joining side (worker, driver) goes
# SEND_HELLO -> AWAIT_CHALLENGE -> AWAIT_WELCOME -> OPEN; the coordinator
# AWAIT_HELLO -> AWAIT_AUTH -> AUTHENTICATED (its caller names the peer in
# WELCOME) -> OPEN.  BYE or REFUSE ends in CLOSED, a broken rule in ERROR.
SEND_HELLO, AWAIT_CHALLENGE, AWAIT_WELCOME = "SEND_HELLO", "AWAIT_CHALLENGE", "AWAIT_WELCOME"
AWAIT_HELLO, AWAIT_AUTH, AUTHENTICATED = "AWAIT_HELLO", "AWAIT_AUTH", "AUTHENTICATED"
OPEN, CLOSED, ERROR = "OPEN", "CLOSED", "ERROR"

_HEARTBEAT = frozenset({PING, PONG, BYE})
# (sender, receiver) -> what the sender may send once the connection is OPEN,
# besides PING, PONG and BYE.  Frames to and from a driver name their worker.
_TRAFFIC: dict[tuple[str, str], frozenset[str]] = {
    (COORDINATOR, WORKER): frozenset({LOAD, UNLOAD, STORE, RUN, FETCH, FETCHED, DROP}),
    (WORKER, COORDINATOR): frozenset({LOADED, UNLOADED, STORED, RESULT, FAILED, FETCH, FETCHED}),
    (FETCHER, HOLDER): frozenset({FETCH}),
    (HOLDER, FETCHER): frozenset({FETCHED}),
    (DRIVER, COORDINATOR): frozenset({CROWD, LOAD, UNLOAD, RUN, LOST}),
    (COORDINATOR, DRIVER): frozenset({CROWD, JOINED, LOST, LOADED, UNLOADED, RESULT, FAILED}),
}
_NAMES_WORKER = frozenset({LOAD, UNLOAD, RUN, LOADED, UNLOADED, RESULT, FAILED})


def _traffic_problem(sender: str, receiver: str, kind: str, header: dict[str, Any] | None) -> str | None:
    """What is wrong with ``sender`` sending ``kind`` to ``receiver`` on an open connection, or None.

    >>> _traffic_problem(WORKER, COORDINATOR, RESULT, None) is None
    True
    >>> _traffic_problem(DRIVER, COORDINATOR, RUN, {"task": ["p0", 0], "outputs": []})
    "a RUN between a driver and the coordinator must name its worker in 'worker'"
    """
    allowed = _TRAFFIC[sender, receiver]
    if kind not in allowed and kind not in _HEARTBEAT:
        return (f"a {sender} may not send {kind} to a {receiver}; it sends "
                f"{', '.join(sorted(allowed))}, PING, PONG and BYE")
    if DRIVER in (sender, receiver) and kind in _NAMES_WORKER and header is not None \
            and not isinstance(header.get("worker"), str):
        return f"a {kind} between a driver and the coordinator must name its worker in 'worker'"
    return None


class Refused(ProtocolError):
    """The coordinator answered the handshake with REFUSE; the message is its reason."""


class Connection:
    """One end of a crowdgraph connection as a state machine, with no I/O.

    Bytes the socket delivered go in through :meth:`receive_data`, which
    returns the messages the caller has to act on; messages go out through
    :meth:`send` (or :meth:`sending` for a frame encoded elsewhere) and the
    bytes to write come from :meth:`data_to_send`.  Everything the protocol
    rules say lives here: the handshake order HELLO -> CHALLENGE -> AUTH ->
    WELCOME (or REFUSE), the HMAC proofs both ways, the version and codec
    agreement, which side may send which message, the frame size limits
    before and after the handshake, and the heartbeat (answering PING,
    deadlines as data: the caller passes the time, :meth:`expired` and
    :meth:`ping` say what is due).

    A broken rule, on either side, raises :class:`ProtocolError` and moves
    the connection to ``ERROR``; a frame telling the peer why (REFUSE during
    the handshake, BYE after it) is then waiting in :meth:`data_to_send`.
    Write it, then close the socket.

    A link between two workers is the same machine with other roles: the
    worker that fetches held tensors is a :data:`FETCHER` and the one that
    holds them a :data:`HOLDER`, which accepts like a coordinator; their
    HMACs are made for their own sides, so a proof from one kind of link
    is worthless on the other.

    Parameters
    ----------
    role
        This side: :data:`COORDINATOR`, :data:`WORKER` or :data:`DRIVER`;
        :data:`HOLDER` or :data:`FETCHER` between workers.
    token
        The shared secret; it never leaves this object, only HMACs of it.
    now
        The caller's clock when the connection opened.
    heartbeat
        Coordinator, holder: the interval announced in WELCOME (the joining
        side learns it from WELCOME).
    codecs
        Codecs this side offers (joining side) or accepts, most preferred first.
    lossy
        Lossy tensor encodings this side offers (joining side) or accepts;
        the handshake agrees those both list (:attr:`lossy`).  Listing one
        costs nothing: a run still sends exact tensors unless it asks.
    max_frame_bytes
        Largest frame once the handshake is done; before it the limit is
        :data:`HANDSHAKE_MAX_FRAME_BYTES`.
    handshake_timeout
        Seconds from ``now`` within which the handshake must be done.
    admit
        Coordinator: called with the peer's HELLO header; returns a reason to
        refuse it (say, a driver where none are taken) or None.

    Examples
    --------
    A worker joins a coordinator over an in-memory pair:

    >>> coordinator = Connection(COORDINATOR, token=b"s3cret", now=0.0, heartbeat=5.0)
    >>> worker = Connection(WORKER, token=b"s3cret", now=0.0, codecs=["zlib", "none"])
    >>> worker.hello({"name": "pi", "memory_budget": 2**26, "cores": 4,
    ...               "platform": "linux-aarch64", "cached": []}, now=0.0)
    >>> def pump(src, dst):
    ...     return dst.receive_data(b"".join(bytes(p) for p in src.data_to_send()), now=0.1)
    >>> pump(worker, coordinator), pump(coordinator, worker)        # HELLO; CHALLENGE
    ([], [])
    >>> [m.type for m in pump(worker, coordinator)], coordinator.state  # AUTH proved the token
    (['HELLO'], 'AUTHENTICATED')
    >>> coordinator.welcome("w1", now=0.1)
    >>> [m.type for m in pump(coordinator, worker)], worker.state, worker.peer_id, worker.codec
    (['WELCOME'], 'OPEN', 'w1', 'zlib')
    >>> worker.send(Message(LOAD, {"partition": "p0", "sha256": "0" * 64, "from_cache": True}), now=0.2)
    Traceback (most recent call last):
    ...
    crowdgraph.errors.ProtocolError: a worker may not send LOAD to a coordinator; it sends FAILED, ...
    >>> worker.state
    'ERROR'
    """

    def __init__(self, role: str, *, token: bytes, now: float, heartbeat: float | None = None,
                 codecs: Sequence[str] = CODECS, versions: Sequence[int] = SUPPORTED_VERSIONS,
                 lossy: Sequence[str] = LOSSY, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 admit: Callable[[dict[str, Any]], str | None] | None = None) -> None:
        if role not in (COORDINATOR, HOLDER, *ROLES):
            raise ValueError(f"role must be one of {[COORDINATOR, HOLDER, *ROLES]}, got {role!r}")
        if not isinstance(token, (bytes, bytearray)) or not token:
            raise ValueError("the shared token must be non-empty bytes (encode a str as UTF-8)")
        #: Whether this side accepts connections (coordinator, holder) rather than opening them.
        self.accepting = role in _ACCEPTS
        if self.accepting and not (heartbeat and heartbeat > 0):
            raise ValueError(f"the {role} announces a heartbeat > 0 seconds, got {heartbeat}")
        self.role = role
        between_workers = role in (HOLDER, FETCHER)
        #: The other side's role; an accepting side learns it from HELLO.
        self.peer_role = {COORDINATOR: WORKER, HOLDER: FETCHER, FETCHER: HOLDER}.get(role, COORDINATOR)
        self._signs_as = (role if between_workers else COORDINATOR if self.accepting else WORKER)
        self._peer_signs_as = {HOLDER: FETCHER, FETCHER: HOLDER, COORDINATOR: WORKER}.get(role, COORDINATOR)
        self.state = AWAIT_HELLO if self.accepting else SEND_HELLO
        self.heartbeat = float(heartbeat) if heartbeat else None
        self.codecs, self.versions = tuple(codecs), tuple(versions)
        unknown = [e for e in lossy if e not in LOSSY]
        if unknown:
            raise ValueError(f"unknown lossy encodings {unknown}; use some of {list(LOSSY)}")
        self.lossy_offered = tuple(lossy)
        #: Lossy encodings the handshake agreed: both sides decode and may send them.
        self.lossy: tuple[str, ...] = ()
        self.max_frame_bytes = int(max_frame_bytes)
        self.handshake_deadline = now + handshake_timeout
        #: Protocol version and codec agreed in the handshake.
        self.version, self.codec = 1, "none"
        #: The joining side's HELLO header (both sides) and the id WELCOME gave it.
        self.hello_header: dict[str, Any] = {}
        self.peer_id: str | None = None
        #: The caller's clock at the last bytes received and the last frame sent.
        self.last_received = self.last_sent = now
        self._token = bytes(token)
        self._admit = admit
        self._nonce = b""  # the nonce this side asked the other to sign
        self._peer_nonce = b""
        self._decoder = FrameDecoder(HANDSHAKE_MAX_FRAME_BYTES, versions=self.versions)
        self._decode_error: ProtocolError | None = None
        self._outbox: list[list[bytes | memoryview]] = []
        self._ping_seq = 0

    # -- reading ------------------------------------------------------------

    @property
    def needed(self) -> int:
        """Bytes still missing to complete the frame being received (see :attr:`FrameDecoder.needed`)."""
        return self._decoder.needed

    @property
    def buffered(self) -> int:
        """Bytes of the frame being received that are in already."""
        return self._decoder.buffered

    @property
    def last_frame_bytes(self) -> int:
        """Size on the wire of the last frame received."""
        return self._decoder.last_frame_bytes

    def receive_data(self, data: bytes | bytearray | memoryview, *, now: float) -> list[Message]:
        """Take bytes from the peer; return the messages the caller must act on.

        Handshake frames and heartbeats are answered here (the answers wait
        in :meth:`data_to_send`).  What comes back: the coordinator gets the
        peer's HELLO once its AUTH proved the token (answer it with
        :meth:`welcome`), the joining side gets WELCOME once it proved the
        coordinator knows the token, and after that every message but PING
        and PONG, BYE included (the connection is then CLOSED).

        Raises
        ------
        Refused
            The coordinator refused this side (its reason is the message).
        AuthenticationError
            The peer failed to prove the shared token.
        ProtocolError
            The bytes or their order break the protocol; close the connection
            after writing :meth:`data_to_send`.
        """
        if not data:
            return []
        return self.take_frames(self.decode_frames(data), now=now)

    def decode_frames(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """The first half of :meth:`receive_data`: decode the frames ``data`` completes.

        It touches nothing but this connection's frame decoder, so a caller
        with an event loop may run it on another thread when a large frame
        completes (decompressing and checking it takes a while) and keep
        sending and answering heartbeats meanwhile; it then hands the result
        to :meth:`take_frames` on the loop's thread.  Never raises: a broken
        stream is kept for :meth:`take_frames` to raise.
        """
        if self.state in (CLOSED, ERROR) or self._decode_error is not None:
            return []
        try:
            return self._decoder.feed(data)
        except ProtocolError as exc:
            self._decode_error = exc
            return []

    def take_frames(self, messages: list[Message], *, now: float) -> list[Message]:
        """The second half of :meth:`receive_data`: apply what :meth:`decode_frames` returned.

        Returns and raises as :meth:`receive_data` does.
        """
        if self.state in (CLOSED, ERROR):
            return []
        self.last_received = now
        try:
            if self._decode_error is not None:
                raise self._decode_error
            return [seen for message in messages if (seen := self._take(message, now)) is not None]
        except ProtocolError as exc:
            self._fail(exc)
            raise

    def _take(self, message: Message, now: float) -> Message | None:
        """Apply one received message to the state; return what the caller sees of it."""
        kind, state = message.type, self.state
        if state == CLOSED:
            return None
        if kind == REFUSE and state in (AWAIT_CHALLENGE, AWAIT_WELCOME):
            self.state = CLOSED
            raise Refused(message.header["reason"])
        expected = {AWAIT_HELLO: HELLO, AWAIT_CHALLENGE: CHALLENGE, AWAIT_AUTH: AUTH,
                    AWAIT_WELCOME: WELCOME}.get(state)
        if expected is not None and kind != expected:
            first = "the first frame must be HELLO" if state == AWAIT_HELLO else f"expected {expected}"
            raise ProtocolError(f"{first}, not {kind}")
        if state == AWAIT_HELLO:
            self._take_hello(message.header, now)
            return None
        if state == AWAIT_CHALLENGE:
            self._take_challenge(message.header, now)
            return None
        if state == AWAIT_AUTH:
            if not verify(self._token, self._nonce, message.header["signature"], role=self._peer_signs_as):
                raise AuthenticationError(f"authentication failed: the token does not match the "
                                          f"{self.role}'s (check --token-file / CROWDGRAPH_TOKEN)")
            self._peer_nonce = bytes.fromhex(message.header["nonce"])
            self.state = AUTHENTICATED
            return Message(HELLO, dict(self.hello_header))
        if state == AWAIT_WELCOME:
            if not verify(self._token, self._nonce, message.header["signature"], role=self._peer_signs_as):
                raise AuthenticationError(
                    f"the {self.peer_role} did not prove that it knows the token; it may be an impostor. "
                    "Nothing was loaded or run; check the address and the token")
            if message.header.get("role", WORKER) != self.role:
                raise ProtocolError(f"the {self.peer_role} welcomed this {self.role} as a "
                                    f"{message.header.get('role', WORKER)}; it does not take "
                                    f"{self.role}s")
            self.peer_id, self.heartbeat = message.header["worker_id"], float(message.header["heartbeat"])
            self._open()
            return message
        if state != OPEN:
            raise ProtocolError(f"a {self.peer_role} may not send {kind} before the handshake is done")
        problem = _traffic_problem(self.peer_role, self.role, kind, message.header)
        if problem is not None:
            raise ProtocolError(problem)
        if kind == PING:
            self.send(Message(PONG, {"seq": message.header["seq"]}), now=now)
        elif kind == BYE:
            self.state = CLOSED
        return None if kind in (PING, PONG) else message

    def _take_hello(self, header: dict[str, Any], now: float) -> None:
        self.hello_header = dict(header)
        self.peer_role = header.get("role", WORKER)
        if self.peer_role not in _ACCEPTS[self.role]:
            raise ProtocolError(f"a {self.role} takes connections from "
                                f"{' and '.join(r + 's' for r in _ACCEPTS[self.role])}, not from a {self.peer_role}")
        version, codec = negotiate(header, self.versions, self.codecs)
        reason = self._admit(self.hello_header) if self._admit is not None else None
        if reason is not None:
            raise ProtocolError(reason)
        self._nonce = make_nonce()
        self.state = AWAIT_AUTH
        challenge: dict[str, Any] = {"nonce": self._nonce.hex(), "version": version, "codec": codec}
        if "lossy" in header:  # a peer that offers none is never sent the field
            self.lossy = tuple(e for e in self.lossy_offered if e in header["lossy"])
            challenge["lossy"] = list(self.lossy)
        self._queue(Message(CHALLENGE, challenge), now)
        self.version, self.codec = version, codec

    def _take_challenge(self, header: dict[str, Any], now: float) -> None:
        version, codec = header["version"], header["codec"]
        if version not in self.hello_header["versions"] or codec not in self.hello_header["codecs"]:
            raise ProtocolError(f"the coordinator chose version {version} and codec {codec!r}, "
                                "which were not offered")
        lossy = header.get("lossy", [])
        if not set(lossy) <= set(self.hello_header.get("lossy", [])):
            raise ProtocolError(f"the coordinator agreed lossy encodings {lossy}, but this "
                                f"{self.role} offered {self.hello_header.get('lossy', [])}")
        self.version, self.codec, self.lossy = version, codec, tuple(lossy)
        self._nonce = make_nonce()
        self.state = AWAIT_WELCOME
        self._queue(Message(AUTH, {
            "signature": sign(self._token, bytes.fromhex(header["nonce"]), role=self._signs_as),
            "nonce": self._nonce.hex()}), now)

    def _open(self) -> None:
        self.state = OPEN
        self._decoder.max_frame_bytes = self.max_frame_bytes

    # -- writing ------------------------------------------------------------

    def hello(self, header: dict[str, Any], *, now: float) -> None:
        """Joining side: queue HELLO (``versions``, ``codecs`` and ``role`` are filled in)."""
        if self.state != SEND_HELLO:
            self._misuse(f"HELLO goes first and once; this {self.role} is {self.state}")
        self.hello_header = dict(header, versions=list(self.versions), codecs=list(self.codecs))
        if self.lossy_offered:
            self.hello_header["lossy"] = list(self.lossy_offered)
        if self.role != WORKER:
            self.hello_header["role"] = self.role
        self.state = AWAIT_CHALLENGE
        self._queue(Message(HELLO, self.hello_header), now)

    def welcome(self, peer_id: str, *, now: float) -> None:
        """Coordinator: queue WELCOME naming the authenticated peer ``peer_id``; the connection opens."""
        if self.state != AUTHENTICATED:
            self._misuse(f"WELCOME answers a proven AUTH; this connection is {self.state}")
        header: dict[str, Any] = {"worker_id": peer_id, "heartbeat": self.heartbeat,
                                  "signature": sign(self._token, self._peer_nonce, role=self._signs_as)}
        if self.peer_role == DRIVER:
            header.update(role=DRIVER, takes_lost=True)
        elif self.peer_role == FETCHER:
            header["role"] = FETCHER
        self.peer_id = peer_id
        self._queue(Message(WELCOME, header), now)
        self._open()

    def sending(self, type_name: str, *, now: float, header: dict[str, Any] | None = None) -> bool:
        """Check that this side may send a ``type_name`` frame now, and note it as sent.

        For frames encoded elsewhere (on another thread, or once for many
        peers) and written by the caller; :meth:`send` does this itself.
        ``header`` is the frame's header where the rules look into it (a
        driver's frames name their worker).  Returns False, noting nothing,
        once the connection is CLOSED or ERROR: the frame crossed a BYE or
        a broken rule and is dropped, not written.
        """
        if self.state in (CLOSED, ERROR):
            return False
        if self.state != OPEN:
            self._misuse(f"a {self.role} may not send {type_name} while the connection is {self.state}")
        problem = _traffic_problem(self.role, self.peer_role, type_name, header)
        if problem is not None:
            self._misuse(problem)
        if type_name == BYE:
            self.state = CLOSED
        self.last_sent = now
        return True

    def send(self, message: Message, *, now: float, shuffle: bool = False, lossy: str | None = None) -> int:
        """Queue ``message`` with the agreed codec and version; return its size in bytes.

        ``lossy`` (``"fp16"``, ``"int8"``) sends its float32 tensors in that
        encoding where the handshake agreed it, and exact otherwise (see
        :meth:`lossy_for`).  Returns 0, queueing nothing, once the
        connection is CLOSED or ERROR (see :meth:`sending`).  Raises
        :class:`ProtocolError` (and moves to ERROR) when the rules do not
        allow this side to send it now.
        """
        if not self.sending(message.type, now=now, header=message.header):
            return 0
        return self._queue(message, now, shuffle=shuffle, lossy=self.lossy_for(lossy))

    def lossy_for(self, wanted: str | None) -> str | None:
        """The lossy encoding to send when ``wanted`` is asked for: it, if agreed, else None (exact).

        >>> Connection(WORKER, token=b"t", now=0.0).lossy_for("fp16") is None   # nothing agreed yet
        True
        """
        return wanted if wanted in self.lossy else None

    def lossy_of(self, message: Message) -> str | None:
        """The lossy encoding ``message`` travels in on this link: a RUN's ``lossy``, where agreed.

        A RUN that carries ``lossy`` asks for it on every hop (the relay to
        the worker included) and for the RESULT that answers it; everything
        else is exact.
        """
        return self.lossy_for(message.header.get("lossy")) if message.type == RUN else None

    def goodbye(self, reason: str, *, now: float) -> None:
        """Queue BYE with ``reason`` (or REFUSE during a coordinator's handshake); the connection closes."""
        if self.state in (CLOSED, ERROR):
            return
        if self.state == OPEN:
            self._queue(Message(BYE, {"reason": reason}), now)
        elif self.accepting:
            self._queue(Message(REFUSE, {"reason": reason}), now)
        self.state = CLOSED  # a joining side that gives up during the handshake just closes

    def data_to_send(self) -> list[bytes | memoryview]:
        """The buffers to write, in order, since the last call (empties the queue)."""
        parts = [part for frame in self._outbox for part in frame]
        self._outbox.clear()
        return parts

    def _queue(self, message: Message, now: float, *, shuffle: bool = False, lossy: str | None = None) -> int:
        # HELLO, CHALLENGE and REFUSE travel before (or without) an agreed version.
        version = 1 if message.type in (HELLO, CHALLENGE, REFUSE) else self.version
        parts = encode_parts(message, codec=self.codec, version=version, shuffle=shuffle, lossy=lossy)
        self._outbox.append(parts)
        self.last_sent = now
        return sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in parts)

    def _misuse(self, text: str) -> None:
        exc = ProtocolError(text)
        self._fail(exc)
        raise exc

    def _fail(self, exc: ProtocolError) -> None:
        """Move to ERROR, queueing the frame that tells the peer why (if this side may send one)."""
        if isinstance(exc, Refused):  # a refusal is an orderly close, not a broken rule
            self.state = CLOSED
            return
        if self.state in (CLOSED, ERROR):
            self.state = ERROR
            return
        if self.accepting and self.state != OPEN:
            self._queue(Message(REFUSE, {"reason": str(exc)}), self.last_sent)
        elif self.state == OPEN:
            self._queue(Message(BYE, {"reason": f"protocol error: {exc}"}), self.last_sent)
        self.state = ERROR

    # -- time ---------------------------------------------------------------

    def expired(self, now: float) -> str | None:
        """Why the connection is to be closed for silence at ``now``, or None.

        Before it opens: the handshake took longer than its timeout.  Once
        open: nothing arrived for :data:`HEARTBEAT_MISSES` heartbeats.
        """
        if self.state not in (OPEN, CLOSED, ERROR):
            if now > self.handshake_deadline:
                return "the handshake did not complete in time"
            return None
        assert self.heartbeat is not None
        silent = now - self.last_received
        if self.state == OPEN and silent > HEARTBEAT_MISSES * self.heartbeat:
            return (f"no frame for {silent:.1f} s ({HEARTBEAT_MISSES} heartbeats of "
                    f"{self.heartbeat:g} s): the {self.peer_role} stopped, or the network dropped")
        return None

    def ping(self, now: float) -> bool:
        """Queue a PING when a heartbeat passed since the last frame sent; return whether it did."""
        if self.state != OPEN or self.heartbeat is None or now - self.last_sent < self.heartbeat:
            return False
        self._ping_seq += 1
        self.send(Message(PING, {"seq": self._ping_seq}), now=now)
        return True
