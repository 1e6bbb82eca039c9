"""crowdgraph-worker: the agent a phone (Termux), a Raspberry Pi or a laptop runs.

It connects *out* to a coordinator (so it works behind NAT), proves it
knows the shared token, and then does what the coordinator says:

* ``LOAD``: take the partition from the local cache (its sha256 checked
  first) or from the bytes sent along (written to the cache as they
  arrive, never held whole in memory, then checked and stored as
  ``<sha256>.onnx``; a partition larger than the worker's budget is
  refused unkept), drop whatever was loaded before, and open the
  partition *from the file* through :func:`crowdgraph.runtime.open_session`;
* ``UNLOAD``: drop the session and hand the memory back to the OS;
* ``RUN``: run one task and send back its outputs with the peak RSS since
  the last load; with ``state`` (a decoder's key/value cache), take the
  inputs it lacks from the state kept under its key and keep the new one
  there instead of sending it back; ``forget`` drops kept state first
  (and an UNLOAD all of it); with ``hold``, keep those outputs for the
  tasks that read them and send only their dtype and shape; with
  ``fetch``, get inputs other workers hold from their peer ports (or
  through the coordinator), while the task before it computes;
* ``FETCH``: send outputs this worker holds (also on its peer port, to
  other workers that prove the token; :mod:`crowdgraph_tcp.peers`);
  ``DROP``: forget them;
* ``PING``/``PONG``: heartbeats, answered from the I/O loop even while a
  task computes; ``BYE``: leave.

At most one partition is loaded at a time.  Nothing received is ever
unpickled, evaluated or imported: frames are :mod:`crowdgraph.wire`
messages, model bytes are only handed to onnxruntime after their sha256
matched and no tensor of theirs refers to a file (external data) other
than the entry's own data file (:func:`external_data_problem`).

Usage::

    crowdgraph-worker tcp://192.168.1.10:8786 --token-file ~/.crowdgraph-token --memory 64MB

The I/O runs on asyncio (TLS included, ``tls://`` URLs); the work runs on
one compute thread, so a long task never silences the heartbeat.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import platform
import random
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, BinaryIO, Callable, Iterator, Sequence

from crowdgraph import wire
from crowdgraph.cli import Parser, byte_size, positive_int
from crowdgraph.errors import AuthenticationError, CrowdgraphError, ProtocolError
from crowdgraph.measure import peak_rss_since_reset, reset_peak_rss
from crowdgraph.runtime import ResidentSession, TaskState, current_rss, release_memory, warm_up
from crowdgraph.units import format_bytes
from crowdgraph.wire import Message

from .common import client_ssl_context, parse_listen, parse_url, read_token
from .peers import (
    OFF_LOOP_BYTES, FetchError, HeldOutputs, PeerLinks, PeerServer, answer_fetch, encode_answer, fetched_problem,
    form_problem,
)

__all__ = ["PartitionCache", "Agent", "main"]

_HEX64 = re.compile(r"[0-9a-f]{64}")
#: Largest read from the socket at once.
CHUNK = 1 << 20
#: Initializers smaller than this stay inline in a stored partition (as onnx's ``size_threshold``).
INLINE_BYTES = 1024
#: A LOAD frame larger than this streams its partition into the cache as it arrives.
STREAM_BYTES = 1 << 20
#: Most cached digests announced in HELLO (keeps HELLO far below the 1 MiB handshake limit).
MAX_ANNOUNCED = 10_000
#: Exit codes.
EXIT_OK, EXIT_LOST, EXIT_REFUSED = 0, 1, 2


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/crowdgraph/partitions`` (``~/.cache/...`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "crowdgraph" / "partitions"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class PartitionCache:
    """Partitions on local storage, size-capped, least recently used out first.

    One entry per partition, named by its sha256:

    * ``<sha256>.onnx``: the graph, whose large weights live in
    * ``<sha256>.onnx.data`` beside it (ONNX external data), so onnxruntime
      maps them from the file instead of copying them out of a parsed
      protobuf (which costs a second copy of the weights while a session
      opens);
    * ``<sha256>.json``: the manifest, written last (an entry without one is
      unfinished and removed): the sha256 of each file as written, checked
      before every use, and the file's use time for the LRU order.

    The bytes were checked against the partition's sha256 before they were
    stored; the manifest then catches any later change on disk.

    >>> import onnx, tempfile
    >>> def partition(n: int) -> bytes:  # a model of n float weights
    ...     w = onnx.helper.make_tensor("w", onnx.TensorProto.FLOAT, [n], [0.5] * n)
    ...     return onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], [w])).SerializeToString()
    >>> cache = PartitionCache(tempfile.mkdtemp(), max_bytes=800)
    >>> def receive(data: bytes) -> Path:
    ...     path, out = cache.stage()
    ...     with out:
    ...         _ = out.write(data)
    ...     return path
    >>> small, large = partition(100), partition(120)
    >>> sha = hashlib.sha256(small).hexdigest()
    >>> path, kept = cache.put(sha, receive(small))
    >>> path.name == sha + ".onnx", kept, cache.digests() == [sha]
    (True, True, True)
    >>> onnx.load(str(cache.get(sha))).graph.initializer[0].float_data[:2]
    [0.5, 0.5]
    >>> cache.put(hashlib.sha256(large).hexdigest(), receive(large))[1]  # evicts the other
    True
    >>> sha in cache.digests(), cache.get(sha)
    (False, None)
    """

    def __init__(self, folder: str | os.PathLike, max_bytes: int = 2**30):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self._clean()

    def _clean(self) -> None:
        """Remove unfinished entries and leftovers of interrupted writes."""
        keep = set()
        for sha in self._shas():
            manifest = self._manifest(sha)
            if manifest is None or self._external_data_problem(sha) is not None:
                self.remove(sha)
            else:
                keep.update(manifest["files"])
                keep.add(f"{sha}.json")
        for path in self.folder.iterdir():
            if path.name not in keep and (path.name.startswith(".tmp-") or _HEX64.match(path.name)):
                _remove(path)

    def _shas(self) -> set[str]:
        return {p.name[:64] for p in self.folder.iterdir() if _HEX64.match(p.name)}

    def _manifest(self, sha256: str) -> dict[str, Any] | None:
        try:
            manifest = json.loads((self.folder / f"{sha256}.json").read_text())
            files = manifest["files"]
            if (isinstance(files, dict) and f"{sha256}.onnx" in files
                    and all(isinstance(k, str) and k.startswith(sha256) and "/" not in k and _HEX64.fullmatch(str(v))
                            for k, v in files.items())):
                return manifest
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def _external_data_problem(self, sha256: str) -> str | None:
        """Why the stored model of ``sha256`` may not be opened (see :func:`external_data_problem`)."""
        return _stored_model_problem(self.folder / f"{sha256}.onnx", self.folder / f"{sha256}.onnx.data")

    def _entries(self) -> list[tuple[float, int, str]]:
        """(last use, bytes, sha256) of every finished entry, least recently used first."""
        entries = []
        for sha in self._shas():
            manifest = self._manifest(sha)
            if manifest is None:
                continue
            try:
                used = (self.folder / f"{sha}.json").stat().st_mtime
                size = sum((self.folder / name).stat().st_size for name in manifest["files"])
            except OSError:
                continue
            entries.append((used, size, sha))
        return sorted(entries)

    def digests(self) -> list[str]:
        """Cached digests, most recently used first."""
        return [sha for _, _, sha in reversed(self._entries())][:MAX_ANNOUNCED]

    def get(self, sha256: str) -> Path | None:
        """The model file of ``sha256``, checked; None when absent or changed on disk (then removed)."""
        manifest = self._manifest(sha256)
        if manifest is None:
            return None
        for name, digest in manifest["files"].items():
            path = self.folder / name
            if not path.is_file() or file_sha256(path) != digest:
                self.remove(sha256)
                return None
        os.utime(self.folder / f"{sha256}.json")  # most recently used
        return self.folder / f"{sha256}.onnx"

    def remove(self, sha256: str) -> None:
        """Forget an entry (manifest first, so a half-removed entry is never used)."""
        _remove(self.folder / f"{sha256}.json")
        for path in self.folder.glob(f"{sha256}*"):
            _remove(path)

    def stage(self) -> tuple[Path, BinaryIO]:
        """A new file in the cache folder to receive a partition's bytes into, open for writing.

        Whatever is left of it (a worker killed while receiving) is removed
        when a cache opens the folder; :meth:`put` consumes it.
        """
        fd, name = tempfile.mkstemp(prefix=".tmp-", suffix=".received", dir=self.folder)
        return Path(name), os.fdopen(fd, "wb")

    def put(self, sha256: str, received: Path) -> tuple[Path, bool]:
        """Store the partition received into ``received`` (a :meth:`stage` file, consumed); return its file.

        The graph goes to ``<sha256>.onnx`` and its weights, streamed through
        in chunks, to ``<sha256>.onnx.data`` (:func:`externalize`), so no
        more than one weight at a time is ever in memory.  Also returns
        whether the entry stays: one larger than the whole cache is removed
        as soon as :meth:`remove` is called after its session opened.
        Raises ValueError, with nothing of it entering the cache, when the
        model refers to any external data or is not a model.
        """
        try:
            size = received.stat().st_size
            self.remove(sha256)
            entries = self._entries()
            total = sum(used for _, used, _ in entries)
            for _, used, old in entries:
                if total + size <= self.max_bytes:
                    break
                self.remove(old)
                total -= used
            staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.folder))
            try:
                model, data = staging / f"{sha256}.onnx", staging / f"{sha256}.onnx.data"
                externalize(received, model, data)
                received.unlink()
                problem = _stored_model_problem(model, data)
                if problem is not None:  # refused before it enters the cache
                    raise ValueError(f"refusing the partition: {problem}")
                files = {p.name: file_sha256(p) for p in staging.iterdir()}
                for name in files:
                    os.replace(staging / name, self.folder / name)
                tmp = staging / "manifest"
                tmp.write_text(json.dumps({"format": 1, "sha256": sha256, "files": files}))
                os.replace(tmp, self.folder / f"{sha256}.json")
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            _remove(received)
        return self.folder / f"{sha256}.onnx", size <= self.max_bytes


def _stored_model_problem(model_path: Path, data_path: Path) -> str | None:
    """Why the model at ``model_path``, with its weights in ``data_path``, may not be opened, or None."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
        return external_data_problem(model, data_path.name, data_path.stat().st_size if data_path.is_file() else 0)
    except Exception as exc:  # unreadable or not a model
        return f"the stored model cannot be read ({exc})"


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of ``graph``: initializers, Constant and other attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            sparse_tensors = list(attribute.sparse_tensors)
            if attribute.HasField("sparse_tensor"):
                sparse_tensors.append(attribute.sparse_tensor)
            for sparse in sparse_tensors:
                yield from (sparse.values, sparse.indices)
            subgraphs = list(attribute.graphs)
            if attribute.HasField("g"):
                subgraphs.append(attribute.g)
            for subgraph in subgraphs:
                yield from _tensors(subgraph)


