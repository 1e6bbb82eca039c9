"""TcpExecutor end to end: real worker processes, real sockets on 127.0.0.1.

Every test stops by itself: runs have a driver timeout, sockets have
timeouts, and worker processes are stopped in ``finally`` blocks.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import crowdgraph
from crowdgraph import wire, zoo
from crowdgraph.testing import watch_notices
from crowdgraph.wire import Message
from crowdgraph_tcp import TcpExecutor
from tests import models, plans
from tests.oracle import assert_matches, oracle
from tests.test_wire import string_bomb

RUN_TIMEOUT = 60.0
MIXED = ["16MB", "24MB", "32MB", "48MB", "64MB"]


def tiny_case(batch: int = 6, sequence: int = 16):
    model = zoo.distilbert("tiny")
    feeds = zoo.sample_inputs(model, batch=batch, sequence=sequence)
    shapes = {name: (1, sequence) for name in feeds}
    return model, feeds, crowdgraph.compile(model, partitions=3, input_shapes=shapes)


@functools.cache
def heavy_chain():
    """12 micro-batches of 128 rows through 6 dense 2048-wide layers in 3 partitions (~10 ms a task):
    the holder of the first partition has most of its tasks still queued at its first result.

    Built once for the tests that share it, with its oracle outputs (read-only, like the feeds)."""
    model, feeds = models.chain(n_layers=6, width=2048, batch=12 * 128)
    feeds["x"].flags.writeable = False
    compiled = crowdgraph.compile(model, partitions=3, input_shapes={"x": (128, 2048)})
    return feeds, compiled, plans.expected(model, feeds)


@pytest.fixture(scope="module")
def mixed_crowd():
    """Five workers with budgets from 16 MB to 64 MB, shared by the oracle tests."""
    with TcpExecutor.local(memory=MIXED) as ex:
        yield ex


def _spy(executor, on_notice):
    """Call ``on_notice(notice)`` (on the coordinator thread) for every notice of later runs."""
    watch_notices(executor, on_notice)


# ------------------------------------------------------------------ oracle equality


CASES = {
    "distilbert-tiny": lambda: tiny_case()[:2] + ("3MB",),  # fits the 16 MB worker
    "chain": lambda: models.chain() + (3,),
    "diamond": lambda: models.diamond() + (2,),
    "skip": lambda: models.skip() + (3,),
    "squeezenet": lambda: models.light_cnn("squeezenet") + (4,),
}


@pytest.mark.parametrize("mode", ["streaming", "barrier"])
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_match_the_oracle_on_a_mixed_crowd(mixed_crowd, case, mode):
    model, feeds, cut = CASES[case]()
    if isinstance(cut, int):
        compiled = crowdgraph.compile(model, partitions=cut, sample=feeds)
    else:
        compiled = crowdgraph.compile(model, cut, input_shapes={k: (1,) + v.shape[1:] for k, v in feeds.items()})
    assert len(compiled.partitions) >= 2
    batch = next(iter(feeds.values())).shape[0]
    got = compiled.run(feeds, executor=mixed_crowd, microbatch=max(1, batch // 3), mode=mode, timeout=RUN_TIMEOUT)
    report = compiled.last_report
    assert_matches(got, oracle(model, feeds))
    assert report.executor == "tcp"
    budgets = {w: r.memory for w, r in report.workers.items()}
    for task in report.tasks:  # the scheduler kept every partition on a worker it fits
        part = next(p for p in compiled.partitions if p.name == task.partition)
        assert part.resident_bytes <= budgets[task.worker]
        assert task.wire_in > 0 and task.wire_out > 0 and task.end >= task.start
    busy = [r for r in report.workers.values() if r.tasks]
    assert busy and all(r.peak_rss for r in busy), "every worker that ran a task reports its peak RSS"


def test_the_report_shows_per_worker_peak_rss_and_the_idle_floor(mixed_crowd):
    model, feeds, compiled = tiny_case()
    got = compiled.run(feeds, executor=mixed_crowd, microbatch=2, timeout=RUN_TIMEOUT)
    report = compiled.last_report
    assert_matches(got, oracle(model, feeds))
    floors = mixed_crowd.coordinator.run_sync(lambda: {w.id: w.floor_rss for w in mixed_crowd.coordinator.workers.values()})
    for worker, record in report.workers.items():
        if record.tasks:
            assert record.peak_rss is not None and record.rss is not None
            assert floors[worker] and record.peak_rss > floors[worker] > 10 * 2**20
            assert record.floor == floors[worker] and record.above_floor == record.peak_rss - record.floor
    table = str(report).splitlines()
    assert "above floor" in table[0]
    for worker, record in report.workers.items():
        if record.tasks:
            row = next(line for line in table if line.startswith(worker + " "))
            assert crowdgraph.format_bytes(record.floor) in row and crowdgraph.format_bytes(record.above_floor) in row


def test_second_run_on_the_same_crowd_sends_no_partition_bytes():
    model, feeds, compiled = tiny_case()
    # The pipeline policy keeps one holder per partition, so the second run
    # needs exactly what the first left resident (the cost rule may add a
    # replica when measured durations say it pays).
    with TcpExecutor.local(workers=3, memory="64MB") as ex:
        got = compiled.run(feeds, executor=ex, microbatch=2, timeout=RUN_TIMEOUT, policy="pipeline")
        first = compiled.last_report
        assert_matches(got, oracle(model, feeds))
        assert first.weight_bytes_sent > 0
        got = compiled.run(feeds, executor=ex, microbatch=2, timeout=RUN_TIMEOUT, policy="pipeline")
        second = compiled.last_report
    assert_matches(got, oracle(model, feeds))
    assert second.weight_bytes_sent == 0
    assert set(second.tier_counts) <= {1, 2}, second.tier_counts


def test_a_new_crowd_on_the_same_cache_loads_from_disk(tmp_path):
    # One worker, so that it caches every partition (a crowd would spread
    # replicas over several caches).
    model, feeds, compiled = tiny_case()
    with TcpExecutor.local(workers=1, memory="64MB", cache_dir=tmp_path) as ex:
        compiled.run(feeds, executor=ex, microbatch=1, timeout=RUN_TIMEOUT)
    cached = sorted(p.name for p in tmp_path.glob("*/*.onnx"))
    assert len(cached) == len(compiled.partitions)
    assert {p.sha256 + ".onnx" for p in compiled.partitions} == set(cached)
    with TcpExecutor.local(workers=1, memory="64MB", cache_dir=tmp_path) as ex:
        got = compiled.run(feeds, executor=ex, microbatch=1, timeout=RUN_TIMEOUT)
        report = compiled.last_report
    assert_matches(got, oracle(model, feeds))
    assert report.weight_bytes_sent == 0
    assert report.loads and all(load.from_cache for load in report.loads)
    assert report.tier_counts.get(2, 0) >= 1 and 3 not in report.tier_counts


def test_a_corrupt_cache_entry_is_caught_and_the_bytes_are_sent(tmp_path):
    model, feeds, compiled = tiny_case()
    with TcpExecutor.local(workers=1, memory="64MB", cache_dir=tmp_path) as ex:
        compiled.run(feeds, executor=ex, microbatch=1, timeout=RUN_TIMEOUT)
    files = sorted(tmp_path.glob("*/*.onnx"))
    assert len(files) == len(compiled.partitions)
    data = bytearray(files[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte of a weight: the sha256 check must catch it
    files[0].write_bytes(bytes(data))
    os.remove(files[1])  # and one simply gone: announced as cached by nobody
    with TcpExecutor.local(workers=1, memory="64MB", cache_dir=tmp_path) as ex:
        got = compiled.run(feeds, executor=ex, microbatch=1, timeout=RUN_TIMEOUT)
        report = compiled.last_report
    assert_matches(got, oracle(model, feeds))
    sent = [load for load in report.loads if load.bytes_sent]
    assert len(sent) == 2 and not any(load.from_cache for load in sent)
    assert any(load.from_cache for load in report.loads)


# ------------------------------------------------------------------ losing workers


def test_sigkill_one_then_two_of_five_workers_mid_run():
    feeds, compiled, want = heavy_chain()
    first = compiled.partitions[0].name
    killed: list[str] = []
    with TcpExecutor.local(workers=5, memory="64MB") as ex:
        def on_notice(notice):
            # Kill the holder of the first partition at its first result: the rest of the
            # first partition's tasks are queued on it, so they must be placed again.
            if (notice.kind == "finished" and notice.key[0] == first and notice.worker not in killed
                    and len(killed) < 2):
                ex.processes[notice.worker].send_signal(signal.SIGKILL)
                killed.append(notice.worker)

        _spy(ex, on_notice)
        got = compiled.run(feeds, executor=ex, microbatch=128, timeout=RUN_TIMEOUT)
        report = compiled.last_report
        assert_matches(got, want)
        assert len(killed) == 2, killed
        for worker in killed:
            assert report.workers[worker].lost, report.workers[worker]
            assert ex.processes[worker].wait(10) == -signal.SIGKILL
        assert report.replaced, "the killed workers' queued tasks were placed again"
        assert len(ex.coordinator.workers) == 3
        # The survivors still run the model.
        got = compiled.run(feeds, executor=ex, microbatch=128, timeout=RUN_TIMEOUT)
        assert_matches(got, want)


def test_a_stopped_worker_is_lost_by_heartbeat_and_its_tasks_placed_again():
    feeds, compiled, want = heavy_chain()
    first = compiled.partitions[0].name
    stopped: list[str] = []
    with TcpExecutor.local(workers=4, memory="64MB", heartbeat=0.5) as ex:
        def on_notice(notice):
            if notice.kind == "finished" and notice.key[0] == first and not stopped:
                os.kill(ex.processes[notice.worker].pid, signal.SIGSTOP)  # silent, socket open
                stopped.append(notice.worker)

        _spy(ex, on_notice)
        try:
            start = time.monotonic()
            got = compiled.run(feeds, executor=ex, microbatch=128, timeout=RUN_TIMEOUT)
            report = compiled.last_report
            took = time.monotonic() - start
        finally:
            for proc in ex.processes.values():
                os.kill(proc.pid, signal.SIGCONT)
        assert_matches(got, want)
        record = report.workers[stopped[0]]
        assert record.lost and "no frame" in record.lost, record.lost
        assert report.replaced
        assert took >= 1.0, "it took the heartbeat (3 x 0.5 s) to notice"
        # Continued, it finds its connection closed and exits.
        assert ex.processes[stopped[0]].wait(15) == 1


def test_a_worker_joining_mid_run_takes_tasks(tmp_path, tcp_helpers):
    feeds, compiled, want = heavy_chain()
    joiner: list[subprocess.Popen] = []
    with TcpExecutor.local(workers=1, memory="64MB") as ex:
        (only,) = ex.processes.values()
        token_file = tmp_path / "token"
        token_file.write_bytes(ex.token)

        def let_it_go() -> None:  # once the newcomer is in, the first worker may go on
            try:
                tcp_helpers.wait_until(lambda: len(ex.coordinator.workers) == 2, 30, "the second worker")
            finally:
                os.kill(only.pid, signal.SIGCONT)

        def on_notice(notice):
            # Hold the only worker (it keeps the first partition's queue), start a second one.
            if notice.kind == "finished" and not joiner:
                os.kill(only.pid, signal.SIGSTOP)
                joiner.append(subprocess.Popen(
                    [sys.executable, "-m", "crowdgraph_tcp.worker", ex.url, "--token-file", str(token_file),
                     "--memory", "64MB", "--cache-dir", str(tmp_path / "cache"), "--name", "late",
                     "--threads", "1"], env=tcp_helpers.child_env(), stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL))
                threading.Thread(target=let_it_go, daemon=True).start()

        _spy(ex, on_notice)
        try:
            got = compiled.run(feeds, executor=ex, microbatch=128, timeout=RUN_TIMEOUT)
            report = compiled.last_report
        finally:
            os.kill(only.pid, signal.SIGCONT)
            for proc in joiner:
                tcp_helpers.stop_process(proc)
    assert_matches(got, want)
    late = [w for w in report.workers if w not in ex.processes]
    assert len(late) == 1 and report.workers[late[0]].tasks > 0, report


def test_a_worker_that_reconnects_joins_as_a_new_worker_with_its_cache(tmp_path, tcp_helpers):
    model, feeds, compiled = tiny_case()
    token_file = tmp_path / "token"
    token_file.write_text("reconnect-test-token")
    with TcpExecutor(token="reconnect-test-token", min_workers=1, join_timeout=30) as ex:
        proc = subprocess.Popen(
            [sys.executable, "-m", "crowdgraph_tcp.worker", ex.url, "--token-file", str(token_file),
             "--memory", "64MB", "--cache-dir", str(tmp_path / "cache"), "--name", "phone", "--threads", "1",
             "--reconnect"], env=tcp_helpers.child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            got = compiled.run(feeds, executor=ex, microbatch=1, timeout=RUN_TIMEOUT)
            assert_matches(got, oracle(model, feeds))
            (old,) = list(ex.coordinator.workers)
            ex.coordinator.call(lambda: ex.coordinator.workers[old].link.stream.close())  # the link drops
            tcp_helpers.wait_until(lambda: set(ex.coordinator.workers) - {old}, 30, "the worker to come back")
            (new,) = list(ex.coordinator.workers)
            assert new != old
            cached = ex.coordinator.run_sync(lambda: set(ex.coordinator.workers[new].cached))
            assert cached == {p.sha256 for p in compiled.partitions}
            got = compiled.run(feeds, executor=ex, microbatch=1, timeout=RUN_TIMEOUT)
            report = compiled.last_report
            assert_matches(got, oracle(model, feeds))
            assert report.weight_bytes_sent == 0 and set(report.workers) == {new}
        finally:
            tcp_helpers.stop_process(proc)
        out = proc.stdout.read().decode()
        assert "retrying" in out and out.count("joined") == 2, out


# ------------------------------------------------------------------ refusals


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _until_closed(sock: socket.socket) -> list[Message]:
    """Everything the coordinator says until it closes the connection (fails after 10 s)."""
    data = b""
    with sock:
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    return wire.FrameDecoder().feed(data) if data else []


def _hello(**changes) -> Message:
    header = {"versions": [1], "name": "intruder", "memory_budget": 64 * 2**20, "cores": 1,
              "platform": "test", "codecs": ["none"], "cached": []}
    header.update(changes)
    return Message(wire.HELLO, header)


def _authenticate(port: int, token: bytes) -> tuple[socket.socket, wire.FrameDecoder]:
    sock = _connect(port)
    decoder = wire.FrameDecoder()
    sock.sendall(wire.encode(_hello()))

    def receive() -> Message:
        while True:
            got = decoder.feed(sock.recv(65536))
            if got:
                return got[0]

    challenge = receive()
    nonce = wire.make_nonce()
    sock.sendall(wire.encode(Message(wire.AUTH, {
        "signature": wire.sign(token, bytes.fromhex(challenge.header["nonce"]), role="worker"),
        "nonce": nonce.hex()})))
    welcome = receive()
    assert welcome.type == wire.WELCOME
    assert wire.verify(token, nonce, welcome.header["signature"], role="coordinator")
    return sock, decoder


def test_bad_peers_are_closed_while_good_workers_carry_on(tmp_path, caplog, tcp_helpers):
    caplog.set_level(logging.INFO, logger="crowdgraph.tcp")
    model, feeds, compiled = tiny_case(batch=32, sequence=32)
    want = oracle(model, feeds)
    with TcpExecutor.local(workers=3, memory="64MB", handshake_timeout=2.0) as ex:
        port = ex.coordinator.port
        run = tcp_helpers.BackgroundRun(compiled, feeds, ex, microbatch=1, timeout=RUN_TIMEOUT)
        wrong_token = subprocess.Popen(
            [sys.executable, "-m", "crowdgraph_tcp.worker", ex.url, "--token", "not-the-token",
             "--memory", "64MB", "--cache-dir", str(tmp_path / "intruder")],
            env=tcp_helpers.child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            # No common version: REFUSE with a reason that names both sides, then close.
            sock = _connect(port)
            sock.sendall(wire.encode(_hello(versions=[99])))
            (refuse,) = _until_closed(sock)
            assert refuse.type == wire.REFUSE and "no common protocol version" in refuse.header["reason"]
            # No common codec.
            sock = _connect(port)
            sock.sendall(wire.encode(_hello(codecs=["zstd"])))
            (refuse,) = _until_closed(sock)
            assert "no common codec" in refuse.header["reason"]
            # A frame of a protocol version nobody speaks.
            sock = _connect(port)
            frame = bytearray(wire.encode(_hello()))
            frame[4] = 2
            sock.sendall(frame)
            (refuse,) = _until_closed(sock)
            assert "protocol version 2" in refuse.header["reason"]
            # Garbage.
            sock = _connect(port)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(200))
            (refuse,) = _until_closed(sock)
            assert "HTTP request" in refuse.header["reason"]
            # A header announcing a 10 GB frame: refused from the header alone.
            sock = _connect(port)
            sock.sendall(struct.pack("<4sBBHQII", b"CRWD", 1, wire.MESSAGE_TYPES[wire.HELLO], 0,
                                     10 * 10**9, 2, 0))
            (refuse,) = _until_closed(sock)
            assert "limit" in refuse.header["reason"]
            # Out of order: AUTH before HELLO.
            sock = _connect(port)
            sock.sendall(wire.encode(Message(wire.AUTH, {"signature": "0" * 64, "nonce": "1" * 64})))
            (refuse,) = _until_closed(sock)
            assert "must be HELLO" in refuse.header["reason"]
            # Truncated: half a HELLO, then the peer hangs up.
            sock = _connect(port)
            hello = wire.encode(_hello())
            sock.sendall(hello[:len(hello) // 2])
            sock.shutdown(socket.SHUT_WR)
            assert _until_closed(sock) == []
            # Half a HELLO and then silence: closed at the handshake timeout.
            sock = _connect(port)
            sock.sendall(hello[:30])
            start = time.monotonic()
            assert _until_closed(sock) == []
            assert 1.5 < time.monotonic() - start < 8
            # Authenticated, then garbage: that connection (only) is closed with BYE.
            sock, _ = _authenticate(port, ex.token)
            sock.sendall(b"\x00" * 64)
            said = _until_closed(sock)
            assert said and said[-1].type == wire.BYE and "protocol error" in said[-1].header["reason"]
            # The wrong token: the worker is refused, says why, and exits non-zero.
            _, err = wrong_token.communicate(timeout=30)
            assert wrong_token.returncode == 2
            assert b"refused" in err and b"authentication failed" in err, err
        finally:
            tcp_helpers.stop_process(wrong_token)
            outputs = run.result(RUN_TIMEOUT + 10)
        assert_matches(outputs, want)
        assert sorted(ex.processes) == sorted(ex.coordinator.workers), "the good workers are all still there"
        got = compiled.run(feeds, executor=ex, microbatch=8, timeout=RUN_TIMEOUT)
        assert_matches(got, want)
    text = caplog.text
    for reason in ("no common protocol version", "no common codec", "protocol version 2", "HTTP request",
                   "limit", "must be HELLO", "closed the connection during the handshake",
                   "did not complete within", "authentication failed", "protocol error"):
        assert reason in text, reason


def test_a_coordinator_that_cannot_prove_the_token_is_left_at_once(tmp_path, tcp_helpers):
    """A fake coordinator that does not know the token: the worker loads nothing and exits."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "crowdgraph_tcp.worker", f"tcp://127.0.0.1:{port}",
                             "--token", "the-real-token", "--cache-dir", str(tmp_path)],
                            env=tcp_helpers.child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        server.settimeout(30)
        conn, _ = server.accept()
        conn.settimeout(10)
        decoder = wire.FrameDecoder()
        msgs: list[Message] = []
        while not msgs:
            msgs = decoder.feed(conn.recv(65536))
        assert msgs[0].type == wire.HELLO and msgs[0].header["rss"] > 0
        conn.sendall(wire.encode(Message(wire.CHALLENGE, {"nonce": wire.make_nonce().hex(), "version": 1,
                                                          "codec": "none"})))
        msgs = []
        while not msgs:
            msgs = decoder.feed(conn.recv(65536))
        assert msgs[0].type == wire.AUTH
        conn.sendall(wire.encode(Message(wire.WELCOME, {"worker_id": "w1", "heartbeat": 5.0,
                                                        "signature": wire.sign(b"a guess", wire.make_nonce(),
                                                                               role="coordinator")})))
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 2 and b"did not prove" in err, err
        conn.close()
    finally:
        tcp_helpers.stop_process(proc)
        server.close()


