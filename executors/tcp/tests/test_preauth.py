"""What anybody who can reach a coordinator's ports can make it hold before proving the token.

Each test plays an unauthenticated peer over real sockets on 127.0.0.1 and
checks the coordinator refuses it promptly (a closed connection or an HTTP
refusal, within a few seconds) instead of holding what it sends.
"""

from __future__ import annotations

import base64
import os
import select
import socket
import struct
import time

import numpy as np
import pytest

from crowdgraph import wire
from crowdgraph.wire import Message
from crowdgraph_tcp import Coordinator
from crowdgraph_tcp.common import PreAuthLimits

TOKEN = b"preauth-test-token"
#: How long a refusal may take; what is not refused by then is held.
PROMPT = 5.0


@pytest.fixture(scope="module")
def coordinator():
    """One coordinator with its page port, shared by the tests (each leaves it as it found it)."""
    coord = Coordinator(TOKEN, web_port=0).start()
    yield coord
    coord.stop()


def _in_handshake(coord: Coordinator) -> tuple[int, int]:
    return coord.run_sync(lambda: (coord.preauth.open_connections, coord.preauth.held_bytes))


def _closed_by_peer(sock: socket.socket, timeout: float = PROMPT) -> bool:
    """Whether the other side closes ``sock`` within ``timeout`` (whatever it says first is read and dropped)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def _partial_hello(size: int) -> bytes:
    """The first ``size`` bytes of a HELLO frame that declares the largest body allowed before the handshake."""
    body = wire.HANDSHAKE_MAX_FRAME_BYTES - wire.HEADER_SIZE
    header = struct.pack("<4sBBHQII", wire.MAGIC, 1, wire.MESSAGE_TYPES[wire.HELLO], 0, body, body, 0)
    return (header + b"{" + b" " * body)[:size]


def test_connections_in_their_handshake_are_capped_per_address(coordinator):
    per_address = coordinator.preauth.connections_per_address
    hogs = [socket.create_connection(("127.0.0.1", coordinator.port), timeout=PROMPT) for _ in range(per_address)]
    try:
        for hog in hogs:
            hog.sendall(_partial_hello(100))
        _wait_for(coordinator, lambda counts: counts[0] == per_address, "every hog to be taken in")
        with socket.create_connection(("127.0.0.1", coordinator.port), timeout=PROMPT) as extra:
            extra.sendall(_partial_hello(100))
            assert _closed_by_peer(extra), "a connection beyond the per-address cap was kept open"
    finally:
        for hog in hogs:
            hog.close()
    _wait_idle(coordinator)


def test_bytes_sent_before_the_handshake_are_capped_per_address(coordinator):
    limits = coordinator.preauth
    count = limits.bytes_per_address // wire.HANDSHAKE_MAX_FRAME_BYTES + 2
    socks, refused = [], 0
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", coordinator.port), timeout=PROMPT)
            socks.append(sock)
            try:
                sock.sendall(_partial_hello(wire.HANDSHAKE_MAX_FRAME_BYTES - 100))
            except OSError:  # closed while sending: refused
                pass
        readable, _, _ = select.select(socks, [], [], PROMPT)  # a refused one reads its end at once
        refused = sum(_closed_by_peer(sock, 0.5) for sock in readable)
        held = _in_handshake(coordinator)[1]
    finally:
        for sock in socks:
            sock.close()
    assert refused >= 1, f"{count} partial HELLOs of 1 MiB from one address were all kept"
    assert held <= limits.bytes_per_address
    _wait_idle(coordinator)


def test_the_limits_are_kept_in_total_too():
    limits = PreAuthLimits(connections=4, connections_per_address=4, bytes=3 * 2**20, bytes_per_address=2**30)
    for n in range(4):
        assert limits.open(f"10.0.0.{n}") is None
    assert "at most 4" in limits.open("10.0.0.9")
    assert limits.charge("10.0.0.0", 2**21) is None and limits.room("10.0.0.1") == 2**20
    assert "at most 3145728 in all" in limits.charge("10.0.0.1", 2**20 + 1)


def _wait_for(coord: Coordinator, predicate, what: str) -> None:
    """Wait (at most PROMPT seconds) until ``predicate((connections, bytes))`` holds for the handshake counts."""
    deadline = time.monotonic() + PROMPT
    while not predicate(_in_handshake(coord)):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {_in_handshake(coord)}"
        time.sleep(0.02)


def _wait_idle(coord: Coordinator) -> None:
    """Every refused or closed connection's share is handed back."""
    _wait_for(coord, lambda counts: counts == (0, 0), "the peers' shares to be handed back")


# ---------------------------------------------------------------- the web port


