"""Browser workers: the worker page, its script, onnxruntime-web, and the WebSocket endpoint.

A phone joins a crowd by opening the join URL a coordinator prints
(``http://HOST:WEBPORT/#token=...``).  The page (``web/index.html`` and
``web/worker.mjs``) speaks the frames of docs/protocol.md as binary
WebSocket messages, one frame per message, on ``/ws``; onnxruntime-web
(from ``web/node_modules``, installed by ``npm ci``) runs the partitions
in a Web Worker.  The token travels in the URL's fragment, which browsers
never send to a server, so it never reaches a server log.

Everything is served from this process: no CDN.  Every response carries
``Cross-Origin-Opener-Policy: same-origin`` and
``Cross-Origin-Embedder-Policy: require-corp``, so a page loaded over
HTTPS (or from localhost) is cross-origin isolated and onnxruntime-web
runs multi-threaded; elsewhere (plain http on a LAN) it runs one thread.

The WebSocket side is a thin adapter: :class:`WebSocketStream` looks like
the :class:`tornado.iostream.IOStream` the coordinator already drives
(``read_bytes``, ``write``, ``close``), so the handshake, heartbeats and
per-worker ordered submit are the very code the TCP workers go through.
Outgoing bytes are cut back into whole frames (from the fixed header's
``body_length``) and each frame leaves as one binary message; an incoming
message must hold exactly one frame.
"""

from __future__ import annotations

import asyncio
import gzip
import mimetypes
import os
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tornado.web
import tornado.websocket
from tornado.iostream import StreamClosedError

from crowdgraph import wire
from crowdgraph.errors import InputError, ProtocolError

from .common import LOG
from .streams import Gate

__all__ = ["WEB_ROOT", "ORT_DIST", "ORT_FILES", "WebSocketStream", "make_app", "join_url", "assets_missing",
           "BROWSER_RUNTIME_BYTES", "BROWSER_MODEL_FACTOR"]

#: Folder of the page's own files (index.html, worker.mjs, compute.mjs).
WEB_ROOT = Path(__file__).resolve().parent / "web"
#: Where ``npm ci`` puts onnxruntime-web's files.
ORT_DIST = WEB_ROOT / "node_modules" / "onnxruntime-web" / "dist"
#: The only onnxruntime-web files the page needs (the WASM-only build).
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
#: The page's own files.
PAGE_FILES = ("index.html", "worker.mjs", "compute.mjs", "proto.mjs", "cache.mjs")

#: What the WASM runtime costs a tab before any partition (measured headless, docs/browser.md).
BROWSER_RUNTIME_BYTES = 80_000_000
#: How many times a partition's estimated resident bytes a tab really spends (docs/browser.md).
BROWSER_MODEL_FACTOR = 3
#: Largest HTTP request body the web port reads: the page sends none, so anything larger is refused unread.
MAX_REQUEST_BODY = 4096

_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_MIME = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
         ".html": "text/html; charset=utf-8", ".png": "image/png"}
_COMPRESSIBLE = {".mjs", ".js", ".wasm", ".html"}

mimetypes.add_type("text/javascript", ".mjs")
mimetypes.add_type("application/wasm", ".wasm")


def assets_missing() -> list[str]:
    """The onnxruntime-web files that are not installed (run ``make web`` / ``npm ci``)."""
    return [name for name in ORT_FILES if not (ORT_DIST / name).is_file()]


def join_url(host: str, port: int, token: bytes, *, tls: bool = False, threads: int | None = None) -> str:
    """The URL a phone opens: the token rides in the fragment, which is never sent to a server.

    >>> join_url("192.168.1.5", 8787, b"s3cret")
    'http://192.168.1.5:8787/#token=s3cret'
    """
    host = f"[{host}]" if ":" in host else host
    query = f"?threads={threads}" if threads else ""
    from urllib.parse import quote

    return f"{'https' if tls else 'http'}://{host}:{port}/{query}#token={quote(token.decode('utf-8'), safe='')}"


def origin_of(url: str) -> str:
    """The origin (``scheme://host:port``, lower case) a browser sends for a page at ``url``.

    >>> origin_of("http://192.168.1.5:8787/?threads=2#token=s3cret")
    'http://192.168.1.5:8787'
    >>> origin_of("HTTPS://Phone-Farm.local:443/"), origin_of("http://[::1]:80")  # default ports go
    ('https://phone-farm.local', 'http://[::1]')
    """
    parts = urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or port == -1:
        raise InputError(f"cannot read an origin from {url!r}; write http://HOST:PORT (or https://HOST:PORT)")
    scheme = parts.scheme.lower()
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = {"http": 80, "https": 443}[scheme]
    return f"{scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


class _Base(tornado.web.RequestHandler):
    def set_default_headers(self) -> None:
        for k, v in _HEADERS.items():
            self.set_header(k, v)
        self.set_header("Cache-Control", "no-cache")

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:  # keep 404s quiet
        if isinstance(value, tornado.web.HTTPError):
            return
        super().log_exception(typ, value, tb)


