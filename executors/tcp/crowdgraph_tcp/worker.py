"""crowdgraph-worker: the agent a phone (Termux), a Raspberry Pi or a laptop runs.

It connects *out* to a coordinator (so it works behind NAT), proves it
knows the shared token, and then does what the coordinator says:

* ``LOAD``: take the partition from the local cache (its sha256 checked
  first) or from the bytes sent along (checked, then stored in the cache
  as ``<sha256>.onnx``), drop whatever was loaded before, and open the
  partition *from the file* through :func:`crowdgraph.runtime.open_session`;
* ``UNLOAD``: drop the session and hand the memory back to the OS;
* ``RUN``: run one task and send back its outputs with the peak RSS since
  the last load;
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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

from crowdgraph import wire
from crowdgraph.cli import Parser, byte_size, positive_int
from crowdgraph.errors import AuthenticationError, CrowdgraphError, ProtocolError
from crowdgraph.measure import peak_rss_since_reset, reset_peak_rss
from crowdgraph.runtime import ResidentSession, current_rss, release_memory, warm_up
from crowdgraph.units import format_bytes
from crowdgraph.wire import Message

from .common import client_ssl_context, parse_url, read_token

__all__ = ["PartitionCache", "Agent", "main"]

_HEX64 = re.compile(r"[0-9a-f]{64}")
#: Largest read from the socket at once.
CHUNK = 1 << 20
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
    >>> small, large = partition(100), partition(120)
    >>> sha = hashlib.sha256(small).hexdigest()
    >>> cache.put(sha, [small]).name == sha + ".onnx", cache.digests() == [sha]
    (True, True)
    >>> onnx.load(cache.get(sha)).graph.initializer[0].float_data[:2]
    [0.5, 0.5]
    >>> cache.put(hashlib.sha256(large).hexdigest(), [large]) is not None  # evicts
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
        import onnx

        data = self.folder / f"{sha256}.onnx.data"
        try:
            model = onnx.load(str(self.folder / f"{sha256}.onnx"), load_external_data=False)
            return external_data_problem(model, data.name, data.stat().st_size if data.is_file() else 0)
        except Exception as exc:  # unreadable or not a model
            return f"the stored model cannot be read ({exc})"

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

    def put(self, sha256: str, holder: list[bytes]) -> Path | None:
        """Store the model bytes in ``holder`` (checked to hash to ``sha256``); return its file.

        ``holder`` is a one-item list, emptied as soon as the bytes are no
        longer needed (so they are freed before onnxruntime opens the file).
        Returns None, leaving ``holder`` as it was, when the bytes exceed the
        cache's size.  The weights go to a separate data file; ValueError,
        with nothing written, when the model refers to any external data.
        """
        size = len(holder[0])
        if size > self.max_bytes:
            return None
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
            model_path = staging / f"{sha256}.onnx"
            _write_external(holder, model_path, f"{sha256}.onnx.data")
            files = {p.name: file_sha256(p) for p in staging.iterdir()}
            for name in files:
                os.replace(staging / name, self.folder / name)
            tmp = staging / "manifest"
            tmp.write_text(json.dumps({"format": 1, "sha256": sha256, "files": files}))
            os.replace(tmp, self.folder / f"{sha256}.json")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.folder / f"{sha256}.onnx"


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


def parse_received(data: bytes) -> Any:
    """Parse a received partition; ValueError when it refers to any external data.

    A partition travels with its weights inline, so an external-data
    reference in it can only point at files that are not its own.
    """
    import onnx

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError
        raise ValueError(f"the bytes received are not an ONNX model ({exc}); refusing them") from None
    problem = external_data_problem(model)
    if problem is not None:
        raise ValueError(f"refusing the partition: {problem}")
    return model


def _write_external(holder: list[bytes], path: Path, location: str) -> None:
    """Write the model in ``holder`` to ``path`` with its weights in ``location`` beside it.

    Raises ValueError, having written nothing, when the received model
    already refers to external data (see :func:`parse_received`).
    """
    import onnx

    model = parse_received(holder[0])
    holder.clear()  # the parsed model holds the weights now; free the bytes
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)


def _remove(path: Path) -> None:
    try:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        pass


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
                 log: Any = None):
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
        self.codec, self.version = "none", 1
        self.floor_rss = current_rss()

    def say(self, text: str) -> None:
        print(f"crowdgraph-worker: {text}", file=self.log, flush=True)

    # -- the connection ------------------------------------------------------

    async def run(self) -> int:
        """Serve until BYE (0), a refusal (2) or a lost connection (1); retry with ``reconnect``."""
        delay = 1.0
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
                data = await reader.read(CHUNK)
                if not data:
                    raise _Lost("the coordinator closed the connection")
                try:
                    inbox.extend(conn.receive_data(data, now=time.monotonic()))
                finally:
                    writer.writelines(conn.data_to_send())
            return inbox.pop(0)

        try:
            conn.hello({"name": self.name, "memory_budget": self.memory, "cores": self.threads,
                        "platform": _platform(), "cached": self.cache.digests(), "rss": self.floor_rss},
                       now=time.monotonic())
            writer.writelines(conn.data_to_send())
            await asyncio.wait_for(next_message(), conn.handshake_deadline - time.monotonic())  # WELCOME
            self.codec, self.version = conn.codec, conn.version
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
        actions: asyncio.Queue[Message] = asyncio.Queue()
        pool = ThreadPoolExecutor(1, thread_name_prefix="crowdgraph-worker-compute")
        assert conn.heartbeat is not None
        heartbeat = conn.heartbeat

        async def read_loop() -> None:
            while True:
                message = await next_message()
                if message.type == wire.BYE:
                    raise _Bye(message.header.get("reason", ""))
                actions.put_nowait(message)

        async def compute_loop() -> None:
            while True:
                message = await actions.get()
                kind, parts = await loop.run_in_executor(pool, self.handle, message)
                del message
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
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            pool.shutdown(wait=False, cancel_futures=True)

    # -- the work (compute thread) -------------------------------------------

    def handle(self, message: Message) -> tuple[str, list[Any]]:
        """Carry out LOAD, UNLOAD or RUN; return the answer's type and its encoded frame."""
        h = message.header
        try:
            if message.type == wire.LOAD:
                answer = self._load(message)
            elif message.type == wire.UNLOAD:
                self.resident.unload()
                answer = Message(wire.UNLOADED, {"partition": h["partition"], "rss": current_rss()})
            else:
                answer = self._run(message)
            return answer.type, wire.encode_parts(answer, codec=self.codec, version=self.version)
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
        start = time.perf_counter()
        source: Path | bytes | None
        if h["from_cache"]:
            source = self.cache.get(sha)
            if source is None:
                raise FileNotFoundError(f"partition {name} ({sha[:12]}) is not in this worker's cache; "
                                        "send its bytes")
            self.resident.unload()
        else:
            data = message.blobs.pop("model")
            if hashlib.sha256(data).hexdigest() != sha:
                raise ValueError(f"the bytes received for partition {name} do not hash to its sha256 "
                                 f"{sha[:12]}...; refusing to load them")
            self.resident.unload()
            holder = [data]
            del data
            source = self.cache.put(sha, holder)
            if source is None:  # larger than the whole cache: open it from memory
                parse_received(holder[0])
                source = holder.pop()
        gc.collect()
        release_memory()
        reset_peak_rss()
        self.resident.load(source, name, sha)
        del source
        return Message(wire.LOADED, {"partition": name, "sha256": sha, "seconds": time.perf_counter() - start,
                                     "rss": current_rss()})

    def _run(self, message: Message) -> Message:
        h = message.header
        partition, _ = h["task"]
        start = time.perf_counter()
        outputs = self.resident.run(partition, message.tensors, h["outputs"])
        end = time.perf_counter()
        message.tensors.clear()
        return Message(wire.RESULT, {"task": h["task"], "start": start, "end": end,
                                     "peak_rss": peak_rss_since_reset(), "rss": current_rss()}, tensors=outputs)


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
                      cafile=args.cafile, reconnect=args.reconnect, max_frame_bytes=args.max_frame_bytes)
    except (CrowdgraphError, OSError) as exc:
        print(f"crowdgraph-worker: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        return asyncio.run(agent.run())
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