def _websocket(port: int, origin: str | None, host: str | None = None) -> tuple[socket.socket, bytes]:
    """A raw socket that asked ``/ws`` to upgrade, and the status line plus headers answered."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=PROMPT)
    lines = [f"GET /ws HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
             "Sec-WebSocket-Version: 13"]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    return sock, answer


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_a_websocket_message_larger_than_a_handshake_frame_is_refused_before_it_is_read(coordinator):
    page = coordinator.web_url.rstrip("/")
    sock, answer = _websocket(coordinator.web_port, page)
    with sock:
        assert _status(answer) == 101
        # A binary message declaring 200 MiB, of which only a few bytes follow.
        sock.sendall(struct.pack("!BBQ", 0x82, 0x80 | 127, 200 * 2**20) + os.urandom(4) + b"CRWD")
        assert _closed_by_peer(sock), "the web port waited for a 200 MiB message before any handshake"
    _wait_idle(coordinator)


def _ws_message(payload: bytes) -> bytes:
    """One masked binary WebSocket message (as a client sends it)."""
    mask = os.urandom(4)
    masked = (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), len(payload))).tobytes()
    return struct.pack("!BBQ", 0x82, 0x80 | 127, len(payload)) + mask + masked


def _ws_closed(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes the WebSocket (a close message, or the connection) within ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except socket.timeout:
        pass
    else:
        return True
    while len(data) >= 2:  # the server's messages, unmasked: look for a close (opcode 8)
        if data[0] & 0x0F == 8:
            return True
        size, start = data[1] & 0x7F, 2
        if size >= 126:
            start = 4 if size == 126 else 10
            size = int.from_bytes(data[2:start], "big")
        data = data[start + size:]
    return False


def _big_hello() -> bytes:
    """A valid HELLO of nearly 1 MiB (a long cache list): its sender then holds it until the handshake ends."""
    cached = [f"{n:064x}" for n in range(15_000)]
    return wire.encode(Message(wire.HELLO, {"versions": [1], "name": "w", "memory_budget": 1, "cores": 1,
                                            "platform": "p", "codecs": ["none"], "cached": cached}), codec="none")


def test_websocket_bytes_before_the_handshake_count_against_the_same_limits(coordinator):
    hello = _big_hello()
    assert len(hello) <= wire.HANDSHAKE_MAX_FRAME_BYTES
    count = coordinator.preauth.bytes_per_address // len(hello) + 2
    socks = []
    try:
        for _ in range(count):
            sock, answer = _websocket(coordinator.web_port, coordinator.web_url.rstrip("/"))
            assert _status(answer) == 101
            socks.append(sock)
            sock.sendall(_ws_message(hello))
        time.sleep(0.5)  # each answered CHALLENGE, or was closed
        held = _in_handshake(coordinator)[1]
        refused = [sock for sock in socks if _ws_closed(sock, 0.2)]
    finally:
        for sock in socks:
            sock.close()
    assert refused, f"{count} WebSocket HELLOs of {len(hello)} bytes from one address were all kept"
    assert 0 < held <= coordinator.preauth.bytes_per_address
    _wait_idle(coordinator)


def test_an_http_body_is_refused_before_it_is_read(coordinator):
    with socket.create_connection(("127.0.0.1", coordinator.web_port), timeout=PROMPT) as sock:
        sock.sendall(f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {200 * 2**20}\r\n\r\n".encode()
                     + b"x" * 1000)
        assert _closed_by_peer(sock), "the web port waited for a 200 MiB request body"


@pytest.mark.parametrize("origin, host", [
    (None, None),                                          # no Origin at all: not a page
    ("http://evil.example:{port}", "evil.example:{port}"),  # DNS rebinding: Origin matches the Host it names
    ("http://localhost:{port}", None),                      # the same machine, but not the printed origin
])
def test_a_websocket_from_outside_the_allowed_origins_is_refused(coordinator, origin, host):
    port = coordinator.web_port
    sock, answer = _websocket(port, origin and origin.format(port=port), host and host.format(port=port))
    sock.close()
    assert _status(answer) == 403, answer


def test_the_allowed_origins_open_a_websocket():
    coord = Coordinator(TOKEN, web_port=0, allowed_origins=["http://phone-farm.local:8787", "HTTPS://Pi.Lan"])
    try:
        coord.start()
        for origin in ("http://phone-farm.local:8787", "https://pi.lan"):
            sock, answer = _websocket(coord.web_port, origin)
            sock.close()
            assert _status(answer) == 101, (origin, answer)
        sock, answer = _websocket(coord.web_port, coord.web_url.rstrip("/"))  # not listed: not allowed
        sock.close()
        assert _status(answer) == 403
    finally:
        coord.stop()


def test_crowdgraph_serve_allows_the_printed_origin_and_those_given(tmp_path, tcp_helpers):
    import subprocess
    import sys

    token_file = tmp_path / "token"
    token_file.write_text("origin-test-token")
    serve = subprocess.Popen([sys.executable, "-m", "crowdgraph.cli", "serve", "--listen", "127.0.0.1:0", "--web",
                              "--token-file", str(token_file), "--allow-origin", "https://crowd.example.org:8787"],
                             env=tcp_helpers.child_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = [serve.stdout.readline() for _ in range(5)]
        (join,) = [line.split()[-1] for line in lines if "phones join at:" in line]
        page, port = join.split("#")[0].rstrip("/"), int(join.split(":")[2].split("/")[0])
        for origin, status in ((page, 101), ("https://crowd.example.org:8787", 101),
                               (f"http://localhost:{port}", 403)):
            sock, answer = _websocket(port, origin)
            sock.close()
            assert _status(answer) == status, (origin, answer)
    finally:
        tcp_helpers.stop_process(serve)