class _AssetHandler(_Base):
    """A fixed set of files, gzip-compressed once when the client accepts it."""

    _gz: dict[Path, tuple[float, bytes]] = {}

    def initialize(self, root: Path, names: tuple[str, ...], default: str | None = None) -> None:
        self.root, self.names, self.default = root, names, default

    def get(self, name: str = "") -> None:
        name = name or (self.default or "")
        if name not in self.names:
            raise tornado.web.HTTPError(404)
        path = self.root / name
        if not path.is_file():
            if self.root == ORT_DIST:
                self.set_status(503)
                self.finish(f"onnxruntime-web is not installed here; run `make web` (npm ci in {WEB_ROOT})\n")
                return
            raise tornado.web.HTTPError(404)
        suffix = path.suffix
        self.set_header("Content-Type", _MIME.get(suffix, mimetypes.guess_type(name)[0] or "application/octet-stream"))
        self.set_header("Vary", "Accept-Encoding")
        if suffix in _COMPRESSIBLE and "gzip" in self.request.headers.get("Accept-Encoding", ""):
            self.set_header("Content-Encoding", "gzip")
            self.finish(self._compressed(path))
        else:
            self.finish(path.read_bytes())

    @classmethod
    def _compressed(cls, path: Path) -> bytes:
        mtime = path.stat().st_mtime
        hit = cls._gz.get(path)
        if hit is None or hit[0] != mtime:
            pre = path.with_name(path.name + ".gz")  # a shipped precompressed copy wins
            data = pre.read_bytes() if pre.is_file() and pre.stat().st_mtime >= mtime else \
                gzip.compress(path.read_bytes(), compresslevel=6, mtime=0)
            hit = cls._gz[path] = (mtime, data)
        return hit[1]


class _ConfigHandler(_Base):
    """Small JSON the page reads at start: the rule it announces its budget with."""

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish({"runtime_bytes": BROWSER_RUNTIME_BYTES, "model_factor": BROWSER_MODEL_FACTOR,
                     "heartbeat": self.application.settings["coordinator"].heartbeat})


class WebSocketStream:
    """An IOStream look-alike over one WebSocket connection (the coordinator's IOLoop thread)."""

    def __init__(self, handler: "_WorkerSocket"):
        self.handler = handler
        self._incoming: deque[bytes] = deque()
        self._buffer = bytearray()
        self._waiter: asyncio.Future[None] | None = None  # the coordinator waits for a message
        self._read: asyncio.Future[None] | None = None  # the handler waits for it to be read
        self._out = bytearray()
        self._closed = False
        self._gate: Gate | None = None
        self.error: BaseException | None = None

    # -- what the handler feeds in
    async def feed(self, data: bytes) -> None:
        """Queue one received message; return once the coordinator has read all of it.

        The handler awaits this before tornado reads the next message, so a
        connection never holds more than one unread message.
        """
        if self._gate is not None:
            try:
                self._gate.charge(len(data))
            except ProtocolError as exc:  # over the limits: dropped unqueued, and the connection ends
                self.error = exc
                self._wake()
                return
        if len(data) < wire.HEADER_SIZE or wire.frame_length(data) != len(data):
            self.error = ProtocolError(f"a WebSocket message must hold exactly one frame ({len(data)} bytes "
                                       "do not)") if data[:4] == wire.MAGIC or len(data) < 4 else None
        self._incoming.append(bytes(data))
        self._wake()
        while (self._incoming or self._buffer) and not self._closed and self.error is None:
            self._read = asyncio.get_running_loop().create_future()
            await self._read

    def lost(self) -> None:
        self._closed = True
        self._wake()

    def charge_to(self, gate: Gate) -> None:
        """Until the handshake ends, charge each message to ``gate`` as it arrives (those queued already too).

        Tornado has read a message whole before it is handed over, so it is
        charged then, not when the coordinator reads it as a TCP stream is.
        """
        self._gate = gate
        for data in self._incoming:
            gate.charge(len(data))

    def authenticated(self, max_frame_bytes: int) -> None:
        """The peer proved the token: accept messages up to ``max_frame_bytes`` from now on, uncharged."""
        self._gate = None
        connection = self.handler.ws_connection
        if connection is not None:  # tornado reads the limit for each message from its params
            connection.params.max_message_size = int(max_frame_bytes)

    def _wake(self) -> None:
        for future in (self._waiter, self._read):
            if future is not None and not future.done():
                future.set_result(None)

    # -- the IOStream subset the coordinator uses
    async def read_bytes(self, num_bytes: int, partial: bool = False) -> bytes:
        while not self._buffer:
            if self.error is not None:
                raise self.error
            if self._incoming:
                self._buffer += self._incoming.popleft()
                break
            if self._closed:
                raise StreamClosedError()
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        chunk = bytes(self._buffer[:num_bytes])
        del self._buffer[:num_bytes]
        if not self._buffer and not self._incoming:
            self._wake()
        return chunk

    def write(self, data: Any) -> "asyncio.Future[None]":
        if self._closed:
            raise StreamClosedError()
        self._out += data
        last: Any = None
        while len(self._out) >= wire.HEADER_SIZE:
            size = wire.frame_length(self._out)
            if len(self._out) < size:
                break
            frame = bytes(self._out[:size])
            del self._out[:size]
            try:
                last = self.handler.write_message(frame, binary=True)
            except tornado.websocket.WebSocketClosedError:
                self._closed = True
                raise StreamClosedError() from None
        if last is None:
            last = asyncio.get_running_loop().create_future()
            last.set_result(None)
        return last

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.handler.close()
        self._wake()

    def closed(self) -> bool:
        return self._closed

    def set_nodelay(self, value: bool) -> None:
        self.handler.set_nodelay(value)


