"""``crowdgraph serve``: a standing coordinator that workers join and drivers use.

Registered through the entry-point group ``crowdgraph.commands``::

    crowdgraph serve --listen 0.0.0.0:8786 --token-file ~/.crowdgraph-token

Workers join with ``crowdgraph-worker tcp://HOST:8786 --token-file ...``;
a Python process runs a model on them with
``compiled.run(batch, executor="tcp://HOST:8786")`` and ``CROWDGRAPH_TOKEN``
set.  It runs until interrupted (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any

from crowdgraph.cli import positive_float
from crowdgraph.errors import InputError

from .common import DEFAULT_HEARTBEAT, DEFAULT_PORT, TOKEN_ENV, read_token
from .coordinator import QUARANTINE_SECONDS


def register(subparsers: Any) -> None:
    """Add ``serve`` to the ``crowdgraph`` command line."""
    p = subparsers.add_parser(
        "serve", help="run a standing coordinator that workers join (crowdgraph-tcp)",
        description="Run a standing coordinator: workers join it with crowdgraph-worker, and Python "
                    "processes run models on its crowd with executor='tcp://HOST:PORT'.")
    p.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_PORT}",
                   help=f"HOST:PORT to listen on (default 127.0.0.1:{DEFAULT_PORT}; loopback only -- "
                        "use 0.0.0.0:PORT to let other machines in)")
    p.add_argument("--token-file", help=f"file holding the shared token (default: ${TOKEN_ENV})")
    p.add_argument("--certfile", help="serve TLS with this certificate (PEM)")
    p.add_argument("--keyfile", help="private key of --certfile, if not in it")
    p.add_argument("--heartbeat", type=positive_float, default=DEFAULT_HEARTBEAT,
                   help=f"seconds between heartbeats; 3 missed = lost (default {DEFAULT_HEARTBEAT:g})")
    p.add_argument("--web", action="store_true",
                   help="also serve the browser worker page: phones join by opening the printed URL / QR code")
    p.add_argument("--web-port", type=int, default=None,
                   help="HTTP(S) port of the worker page (default: the --listen port + 1)")
    p.add_argument("--public-host", default=None,
                   help="host name or address to put in the join URL (default: this machine's LAN address "
                        "when listening on 0.0.0.0)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                   help="with --web: also accept worker pages served from this origin (http(s)://HOST:PORT; "
                        "repeat for more); the printed join URL's origin is always accepted, no other")
    p.add_argument("--quarantine-seconds", type=positive_float, default=QUARANTINE_SECONDS,
                   help="how long a worker that a driver's spot checks outvoted is refused "
                        f"(default {QUARANTINE_SECONDS:g})")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until interrupted; returns the exit code."""
    from .relay import standing_coordinator

    for flag, path in (("--certfile", args.certfile), ("--keyfile", args.keyfile)):
        if path is not None and not os.path.isfile(path):
            raise InputError(f"{flag} {path}: no such file; give the PEM file of the TLS certificate and key")
    token = read_token(None, args.token_file)
    if token is None:
        print(f"crowdgraph serve: no token; give --token-file FILE or set {TOKEN_ENV} "
              "(python -c 'import secrets; print(secrets.token_hex(32))' > FILE)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    web_port = None
    if getattr(args, "web", False):
        from .common import parse_listen
        from .web import assets_missing, origin_of

        for url in args.allow_origin:
            origin_of(url)  # refuse a bad one before anything listens

        web_port = args.web_port if args.web_port is not None else (parse_listen(args.listen)[1] or -1) + 1
        if assets_missing():
            print("crowdgraph serve: onnxruntime-web is not installed, so the page cannot run models yet; "
                  "run `make web` (npm ci in executors/tcp/crowdgraph_tcp/web)", file=sys.stderr)
    coordinator = standing_coordinator(token, args.listen, certfile=args.certfile, keyfile=args.keyfile,
                                       heartbeat=args.heartbeat, web_port=web_port,
                                       quarantine_seconds=args.quarantine_seconds)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = coordinator.url
        print(f"crowdgraph serve: listening on {url}", flush=True)
        print(f"  workers join with: crowdgraph-worker {url} --token-file FILE --memory 64MB", flush=True)
        print(f"  drivers use:       compiled.run(batch, executor=\"{url}\")  (with {TOKEN_ENV} set)",
              flush=True)
        if coordinator.web_port is not None:
            join = coordinator.join_url(args.public_host or _public_host(str(coordinator.host)))
            assert join is not None
            coordinator.allowed_origins = frozenset(origin_of(url) for url in [join, *args.allow_origin])
            print(f"  phones join at:    {join}", flush=True)
            print("  (the token is in the URL's #fragment: share it only with your own devices)", flush=True)
            _print_qr(join)
        while not stop.wait(0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        coordinator.stop("the standing coordinator is shutting down")
    print("crowdgraph serve: stopped", flush=True)
    return 0


def _public_host(host: str) -> str:
    """The address other machines reach this one at, for a coordinator listening on ``host``."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    import socket

    try:  # no packet is sent: connecting a UDP socket only picks the outgoing interface
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def _print_qr(url: str) -> None:
    try:
        import segno
    except ImportError:
        print("  (pip install segno to see a QR code here)", flush=True)
        return
    segno.make(url, error="l").terminal(compact=True)
    sys.stdout.flush()