def external_data_problem(model: Any, location: str | None = None, data_bytes: int = 0) -> str | None:
    """Why ``model``'s external-data references are unsafe, or None when every one is safe.

    A partition may read weights only from its own data file: ``location``
    (a plain file name beside the model), within its ``data_bytes``.  Any
    other reference (an absolute path, a directory, ``..``, another file, a
    range past the end) would let whoever sent the partition make this
    worker read or write files outside its cache, so it is refused here,
    before onnx or onnxruntime see it.  With ``location`` None no external
    data is allowed at all (a partition as received carries its weights inline).

    >>> import onnx
    >>> model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], initializer=[
    ...     onnx.helper.make_tensor("w", onnx.TensorProto.FLOAT, [2], [1.0, 2.0])]))
    >>> external_data_problem(model) is None
    True
    >>> w = model.graph.initializer[0]
    >>> w.data_location = onnx.TensorProto.EXTERNAL
    >>> _ = w.external_data.add(key="location", value="../../etc/passwd")
    >>> external_data_problem(model, "own.data", 8)
    "tensor 'w' refers to external data at '../../etc/passwd', not to this partition's own data file"
    >>> w.external_data[0].value = "own.data"
    >>> _ = w.external_data.add(key="length", value="16")
    >>> external_data_problem(model, "own.data", 8)
    "tensor 'w' reads bytes 0 to 16 of external data, past the end of this partition's own data file (8 bytes)"
    """
    for tensor in _tensors(model.graph):
        if tensor.data_location != tensor.EXTERNAL and not len(tensor.external_data):
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        where = entries.get("location", "")
        if location is None or where != location or where != os.path.basename(where):
            return (f"tensor {tensor.name!r} refers to external data at {where!r}, "
                    "not to this partition's own data file")
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries["length"]) if "length" in entries else data_bytes - offset
        except ValueError:
            return f"tensor {tensor.name!r} has an external-data offset or length that is not a whole number"
        if offset < 0 or length < 0 or offset + length > data_bytes:
            return (f"tensor {tensor.name!r} reads bytes {offset} to {offset + length} of external data, "
                    f"past the end of this partition's own data file ({data_bytes} bytes)")
    return None


