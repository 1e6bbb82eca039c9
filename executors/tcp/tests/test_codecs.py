"""Lossy wire encodings over real sockets: the error a run reports, its bound, and who gets them.

Real ``crowdgraph-worker`` processes on 127.0.0.1; every run has a timeout.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import pytest

import crowdgraph
from crowdgraph import wire
from crowdgraph.driver import max_abs_difference
from crowdgraph.errors import InputError
from crowdgraph_tcp import RemoteExecutor, TcpExecutor
from crowdgraph_tcp.relay import standing_coordinator
from tests import models
from tests.oracle import TOLERANCE, assert_matches, oracle


RUN_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def case():
    model, feeds = models.chain(n_layers=4, width=256, batch=8)
    return model, feeds, crowdgraph.compile(model, partitions=3, input_shapes={"x": (4, 256)}), oracle(model, feeds)


@pytest.fixture(scope="module")
def crowd():
    with TcpExecutor.local(workers=2, memory="64MB", lossy="fp16") as ex:
        yield ex


def test_an_fp16_run_is_within_its_measured_error_of_the_oracle(case, crowd):
    model, feeds, compiled, want = case
    got = compiled.run(feeds, executor=crowd, microbatch=None, max_error=0.05, timeout=RUN_TIMEOUT)
    report = compiled.last_report
    # One micro-batch: the measured error is the whole run's.
    assert 0 < report.wire_error <= 0.05
    assert max_abs_difference(got, want) <= report.wire_error + TOLERANCE
    assert any("fp16 wire" in note and "within" in note for note in report.notes)
    # Boundary tensors went as float16: about half the raw bytes each way (lz4 on top).
    raw = sum(t.bytes_in + t.bytes_out for t in report.tasks)
    sent = sum(t.wire_in + t.wire_out for t in report.tasks)
    assert sent < 0.6 * raw


def test_a_wire_error_above_max_error_falls_back_to_lossless(case, crowd):
    model, feeds, compiled, want = case
    crowd.lossy = "int8"
    try:
        got = compiled.run(feeds, executor=crowd, microbatch=4, max_error=1e-7, timeout=RUN_TIMEOUT)
    finally:
        crowd.lossy = "fp16"
    report = compiled.last_report
    assert_matches(got, want)
    assert report.wire_error == 0.0 and report.microbatches == 2
    assert any("int8 wire" in note and "above the bound" in note for note in report.notes)
    assert sum(t.wire_in for t in report.tasks) > sum(t.bytes_in for t in report.tasks) / 2  # exact this time


def test_a_remote_driver_sends_fp16_through_a_standing_coordinator(case, tmp_path, tcp_helpers):
    model, feeds, compiled, want = case
    token = "lossy relay token"
    (tmp_path / "token").write_text(token)
    coordinator = standing_coordinator(token.encode(), "127.0.0.1:0", heartbeat=1.0)
    workers = [subprocess.Popen([sys.executable, "-m", "crowdgraph_tcp.worker", coordinator.url, "--token-file",
                                 str(tmp_path / "token"), "--memory", "64MB", "--cache-dir", str(tmp_path / f"c{n}"),
                                 "--threads", "1"], env=tcp_helpers.child_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) for n in range(2)]
    try:
        with RemoteExecutor(coordinator.url, token=token, min_workers=2, lossy="fp16") as ex:
            got = compiled.run(feeds, executor=ex, microbatch=None, max_error=0.05, timeout=RUN_TIMEOUT)
    finally:
        coordinator.stop()
        for proc in workers:
            tcp_helpers.stop_process(proc)
    report = compiled.last_report
    assert 0 < report.wire_error <= 0.05
    assert max_abs_difference(got, want) <= report.wire_error + TOLERANCE
    # RUNs went to the coordinator as float16; RESULTs came back from it exact.
    assert sum(t.wire_in for t in report.tasks) < 0.6 * sum(t.bytes_in for t in report.tasks)
    assert sum(t.wire_out for t in report.tasks) > sum(t.bytes_out for t in report.tasks)


def test_a_worker_that_offers_no_lossy_encoding_gets_an_exact_link(crowd):
    """An older peer (or the worker page) lists no ``lossy`` in HELLO: the coordinator never sends it one."""
    conn = wire.Connection(wire.WORKER, token=crowd.token, now=time.monotonic(), lossy=())
    conn.hello({"name": "old", "memory_budget": 2**26, "cores": 1, "platform": "test", "cached": []},
               now=time.monotonic())
    with socket.create_connection((crowd.coordinator.host, crowd.coordinator.port), timeout=10) as sock:
        while conn.state != wire.OPEN:
            sock.sendall(b"".join(bytes(p) for p in conn.data_to_send()))
            conn.receive_data(sock.recv(65536), now=time.monotonic())
        assert conn.lossy == () and "lossy" not in conn.hello_header
        joined = [w for w in list(crowd.coordinator.workers) if w != conn.peer_id]
        assert crowd.coordinator.lossy_for(conn.peer_id, "fp16") is None
        assert [crowd.coordinator.lossy_for(w, "fp16") for w in joined] == ["fp16"] * len(joined)
        conn.goodbye("done", now=time.monotonic())
        sock.sendall(b"".join(bytes(p) for p in conn.data_to_send()))


def test_an_unknown_lossy_option_is_refused_before_anything_starts():
    with pytest.raises(InputError, match=r"lossy='bf16' is not a wire encoding; use None \(exact\), 'fp16' or 'int8'"):
        TcpExecutor(lossy="bf16")


@pytest.mark.slow
def test_the_lossy_wire_example_runs_and_shrinks_the_bytes(tcp_helpers):
    out = tcp_helpers.run_example("tcp_lossy_wire.py", timeout=180)
    found = re.findall(r"wire (\w+): tensor bytes on the wire (\d+); wire error (\S+) \(bound 0.05\); "
                       r"max abs difference to the whole model: (\S+)", out)
    assert [f[0] for f in found] == ["exact", "fp16", "int8"], out
    sent = {name: int(n) for name, n, _, _ in found}
    errors = {name: float(e) for name, _, e, _ in found}
    assert sent["int8"] < sent["fp16"] < 0.6 * sent["exact"]
    assert errors["exact"] == 0.0 and 0 < errors["fp16"] < errors["int8"] <= 0.05
