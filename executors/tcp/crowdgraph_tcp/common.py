"""Small helpers shared by the coordinator, the driver client and the worker agent.

Nothing here imports tornado, so the worker agent can use it cheaply.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

from crowdgraph.errors import ExecutionError, InputError

#: Logger of everything crowdgraph-tcp reports: refused peers, lost workers.
LOG = logging.getLogger("crowdgraph.tcp")

#: Port a standing coordinator listens on when none is given.
DEFAULT_PORT = 8786
#: Environment variable holding the shared token (workers and drivers).
TOKEN_ENV = "CROWDGRAPH_TOKEN"

#: Environment variable naming a CA file to trust for TLS (drivers).
CAFILE_ENV = "CROWDGRAPH_CAFILE"
#: Default heartbeat interval in seconds announced in WELCOME.
DEFAULT_HEARTBEAT = 5.0


@dataclass
class PreAuthLimits:
    """What connections that have not yet proved the token may hold, in total and per address.

    Before its handshake a peer is anybody who can reach the port, so what
    it can make the coordinator hold is bounded here: how many such
    connections are open at once and how many bytes they have sent that
    are still buffered, each counted in total and per remote address (its
    host, without the port).  Pure bookkeeping; the coordinator asks
    :meth:`open` for each new connection, :meth:`charge` for each chunk it
    is about to read during the handshake, and calls :meth:`close` once the
    handshake ends, either way.

    >>> limits = PreAuthLimits(connections=3, connections_per_address=2, bytes=100, bytes_per_address=60)
    >>> limits.open("10.0.0.1"), limits.open("10.0.0.1")
    (None, None)
    >>> limits.open("10.0.0.1")
    'too many connections from 10.0.0.1 are still in their handshake (2, at most 2)'
    >>> limits.room("10.0.0.1"), limits.charge("10.0.0.1", 50), limits.room("10.0.0.1")
    (60, None, 10)
    >>> limits.charge("10.0.0.1", 20)
    'connections from 10.0.0.1 sent 70 bytes before their handshake ended (at most 60)'
    >>> limits.close("10.0.0.1", 50); limits.close("10.0.0.1", 0); limits.open("10.0.0.2")
    """

    #: Connections still in their handshake, all addresses together.
    connections: int = 512
    #: ... from one address (a NAT shares one among many phones).
    connections_per_address: int = 64
    #: Bytes those connections sent that are still held, all addresses together.
    bytes: int = 64 * 2**20
    #: ... from one address; at least one handshake frame (1 MiB) must fit.
    bytes_per_address: int = 8 * 2**20
    _open: Counter[str] = field(default_factory=Counter, init=False, repr=False)
    _held: Counter[str] = field(default_factory=Counter, init=False, repr=False)

    @property
    def open_connections(self) -> int:
        """Connections now in their handshake, all addresses together."""
        return sum(self._open.values())

    @property
    def held_bytes(self) -> int:
        """Bytes those connections sent that are still held, all addresses together."""
        return sum(self._held.values())

    def open(self, address: str) -> str | None:
        """Count a new connection from ``address``; why it is refused (then not counted), or None."""
        if self.open_connections >= self.connections:
            return (f"too many connections are still in their handshake ({self.connections}, "
                    f"at most {self.connections})")
        if self._open[address] >= self.connections_per_address:
            return (f"too many connections from {address} are still in their handshake "
                    f"({self._open[address]}, at most {self.connections_per_address})")
        self._open[address] += 1
        return None

    def room(self, address: str) -> int:
        """Bytes a connection from ``address`` may still be charged before a limit is reached."""
        return max(0, min(self.bytes - self.held_bytes, self.bytes_per_address - self._held[address]))

    def charge(self, address: str, size: int) -> str | None:
        """Count ``size`` more bytes held for ``address``; why that is too many (then not counted), or None."""
        total = self.held_bytes + size
        if total > self.bytes:
            return f"connections in their handshake sent {total} bytes (at most {self.bytes} in all)"
        if self._held[address] + size > self.bytes_per_address:
            return (f"connections from {address} sent {self._held[address] + size} bytes before their "
                    f"handshake ended (at most {self.bytes_per_address})")
        self._held[address] += size
        return None

    def close(self, address: str, charged: int) -> None:
        """A connection from ``address`` ended its handshake (or closed): forget it and its ``charged`` bytes."""
        self._open[address] -= 1
        self._held[address] -= charged
        if self._open[address] <= 0:
            del self._open[address]
            self._held.pop(address, None)


def parse_url(url: str) -> tuple[str, str, int]:
    """Split ``tcp://host:port`` (or ``tls://``) into scheme, host and port.

    >>> parse_url("tcp://127.0.0.1:8786")
    ('tcp', '127.0.0.1', 8786)
    >>> parse_url("tls://[::1]")
    ('tls', '::1', 8786)
    """
    parts = urlsplit(url if "://" in url else f"tcp://{url}")
    if parts.scheme not in ("tcp", "tls") or not parts.hostname:
        raise InputError(f"cannot read coordinator address {url!r}; write tcp://HOST:PORT "
                         "(or tls://HOST:PORT for TLS)")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise InputError(f"bad port in {url!r}; write tcp://HOST:PORT") from None
    return parts.scheme, parts.hostname, port


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:0`` for IPv6) into host and port.

    >>> parse_listen("127.0.0.1:0"), parse_listen("8786"), parse_listen("[::1]:9000")
    (('127.0.0.1', 0), ('127.0.0.1', 8786), ('::1', 9000))
    """
    text = str(listen).strip()
    if text.isdigit():
        return "127.0.0.1", int(text)
    _, host, port = parse_url(f"tcp://{text}")
    if text.rsplit(":", 1)[-1].isdigit():
        port = int(text.rsplit(":", 1)[-1])
    return host, port