# Field numbers of onnx.proto that the rewrite below walks through.
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_RAW_DATA, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 9, 13, 14
_LENGTH_DELIMITED = 2


def _varint(value: int) -> bytes:
    """``value`` as a protobuf varint.

    >>> _varint(1), _varint(300)
    (b'\\x01', b'\\xac\\x02')
    """
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(f: BinaryIO) -> int:
    value = shift = 0
    while shift < 64:
        byte = f.read(1)
        if not byte:
            raise ValueError("the model ends inside a field")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
    raise ValueError("the model holds a varint longer than 64 bits")


def _fields(f: BinaryIO, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, start of its key, start of its value, end) of each protobuf field in ``f[start:stop]``."""
    f.seek(start)
    while f.tell() < stop:
        begin = f.tell()
        key = _read_varint(f)
        kind = key & 7
        if kind == 0:
            _read_varint(f)
        elif kind in (1, 5):
            f.seek(8 if kind == 1 else 4, os.SEEK_CUR)
        elif kind == _LENGTH_DELIMITED:
            length = _read_varint(f)
            f.seek(length, os.SEEK_CUR)
        else:
            raise ValueError(f"the model holds a field of wire type {kind}, which ONNX does not use")
        end = f.tell()
        if end > stop:
            raise ValueError("a field of the model runs past its end")
        yield key >> 3, begin, end - (length if kind == _LENGTH_DELIMITED else 0), end
        f.seek(end)


def _read_range(f: BinaryIO, start: int, stop: int) -> bytes:
    f.seek(start)
    return f.read(stop - start)


def _externalize_tensor(f: BinaryIO, start: int, stop: int, data: BinaryIO, location: str) -> bytes:
    """A TensorProto from ``f[start:stop]`` whose raw data is copied, in chunks, to the end of ``data``."""
    kept, raw, external = [], None, False
    for number, begin, value, end in _fields(f, start, stop):
        external |= number in (_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION)
        if number == _TENSOR_RAW_DATA:
            raw = (value, end)
        else:
            kept.append(_read_range(f, begin, end))
    if raw is None or raw[1] - raw[0] < INLINE_BYTES or external:
        # As it came: onnxruntime reads shapes and axes only inline, and a tensor that already
        # refers to external data is left for external_data_problem to name and refuse.
        return _read_range(f, start, stop)
    offset = data.tell()
    f.seek(raw[0])
    for left in range(raw[1] - raw[0], 0, -CHUNK):
        data.write(f.read(min(left, CHUNK)))
    for key, text in (("location", location), ("offset", str(offset)), ("length", str(raw[1] - raw[0]))):
        entry = b"\x0a" + _varint(len(key)) + key.encode() + b"\x12" + _varint(len(text)) + text.encode()
        kept.append(_varint(_TENSOR_EXTERNAL_DATA << 3 | _LENGTH_DELIMITED) + _varint(len(entry)) + entry)
    kept.append(_varint(_TENSOR_DATA_LOCATION << 3) + _varint(1))  # TensorProto.EXTERNAL
    return b"".join(kept)


def _rewrite(f: BinaryIO, start: int, stop: int, data: BinaryIO, location: str, path: tuple[int, ...]) -> bytes:
    """The message in ``f[start:stop]`` with every tensor at field ``path`` externalized."""
    out = []
    for number, begin, value, end in _fields(f, start, stop):
        if number != path[0]:
            out.append(_read_range(f, begin, end))
            continue
        inner = (_externalize_tensor(f, value, end, data, location) if len(path) == 1
                 else _rewrite(f, value, end, data, location, path[1:]))
        out.append(_varint(number << 3 | _LENGTH_DELIMITED) + _varint(len(inner)) + inner)
        f.seek(end)
    return b"".join(out)


def externalize(received: Path, model_path: Path, data_path: Path) -> None:
    """Rewrite the ONNX model in ``received`` into ``model_path`` with its initializers' bytes in ``data_path``.

    A streaming rewrite of the protobuf: each initializer's raw bytes are
    copied from file to file in chunks, so the weights are never held in
    memory (parsing the model, as :func:`onnx.load` does, would hold them
    twice: once as bytes, once parsed).  Every tensor it moves refers to
    ``data_path``'s plain name; the rest is copied as it came, so a caller
    must check the result (:func:`external_data_problem`) before anything
    opens it.  Raises ValueError when the bytes are not a protobuf.

    >>> import onnx, tempfile
    >>> w = onnx.helper.make_tensor("w", onnx.TensorProto.FLOAT, [1024], bytes(4096), raw=True)
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "in.onnx").write_bytes(onnx.helper.make_model(
    ...     onnx.helper.make_graph([], "g", [], [], [w])).SerializeToString())
    >>> externalize(folder / "in.onnx", folder / "m.onnx", folder / "m.onnx.data")
    >>> stored = onnx.load(str(folder / "m.onnx"), load_external_data=False).graph.initializer[0]
    >>> [(e.key, e.value) for e in stored.external_data], (folder / "m.onnx.data").stat().st_size
    ([('location', 'm.onnx.data'), ('offset', '0'), ('length', '4096')], 4096)
    """
    with open(received, "rb") as f, open(data_path, "wb") as data:
        model = _rewrite(f, 0, os.fstat(f.fileno()).st_size, data, data_path.name,
                         (_MODEL_GRAPH, _GRAPH_INITIALIZER))
    model_path.write_bytes(model)


def _remove(path: Path) -> None:
    try:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        pass


@dataclass
class ReceivedModel:
    """A partition's bytes as a LOAD brought them: in a file :meth:`PartitionCache.stage` made, or not kept."""

    #: Bytes the coordinator sent.
    size: int
    #: Their sha256 ("" when they were not kept).
    sha256: str
    #: The file holding them; None when they were refused unread (more than the budget).
    path: Path | None