class _WorkerSocket(tornado.websocket.WebSocketHandler):
    """``/ws``: one browser worker; frames go to the coordinator's handshake and serve loop."""

    def initialize(self, coordinator: Any) -> None:
        self.coordinator = coordinator
        self.stream_adapter: WebSocketStream | None = None

    def set_default_headers(self) -> None:
        for k, v in _HEADERS.items():
            self.set_header(k, v)

    def prepare(self) -> None:
        """Only pages from the allowed origins (``Coordinator.allowed_origins``) may open a WebSocket.

        A missing Origin header is refused (every browser sends one; only
        a page can join).  Neither the request's own Host nor the browser's
        ``Sec-Fetch-Site`` is trusted: a DNS-rebinding page names this
        coordinator's address under its own host name, and to the browser
        that is the same origin.
        """
        origin = self.request.headers.get("Origin")
        allowed = self.coordinator.allowed_origins
        if origin is None or origin.lower() not in allowed:
            LOG.warning("refused a WebSocket from %s with %s (allowed: %s); add an origin with --allow-origin",
                        self.request.remote_ip, f"origin {origin!r}" if origin else "no Origin header",
                        ", ".join(sorted(allowed)) or "none")
            raise tornado.web.HTTPError(403, reason="a WebSocket must come from an allowed page origin")

    def check_origin(self, origin: str) -> bool:
        """The origin was checked in :meth:`prepare`, strictly; tornado's own looser check is not wanted."""
        return True

    def get_compression_options(self) -> None:
        return None  # frames carry their own codec

    @property
    def max_message_size(self) -> int:  # type: ignore[override]
        """Before the handshake, the TCP port's limit; :meth:`WebSocketStream.authenticated` raises it."""
        return wire.HANDSHAKE_MAX_FRAME_BYTES

    def open(self) -> None:
        self.stream_adapter = WebSocketStream(self)
        ip = self.request.remote_ip
        self.coordinator._spawn(self.coordinator._handle(self.stream_adapter, (ip, "ws")))

    async def on_message(self, message: Any) -> None:
        assert self.stream_adapter is not None
        if isinstance(message, str):
            self.stream_adapter.error = ProtocolError("text WebSocket messages are not used; send binary frames")
            self.stream_adapter._wake()
            return
        await self.stream_adapter.feed(message)

    def on_close(self) -> None:
        if self.stream_adapter is not None:
            self.stream_adapter.lost()


def make_app(coordinator: Any) -> tornado.web.Application:
    """The tornado application serving the worker page for ``coordinator``."""
    return tornado.web.Application([
        (r"/", _AssetHandler, {"root": WEB_ROOT, "names": PAGE_FILES, "default": "index.html"}),
        (r"/(index\.html|worker\.mjs|compute\.mjs|proto\.mjs|cache\.mjs)", _AssetHandler, {"root": WEB_ROOT, "names": PAGE_FILES}),
        (r"/ort/([A-Za-z0-9_.\-]+)", _AssetHandler, {"root": ORT_DIST, "names": ORT_FILES}),
        (r"/config\.json", _ConfigHandler),
        (r"/ws", _WorkerSocket, {"coordinator": coordinator}),
    ], coordinator=coordinator, websocket_ping_interval=None, compress_response=False,
        log_function=_log_request)


def _log_request(handler: tornado.web.RequestHandler) -> None:
    status = handler.get_status()
    if status >= 400:  # the path only: the token lives in the fragment and never gets here anyway
        LOG.info("web %s %s -> %d", handler.request.method, handler.request.path, status)


def web_root_exists() -> bool:
    return WEB_ROOT.is_dir() and all((WEB_ROOT / n).is_file() for n in PAGE_FILES)


if os.environ.get("CROWDGRAPH_WEB_DEBUG"):
    LOG.setLevel("DEBUG")