# ------------------------------------------------------------------ TLS


def test_tls_crowd_matches_the_oracle(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    model, feeds, compiled = tiny_case()
    with TcpExecutor.local(workers=2, memory="64MB", certfile=cert, keyfile=key,
                           worker_args=["--cafile", str(cert)]) as ex:
        assert ex.url.startswith("tls://")
        got = compiled.run(feeds, executor=ex, microbatch=2, timeout=RUN_TIMEOUT)
        assert_matches(got, oracle(model, feeds))
        # A plain-TCP peer on the TLS port gets nowhere.
        sock = _connect(ex.coordinator.port)
        sock.sendall(wire.encode(_hello()))
        data = b""
        with sock:
            try:
                while chunk := sock.recv(65536):
                    data += chunk
            except ConnectionResetError:
                pass
        assert not data.startswith(wire.MAGIC)


# ------------------------------------------------------------------ close, entry points


def test_close_stops_workers_and_threads_even_when_one_is_stopped():
    before = {t for t in threading.enumerate()}
    ex = TcpExecutor.local(workers=2, memory="64MB")
    victim = next(iter(ex.processes.values()))
    os.kill(victim.pid, signal.SIGSTOP)
    start = time.monotonic()
    ex.close()
    assert time.monotonic() - start < 15
    assert all(p.poll() is not None for p in ex.processes.values())
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not left, [t.name for t in left]
    ex.close()  # twice is fine


def test_entry_points_are_registered():
    from crowdgraph.cli import build_parser
    from crowdgraph.executor import installed_executors

    assert installed_executors()["tcp"].load() is TcpExecutor
    assert "serve" in build_parser()._subparsers._group_actions[0].choices


def test_a_string_bomb_closes_that_worker_and_the_coordinator_runs_on():
    model, feeds, compiled = tiny_case(batch=2)
    with TcpExecutor.local(workers=1, memory="64MB") as ex:
        sock, _ = _authenticate(ex.coordinator.port, ex.token)
        sock.sendall(string_bomb())
        (bye,) = _until_closed(sock)
        assert bye.type == wire.BYE and "above the wire's limit of 1048576" in bye.header["reason"]
        assert_matches(compiled.run(feeds, executor=ex, microbatch=1, timeout=RUN_TIMEOUT), oracle(model, feeds))