class PartialStore:
    """The partition a STORE brings in chunks, staged in a cache file until its last chunk arrives.

    One at a time: a chunk at offset 0 starts a partition (dropping one
    under way); a chunk of another partition, or out of order, ends the one
    under way, not kept.  The bytes are hashed as they come, so the last
    chunk says at once whether they are the partition named.

    >>> partial = PartialStore(PartitionCache(tempfile.mkdtemp()))
    >>> sha = hashlib.sha256(b"weights!").hexdigest()
    >>> partial.take(sha, 0, 8, b"weig", limit=100)
    (4, None, '')
    >>> partial.take(sha, 4, 8, b"hts!", limit=100)
    (8, True, '')
    >>> partial.take_file().read_bytes()
    b'weights!'
    >>> partial.take(sha, 0, 8, b"weig", limit=6)
    (0, False, 'it is 8 B, more than this worker can keep (6 B)')
    """

    def __init__(self, cache: PartitionCache):
        self.cache = cache
        self._start(None, 0)

    def _start(self, sha256: str | None, size: int) -> None:
        self.sha256, self.size, self.received = sha256, size, 0
        self.digest = hashlib.sha256()
        self.path, self.out = self.cache.stage() if sha256 is not None else (None, None)

    def take(self, sha256: str, offset: int, size: int, chunk: bytes, limit: int) -> tuple[int, bool | None, str]:
        """Add ``chunk`` (at ``offset`` of a ``size``-byte partition); return the bytes here,
        then True (complete, ready for :meth:`take_file`), False (refused, dropped) or None
        (more to come), and why it was refused."""
        if offset == 0:
            self.discard()
            if size > limit:
                return 0, False, f"it is {format_bytes(size)}, more than this worker can keep ({format_bytes(limit)})"
            self._start(sha256, size)
        elif (sha256, size, offset) != (self.sha256, self.size, self.received):
            self.discard()
            return 0, False, "its chunks came out of order"
        if self.received + len(chunk) > size:
            received = self.received
            self.discard()
            return received, False, f"its chunks add up to more than its {size} bytes"
        assert self.out is not None
        self.out.write(chunk)
        self.digest.update(chunk)
        self.received += len(chunk)
        if self.received < size:
            return self.received, None, ""
        self.out.close()
        self.out = None
        if self.digest.hexdigest() != sha256:
            self.discard()
            return size, False, f"its bytes do not hash to its sha256 {sha256[:12]}..."
        return size, True, ""

    def take_file(self) -> Path:
        """The complete partition's file; the caller moves it into the cache."""
        path, self.path = self.path, None
        assert path is not None
        self._start(None, 0)
        return path

    def discard(self) -> None:
        """Drop the partition under way, if any, and its file."""
        if self.out is not None:
            self.out.close()
        if self.path is not None:
            _remove(self.path)
        self._start(None, 0)


async def _read_exactly(reader: asyncio.StreamReader, size: int) -> bytes:
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise _Lost("the coordinator closed the connection") from None


class _Lost(Exception):
    """The connection dropped or went silent."""


class _Bye(Exception):
    """The coordinator said BYE."""


def _platform() -> str:
    machine = platform.machine() or "unknown"
    if "ANDROID_ROOT" in os.environ or hasattr(sys, "getandroidapilevel"):
        return f"android-{machine}"
    return f"{sys.platform}-{machine}"


