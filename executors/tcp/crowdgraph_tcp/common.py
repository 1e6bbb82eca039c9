"""Small helpers shared by the coordinator, the driver client and the worker agent.

Nothing here imports tornado, so the worker agent can use it cheaply.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
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