def read_token(token: str | bytes | None = None, token_file: str | os.PathLike | None = None,
               *, env: bool = True) -> bytes | None:
    """The shared token from an argument, a file (first line) or ``$CROWDGRAPH_TOKEN``."""
    if token is not None:
        value = token.encode("utf-8") if isinstance(token, str) else bytes(token)
    elif token_file is not None:
        try:
            with open(token_file, "rb") as f:
                value = f.read().strip()
        except OSError as exc:
            raise InputError(f"cannot read the token file {os.fspath(token_file)!r}: {exc}") from None
    elif env and os.environ.get(TOKEN_ENV):
        value = os.environ[TOKEN_ENV].encode("utf-8")
    else:
        return None
    if not value:
        raise InputError("the shared token is empty; put a long random string in the token file "
                         "(python -c 'import secrets; print(secrets.token_hex(32))')")
    return value


def server_ssl_context(certfile: str | os.PathLike, keyfile: str | os.PathLike | None = None) -> ssl.SSLContext:
    """A TLS context for the coordinator's listening socket."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(os.fspath(certfile), os.fspath(keyfile) if keyfile else None)
    return context


def client_ssl_context(cafile: str | os.PathLike | None = None, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A TLS context for a worker or driver; ``cafile`` trusts a private (self-signed) certificate."""
    context = ssl.create_default_context(cafile=os.fspath(cafile) if cafile else None)
    context.check_hostname = check_hostname
    return context


def frame_size(parts: list[Any]) -> int:
    """Bytes of a frame given as :func:`crowdgraph.wire.encode_parts` buffers."""
    return sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in parts)


def wait_for_workers(changed: threading.Condition, connected: Callable[[], int], count: int,
                     timeout: float, url: str, gone: Callable[[], bool] = lambda: False) -> None:
    """Block until ``connected()`` reaches ``count`` (``changed`` is notified on each join).

    Raises :class:`ExecutionError` saying how to start workers when
    ``timeout`` seconds pass first; returns early once ``gone()`` is true.
    """
    deadline = time.monotonic() + timeout
    with changed:
        while connected() < count and not gone():
            left = deadline - time.monotonic()
            if left <= 0:
                raise ExecutionError(
                    f"only {connected()} of the {count} workers this run needs joined {url} within "
                    f"{timeout:.0f} s; start workers with `crowdgraph-worker {url} --token-file FILE --memory 64MB`")
            changed.wait(min(left, 0.25))