class Agent:
    """One worker: a connection loop around a single-resident onnxruntime session."""

    def __init__(self, url: str, token: bytes, memory: int, *, name: str | None = None,
                 cache: PartitionCache, threads: int = 1, cafile: str | None = None,
                 reconnect: bool = False, max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES,
                 log: Any = None, link_speed: int | None = None, peer_listen: str | None = "127.0.0.1:0",
                 peer_address: str | None = None):
        self.scheme, self.host, self.port = parse_url(url)
        self.url = url
        self.token = token
        self.memory = int(memory)
        self.name = name or socket.gethostname() or "worker"
        self.cache = cache
        self.threads = max(1, int(threads))
        self.cafile = cafile
        self.reconnect = reconnect
        self.max_frame_bytes = max_frame_bytes
        self.log = log or sys.stderr
        self.resident = ResidentSession(self.threads, collect_garbage=True)
        # The compute thread (LOAD) and the storing thread (STORE) both change the cache.
        self.cache_lock = threading.Lock()
        self.partial = PartialStore(cache)  # the partition STORE chunks are bringing (storing thread)
        # Bytes per second to read from the coordinator at most (None: as fast as they come).
        self.link_speed = link_speed
        self._link_free = 0.0  # when the paced link has taken in what was read so far
        self.codec, self.version = "none", 1
        self.lossy: tuple[str, ...] = ()  # lossy encodings agreed with the coordinator
        self.floor_rss = current_rss()
        # Outputs held for other tasks (RUN hold), served on the peer port (None: no port).
        self.held = HeldOutputs(self.memory)
        self.peer_listen = peer_listen
        self.peer_address = peer_address
        self.peers: PeerServer | None = None
        self.links: PeerLinks | None = None

    def say(self, text: str) -> None:
        print(f"crowdgraph-worker: {text}", file=self.log, flush=True)

    # -- the connection ------------------------------------------------------

    async def run(self) -> int:
        """Serve until BYE (0), a refusal (2) or a lost connection (1); retry with ``reconnect``."""
        delay = 1.0
        if self.peer_listen is not None:
            self.peers = PeerServer(self.held, self.token, log=self.log)
            host, port = await self.peers.start(*parse_listen(self.peer_listen))
            if self.peer_address is None and host not in ("0.0.0.0", "::"):
                self.peer_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            elif self.peer_address is None:
                self.peer_address = f"*:{port}"  # the address this host reaches the coordinator from
        try:
            return await self._run_sessions(delay)
        finally:
            if self.peers is not None:
                self.peers.close()

    async def _run_sessions(self, delay: float) -> int:
        while True:
            joined = False
            try:
                joined = await self._session()
                if not self.reconnect:
                    return EXIT_OK
                self.say("the coordinator said goodbye; reconnecting")
            except wire.Refused as exc:
                self.say(f"the coordinator refused this worker: {exc}")
                return EXIT_REFUSED
            except AuthenticationError as exc:
                self.say(f"{exc}")
                return EXIT_REFUSED
            except (OSError, EOFError, asyncio.TimeoutError, ProtocolError, _Lost) as exc:
                what = str(exc) or type(exc).__name__
                if not self.reconnect:
                    self.say(f"connection to {self.url} lost: {what}")
                    return EXIT_LOST
                self.say(f"connection to {self.url} lost: {what}; retrying in {delay:.0f} s")
            finally:
                self.resident.unload()
                self.held.clear()
                if self.links is not None:
                    self.links.close()
            if joined:
                delay = 1.0
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 60.0)

    async def _session(self) -> bool:
        ssl_context = client_ssl_context(self.cafile) if self.scheme == "tls" else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=ssl_context), wire.HANDSHAKE_TIMEOUT)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        conn = wire.Connection(wire.WORKER, token=self.token, now=time.monotonic(),
                               max_frame_bytes=self.max_frame_bytes)
        inbox: list[Message] = []

        async def next_message() -> Message:
            """The next message to act on; what the connection answers itself is written at once."""
            while not inbox:
                try:
                    inbox.extend(conn.take_frames(await self._receive(reader, conn), now=time.monotonic()))
                finally:
                    writer.writelines(conn.data_to_send())
            return inbox.pop(0)

        try:
            hello = {"name": self.name, "memory_budget": self.memory, "cores": self.threads,
                     "platform": _platform(), "cached": self.cache.digests(), "rss": self.floor_rss,
                     "stores": True, "state": True}
            if self.peer_address is not None:
                local = writer.get_extra_info("sockname")
                hello["peer"] = self.peer_address.replace("*", _host_text(local[0]) if local else "127.0.0.1", 1)
            conn.hello(hello, now=time.monotonic())
            writer.writelines(conn.data_to_send())
            await asyncio.wait_for(next_message(), conn.handshake_deadline - time.monotonic())  # WELCOME
            self.codec, self.version, self.lossy = conn.codec, conn.version, conn.lossy
            if self.peers is not None:
                assert conn.peer_id is not None and conn.heartbeat is not None
                self.peers.me, self.peers.heartbeat = conn.peer_id, conn.heartbeat
                self.peers.codecs = (conn.codec,)
            self.links = PeerLinks(self.token, {k: hello[k] for k in ("name", "memory_budget", "cores", "platform")},
                                   max_frame_bytes=self.max_frame_bytes)
            self.say(f"joined {self.url} as {conn.peer_id} ({self.name}, budget {format_bytes(self.memory)}, "
                     f"codec {conn.codec}, heartbeat {conn.heartbeat:g} s)")
            await self._serve(conn, writer, next_message)
            return True
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 2.0)
            except Exception:
                pass

    async def _serve(self, conn: wire.Connection, writer: asyncio.StreamWriter, next_message: Any) -> None:
        loop = asyncio.get_running_loop()
        actions: asyncio.Queue[tuple[Message, asyncio.Future[dict[str, Any]] | None]] = asyncio.Queue()
        pool = ThreadPoolExecutor(1, thread_name_prefix="crowdgraph-worker-compute")
        # STORE chunks are written to the cache beside the compute, not between its tasks.
        storage = ThreadPoolExecutor(1, thread_name_prefix="crowdgraph-worker-store")
        storing: set[asyncio.Future[Any]] = set()
        assert conn.heartbeat is not None
        heartbeat = conn.heartbeat

        async def store(message: Message) -> None:
            kind, parts = await loop.run_in_executor(storage, self.handle, message)
            if conn.sending(kind, now=time.monotonic()):
                writer.writelines(parts)  # a few bytes: no drain, as for heartbeats

        relays: dict[tuple[Any, ...], list[asyncio.Future[Message]]] = {}  # FETCHes sent through the coordinator

        def send(message: Message) -> None:
            conn.send(message, now=time.monotonic())
            writer.writelines(conn.data_to_send())

        serving = asyncio.Lock()  # FETCHEDs go out in the order their FETCHes came

        async def serve_fetch(message: Message) -> None:
            async with serving:
                parts = await encode_answer(answer_fetch(self.held, message, str(conn.peer_id)), self.codec,
                                            self.version)
                if conn.sending(wire.FETCHED, now=time.monotonic()):
                    writer.writelines(parts)

        async def through_coordinator(holder: str, task: tuple[str, int], names: list[str]) -> dict[str, Any]:
            waiter: asyncio.Future[Message] = loop.create_future()
            relays.setdefault((task, holder), []).append(waiter)
            send(Message(wire.FETCH, {"task": list(task), "outputs": names, "holder": holder}))
            answer = await waiter
            problem = fetched_problem(answer, task, holder, names)
            if problem is not None:
                raise FetchError(holder, problem)
            return dict(answer.tensors)

        async def read_loop() -> None:
            while True:
                message = await next_message()
                h = message.header
                if message.type == wire.BYE:
                    raise _Bye(h.get("reason", ""))
                if message.type == wire.STORE:
                    task = asyncio.ensure_future(store(message))
                    storing.add(task)
                    task.add_done_callback(storing.discard)
                elif message.type == wire.FETCH:
                    task = asyncio.ensure_future(serve_fetch(message))
                    storing.add(task)
                    task.add_done_callback(storing.discard)
                elif message.type == wire.FETCHED:
                    key = ((h["task"][0], h["task"][1]), h["holder"])
                    waiting = relays.get(key)
                    if not waiting:
                        raise ProtocolError(f"FETCHED of task {h['task']} from {h['holder']} answers no FETCH")
                    waiting.pop(0).set_result(message)
                    if not waiting:
                        del relays[key]
                elif message.type == wire.DROP:
                    self.held.drop((h["task"][0], h["task"][1]), h["outputs"])
                elif message.type == wire.RUN and "fetch" in h:  # fetched while the task before it computes
                    fetching = self._fetch_inputs(h["fetch"], str(conn.peer_id), through_coordinator)
                    actions.put_nowait((message, asyncio.ensure_future(fetching)))
                else:
                    actions.put_nowait((message, None))

        async def compute_loop() -> None:
            while True:
                message, fetching = await actions.get()
                if fetching is not None:
                    try:
                        message.tensors.update(await fetching)
                    except FetchError as exc:
                        answer = Message(wire.FAILED, {"task": message.header["task"], "holder": exc.holder,
                                                       "error": f"an input could not be fetched: {exc}"})
                        send(answer)
                        continue
                kind, parts = await loop.run_in_executor(pool, self.handle, message)
                del message, fetching
                if conn.sending(kind, now=time.monotonic()):
                    writer.writelines(parts)
                    await writer.drain()

        async def heartbeat_loop() -> None:
            while True:
                await asyncio.sleep(heartbeat / 4)
                reason = conn.expired(time.monotonic())
                if reason is not None:
                    raise _Lost(reason)
                if conn.ping(time.monotonic()):
                    writer.writelines(conn.data_to_send())

        tasks = [asyncio.ensure_future(c) for c in (read_loop(), compute_loop(), heartbeat_loop())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if isinstance(exc, _Bye):
                    self.say(f"the coordinator said goodbye ({exc})")
                    return
                if exc is not None:
                    raise exc
        finally:
            for task in [*tasks, *storing]:
                task.cancel()
            await asyncio.gather(*tasks, *storing, return_exceptions=True)
            pool.shutdown(wait=False, cancel_futures=True)
            storage.shutdown(wait=False, cancel_futures=True)
            await loop.run_in_executor(None, storage.shutdown)  # the chunk being written, then nothing
            self.partial.discard()

    async def _fetch_inputs(self, entries: list[dict[str, Any]], me: str,
                            relay: Callable[[str, tuple[str, int], list[str]], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """A RUN's ``fetch`` inputs: held here, from their holder's peer port, or ``relay``-ed by the coordinator.

        Raises :class:`~crowdgraph_tcp.peers.FetchError` naming the holder
        when not even the coordinator could have them from it.
        """
        inputs: dict[str, Any] = {}
        groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for e in entries:
            groups.setdefault((e["holder"], e.get("address"), e["task"][0], e["task"][1]), []).append(e)
        for (holder, address, *key), group in groups.items():
            names, task = sorted({e["output"] for e in group}), (key[0], key[1])
            if holder == me:
                try:
                    got = self.held.get(task, names)
                except KeyError as exc:
                    raise FetchError(holder, str(exc.args[0])) from None
            elif address is not None and self.links is not None and self.links.unreachable(address) is None:
                try:
                    got = await self.links.fetch(address, holder, task, names)
                    _check_fetched(holder, group, got)
                except FetchError:  # the coordinator asks the holder again, and judges its answer
                    got = await relay(holder, task, names)
                except (OSError, EOFError, asyncio.TimeoutError, ProtocolError) as exc:
                    self.say(f"cannot reach worker {holder} at {address} ({exc}); fetching "
                             "through the coordinator from now on")
                    got = await relay(holder, task, names)
            else:
                got = await relay(holder, task, names)
            _check_fetched(holder, group, got)
            for e in group:
                inputs[e["input"]] = got[e["output"]]
        return inputs

    async def _receive(self, reader: asyncio.StreamReader, conn: wire.Connection) -> list[Message]:
        """Read from the coordinator; return the frames completed (for ``conn.take_frames``).

        Each read stops at the end of the frame being received.  A large
        frame is decoded on a thread, and a large LOAD never sits in memory
        whole: its partition is written to the cache as it arrives
        (:meth:`_stream_load`).
        """
        if conn.state == wire.OPEN and conn.buffered == 0:
            head = await self._read(reader, wire.HEADER_SIZE)
            if head[:4] == wire.MAGIC and wire.frame_length(head) > STREAM_BYTES:
                try:
                    return await self._stream_load(head, reader, conn)
                except ProtocolError as exc:  # the coordinator is told why, as the decoder would
                    conn.goodbye(f"protocol error: {exc}", now=time.monotonic())
                    raise
            data = head
        else:
            data = await reader.read(min(conn.needed, CHUNK))
            if not data:
                raise _Lost("the coordinator closed the connection")
            await self._paced(len(data))
        if len(data) == conn.needed and conn.buffered + len(data) > OFF_LOOP_BYTES:
            return await asyncio.get_running_loop().run_in_executor(None, conn.decode_frames, data)
        return conn.decode_frames(data)

    async def _read(self, reader: asyncio.StreamReader, size: int) -> bytes:
        """``size`` bytes from the coordinator, no faster than ``link_speed``."""
        data = await _read_exactly(reader, size)
        await self._paced(size)
        return data

    async def _paced(self, size: int) -> None:
        """With ``link_speed``, wait until a link of that speed would have carried ``size`` more bytes.

        Reading slower makes TCP slow the coordinator down too, so one machine
        can stand in for a crowd on slow links (phones on Wi-Fi) in benchmarks.
        """
        if self.link_speed:
            start = max(self._link_free, time.monotonic())
            self._link_free = start + size / self.link_speed
            await asyncio.sleep(max(0.0, self._link_free - time.monotonic()))

    async def _stream_load(self, data: bytes, reader: asyncio.StreamReader, conn: wire.Connection) -> list[Message]:
        """A large frame whose fixed header is ``data``: a LOAD's partition goes straight to a cache file.

        The partition's bytes are hashed as they arrive and written to a
        file the cache then takes (:meth:`PartitionCache.put`), so the
        worker never holds them in memory; a partition larger than this
        worker's budget is read off the socket and dropped, unkept, and its
        LOAD answered with FAILED.  Any other frame is decoded as usual.
        """
        head = wire.read_blob_head(data, max_frame_bytes=conn.max_frame_bytes)
        while isinstance(head, int):  # how many more bytes the head needs
            data += await self._read(reader, head)
            head = wire.read_blob_head(data, max_frame_bytes=conn.max_frame_bytes)
        if head is None or head.message.type != wire.LOAD or head.name != "model":
            frames = conn.decode_frames(data)
            while conn.buffered:  # the rest of the frame, the usual way
                frames += await self._receive(reader, conn)
            return frames
        digest, crc = hashlib.sha256(), 0
        path, out = self.cache.stage() if head.length <= self.memory else (None, None)
        try:
            for left in range(head.length, 0, -CHUNK):
                chunk = await self._read(reader, min(left, CHUNK))
                conn.take_frames([], now=time.monotonic())  # a sign of life, for the heartbeat
                crc = zlib.crc32(chunk, crc)
                if out is not None:
                    digest.update(chunk)
                    out.write(chunk)
            if crc != head.crc:
                raise ProtocolError(f"LOAD blob {head.name!r}: CRC32 mismatch, the bytes were corrupted in transit")
        except BaseException:
            if path is not None:
                _remove(path)
            raise
        finally:
            if out is not None:
                out.close()
        head.message.blobs["model"] = ReceivedModel(head.length, digest.hexdigest() if path else "", path)
        return [head.message]

    # -- the work (compute thread) -------------------------------------------

    def handle(self, message: Message) -> tuple[str, list[Any]]:
        """Carry out LOAD, UNLOAD, STORE or RUN; return the answer's type and its encoded frame."""
        h = message.header
        try:
            if message.type == wire.LOAD:
                with self.cache_lock:
                    answer = self._load(message)
            elif message.type == wire.STORE:
                answer = self._store(message)
            elif message.type == wire.UNLOAD:
                self.resident.unload()
                answer = Message(wire.UNLOADED, {"partition": h["partition"], "rss": current_rss()})
            else:
                answer = self._run(message)
            lossy = h.get("lossy") if message.type == wire.RUN and h.get("lossy") in self.lossy else None
            return answer.type, wire.encode_parts(answer, codec=self.codec, version=self.version, lossy=lossy)
        except Exception as exc:  # reported to the coordinator, the connection stays usable
            where = {"task": h["task"]} if message.type == wire.RUN else {"load": h.get("partition", "?")}
            if not wire.is_name(h.get("partition", h.get("task", ["?"])[0])):  # a message not from the wire
                where = {"load": ascii(h.get("partition", h.get("task")))[:wire.MAX_NAME_CHARS]}
            # backslashreplace: whatever the error quotes, the answer stays UTF-8 that can be sent
            text = f"{type(exc).__name__}: {exc}".encode("utf-8", "backslashreplace").decode("utf-8")
            return wire.FAILED, wire.encode_parts(Message(wire.FAILED, {**where, "error": text[:4000]}),
                                                  version=self.version)

    def _load(self, message: Message) -> Message:
        h = message.header
        name, sha = h["partition"], h["sha256"]
        fast = h.get("fast", False)
        start = time.perf_counter()
        keep = True
        if h["from_cache"]:
            source = self.cache.get(sha)
            if source is None:
                raise FileNotFoundError(f"partition {name} ({sha[:12]}) is not in this worker's cache; "
                                        "send its bytes")
            self.resident.unload()
        else:
            received = self._received(message.blobs.pop("model"))
            try:
                if received.size > self.memory:
                    raise ValueError(f"partition {name} is {format_bytes(received.size)}, more than this worker's "
                                     f"budget of {format_bytes(self.memory)}; it was refused and not kept")
                if received.sha256 != sha:
                    raise ValueError(f"the bytes received for partition {name} do not hash to its sha256 "
                                     f"{sha[:12]}...; refusing to load them")
                self.resident.unload()
                assert received.path is not None
                source, keep = self.cache.put(sha, received.path)
            finally:
                if received.path is not None:
                    _remove(received.path)
        gc.collect()
        release_memory()
        reset_peak_rss()
        try:
            self.resident.load(str(source), name, sha, fast)
        finally:
            if not keep:  # larger than the whole cache: it served to open the session only
                self.cache.remove(sha)
        return Message(wire.LOADED, {"partition": name, "sha256": sha, "seconds": time.perf_counter() - start,
                                     "rss": current_rss(), **({"fast": True} if fast else {})})

    def _store(self, message: Message) -> Message:
        """Take one chunk of a STORE; say how much of the partition is here, and at its end whether it was kept.

        Never FAILED: a STORE is a hint, and a FAILED naming a partition
        would answer a LOAD of it.  A partition not kept is sent again with
        the LOAD that needs it.
        """
        h = message.header
        name, sha = h["partition"], h["sha256"]
        received, kept, why = self.partial.take(sha, h["offset"], h["size"], message.blobs.pop("model"),
                                                min(self.memory, self.cache.max_bytes))
        if kept is None:
            return Message(wire.STORED, {"partition": name, "sha256": sha, "received": received})
        if kept:
            try:
                with self.cache_lock:
                    self.cache.put(sha, self.partial.take_file())
            except (OSError, ValueError) as exc:
                kept, why = False, f"{type(exc).__name__}: {exc}"
        self.partial.discard()
        if not kept:
            self.say(f"did not keep partition {name} sent ahead of need: {why}")
        return Message(wire.STORED, {"partition": name, "sha256": sha, "received": received, "kept": kept})

    def _received(self, model: ReceivedModel | bytes) -> ReceivedModel:
        """The bytes of a LOAD that came whole (a small frame) staged like a streamed one."""
        if isinstance(model, ReceivedModel):
            return model
        if len(model) > self.memory:
            return ReceivedModel(len(model), "", None)
        path, out = self.cache.stage()
        with out:
            out.write(model)
        return ReceivedModel(len(model), hashlib.sha256(model).hexdigest(), path)

    def _run(self, message: Message) -> Message:
        h = message.header
        partition, _ = h["task"]
        self.resident.forget(h.get("forget", ()))
        state = h.get("state")
        if state is not None:
            state = TaskState(state["key"], tuple((o, i) for o, i in state["pairs"]), state["keep"],
                              tuple(state["shared"]))
        start = time.perf_counter()
        outputs = self.resident.run(partition, message.tensors, h["outputs"], state=state)
        end = time.perf_counter()
        message.tensors.clear()
        header = {"task": h["task"], "start": start, "end": end, "peak_rss": peak_rss_since_reset(), "rss": current_rss()}
        if h.get("hold"):
            held = self.held.keep((partition, h["task"][1]), {n: outputs[n] for n in h["hold"] if n in outputs})
            if held:
                header["held"] = held
                outputs = {n: v for n, v in outputs.items() if n not in held}
        return Message(wire.RESULT, header, tensors=outputs)


def _check_fetched(holder: str, entries: list[dict[str, Any]], got: dict[str, Any]) -> None:
    """Raise FetchError unless each fetched output has the dtype and shape its RUN ``fetch`` entry names."""
    for e in entries:
        problem = form_problem(e["output"], got[e["output"]], e["dtype"], e["shape"])
        if problem is not None:
            raise FetchError(holder, f"from {holder}, {problem}")


def _host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="crowdgraph-worker",
        description="Join a crowdgraph coordinator and run model partitions for it.",
        epilog="The token comes from --token-file, --token or $CROWDGRAPH_TOKEN (prefer the file: "
               "command lines are visible to other users of the machine).")
    parser.add_argument("url", help="the coordinator, tcp://HOST:PORT (tls://HOST:PORT for TLS)")
    parser.add_argument("--token-file", help="file holding the shared token")
    parser.add_argument("--token", help="the shared token itself (visible in ps; prefer --token-file)")
    parser.add_argument("--memory", type=byte_size, default="64MB",
                        help="memory budget for a partition and its activations (default 64MB)")
    parser.add_argument("--name", help="name shown in reports (default: host name)")
    parser.add_argument("--cache-dir", help=f"where partitions are kept (default {default_cache_dir()})")
    parser.add_argument("--cache-size", type=byte_size, default="1GB", help="cap of the cache; least recently used out first (default 1GB)")
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1,
                        help="onnxruntime threads (default: every core)")
    parser.add_argument("--cafile", help="with tls://: trust this CA or self-signed certificate")
    parser.add_argument("--reconnect", action="store_true",
                        help="when the connection drops, retry with backoff (joining as a new worker)")
    parser.add_argument("--max-frame-bytes", type=positive_int, default=wire.DEFAULT_MAX_FRAME_BYTES,
                        help="largest frame accepted (default 256 MiB)")
    parser.add_argument("--link-speed", type=byte_size, default=None,
                        help="read from the coordinator at most this many bytes per second, as over a slow "
                             "link (to measure one on a single machine; default: as fast as they come)")
    parser.add_argument("--peer-listen", default="127.0.0.1:0",
                        help="HOST:PORT where other workers of the crowd fetch the outputs this one holds for "
                             "them (default 127.0.0.1:0: workers on this machine; 0.0.0.0:PORT for a LAN; "
                             "'off': every tensor goes through the coordinator)")
    parser.add_argument("--peer-address", help="the HOST:PORT other workers reach the peer port at, when it "
                                               "differs from --peer-listen (port forwarding)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``crowdgraph-worker``."""
    args = build_parser().parse_args(argv)
    try:
        token = read_token(args.token, args.token_file)
        if token is None:
            print("crowdgraph-worker: no token; give --token-file FILE (or set CROWDGRAPH_TOKEN)", file=sys.stderr)
            return EXIT_REFUSED
        memory = args.memory
        cache = PartitionCache(args.cache_dir or default_cache_dir(), args.cache_size)
        # Part of the idle floor announced in HELLO: onnx (it writes received
        # partitions into the cache) and onnxruntime's once-cost, paid by a
        # warm-up session, so a partition's estimate covers only its own session.
        warm_up()
        agent = Agent(args.url, token, memory, name=args.name, cache=cache, threads=args.threads,
                      cafile=args.cafile, reconnect=args.reconnect, max_frame_bytes=args.max_frame_bytes,
                      link_speed=args.link_speed, peer_listen=None if args.peer_listen == "off" else args.peer_listen,
                      peer_address=args.peer_address)
    except (CrowdgraphError, OSError) as exc:
        print(f"crowdgraph-worker: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        return asyncio.run(agent.run())
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
