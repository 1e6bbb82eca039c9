"""``crowdgraph serve`` and ``executor="tcp://..."``: a standing coordinator, drivers relayed through it."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import pytest

import crowdgraph
from crowdgraph import zoo
from crowdgraph.errors import ExecutionError, InputError
from crowdgraph.testing import watch_notices
from crowdgraph_tcp import RemoteExecutor, TcpExecutor
from crowdgraph_tcp.relay import standing_coordinator
from tests.oracle import assert_matches, oracle

RUN_TIMEOUT = 60.0
TOKEN = "serve-test-token-0123456789"


def tiny_case(batch: int = 6, sequence: int = 16):
    model = zoo.distilbert("tiny")
    feeds = zoo.sample_inputs(model, batch=batch, sequence=sequence)
    compiled = crowdgraph.compile(model, partitions=3, input_shapes={k: (1, sequence) for k in feeds})
    return model, feeds, compiled


def start_workers(url, tmp_path, count, helpers, memory="64MB"):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    procs = []
    for n in range(count):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "crowdgraph_tcp.worker", url, "--token-file", str(token_file),
             "--memory", memory, "--cache-dir", str(tmp_path / f"cache-{n}"), "--name", f"pi-{n}",
             "--threads", "1"],
            env=helpers.child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    return procs


def test_crowdgraph_serve_with_workers_and_a_driver_by_url(tmp_path, monkeypatch, tcp_helpers):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    serve = subprocess.Popen([sys.executable, "-m", "crowdgraph.cli", "serve", "--listen", "127.0.0.1:0",
                              "--token-file", str(token_file), "--heartbeat", "1"],
                             env=tcp_helpers.child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    workers = []
    try:
        line = serve.stdout.readline()
        assert "listening on tcp://127.0.0.1:" in line, line + serve.stderr.read()
        url = line.split()[-1]
        workers = start_workers(url, tmp_path, 3, tcp_helpers)
        model, feeds, compiled = tiny_case()
        want = oracle(model, feeds)
        monkeypatch.setenv("CROWDGRAPH_TOKEN", TOKEN)
        with TcpExecutor.from_url(url, min_workers=3, join_timeout=60) as ex:
            assert isinstance(ex, RemoteExecutor)
            got = compiled.run(feeds, executor=ex, microbatch=1, timeout=RUN_TIMEOUT, policy="pipeline")
            first = compiled.last_report
            assert_matches(got, want)
            assert first.weight_bytes_sent > 0 and len(first.workers) == 3
            assert all(r.peak_rss for r in first.workers.values() if r.tasks)
            assert all(r.floor and r.above_floor is not None for r in first.workers.values() if r.tasks)
        # Through the entry-point name: resolve_executor("tcp://...") -> TcpExecutor.from_url.
        # One holder per partition (pipeline policy): the rerun reuses what is held or cached.
        got = compiled.run(feeds, executor=url, microbatch=1, timeout=RUN_TIMEOUT, policy="pipeline")
        second = compiled.last_report
        assert_matches(got, want)
        assert second.executor == "tcp" and second.weight_bytes_sent == 0
        assert set(second.tier_counts) <= {1, 2}, second.tier_counts
        got = compiled.run(feeds, executor=url, microbatch=2, mode="barrier", timeout=RUN_TIMEOUT)
        assert_matches(got, want)
        # A driver with the wrong token is refused with the reason.
        with pytest.raises(ExecutionError, match="authentication failed"):
            TcpExecutor.from_url(url, token="wrong")
        monkeypatch.delenv("CROWDGRAPH_TOKEN")
        with pytest.raises(InputError, match="CROWDGRAPH_TOKEN"):
            TcpExecutor.from_url(url)
        # SIGTERM: the standing coordinator says BYE to everyone and exits 0; so do the workers.
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(20) == 0
        for proc in workers:
            assert proc.wait(20) == 0
            assert b"said goodbye" in proc.stderr.read()
    finally:
        for proc in workers + [serve]:
            tcp_helpers.stop_process(proc)


def test_relayed_run_survives_a_killed_worker_and_a_cache_miss(tmp_path, tcp_helpers, caplog):
    caplog.set_level(logging.INFO, logger="crowdgraph.tcp")
    coordinator = standing_coordinator(TOKEN.encode(), "127.0.0.1:0", heartbeat=1.0)
    workers = []
    try:
        workers = start_workers(coordinator.url, tmp_path, 4, tcp_helpers)
        model, feeds, compiled = tiny_case(batch=24, sequence=32)
        want = oracle(model, feeds)
        first = compiled.partitions[0].name
        with RemoteExecutor(coordinator.url, token=TOKEN, min_workers=4) as ex:
            original = ex.start
            killed = []

            def kill_first_holder(notice):
                if notice.kind == "finished" and notice.key[0] == first and not killed:
                    by_name = {rec["id"]: rec["name"] for rec in ex.crowd.values()}
                    workers[int(by_name[notice.worker].split("-")[1])].kill()
                    killed.append(notice.worker)

            watch_notices(ex, kill_first_holder)
            got = compiled.run(feeds, executor=ex, microbatch=1, timeout=RUN_TIMEOUT)
            report = compiled.last_report
            assert_matches(got, want)
            assert killed and report.workers[killed[0]].lost
            assert report.replaced
            ex.start = original
            ex.min_workers = 1
            # Empty every cache behind the coordinator's back: the loads from cache miss, the
            # bytes are sent, and the coordinator holds each worker's later actions meanwhile.
            for path in tmp_path.glob("cache-*/*.onnx"):
                path.unlink()
            ex.reset()  # unload: the next run must load again
            got = compiled.run(feeds, executor=ex, microbatch=1, timeout=RUN_TIMEOUT)
            report = compiled.last_report
            assert_matches(got, want)
            assert report.loads and all(not load.from_cache and load.bytes_sent > 0 for load in report.loads)
            assert "no longer caches" in caplog.text
    finally:
        coordinator.stop()
        for proc in workers:
            tcp_helpers.stop_process(proc)


def test_an_in_process_tcp_executor_takes_no_drivers():
    with TcpExecutor(token=TOKEN) as ex:
        with pytest.raises(ExecutionError, match="takes no drivers"):
            RemoteExecutor(ex.url, token=TOKEN)
        assert not ex.coordinator.workers and not ex.coordinator.drivers


def test_a_driver_with_nothing_listening_gets_a_clear_error():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    start = time.monotonic()
    with pytest.raises(ExecutionError, match="cannot connect"):
        RemoteExecutor(f"tcp://127.0.0.1:{port}", token=TOKEN)
    assert time.monotonic() - start < 30


def test_a_driver_of_a_standing_coordinator_keeps_caches_on_its_workers(tmp_path, tcp_helpers):
    """RUN state and forget travel through the relay: the workers keep every sequence's cache, and
    a second generation drops the first one's (forget) and gives the same tokens."""
    coordinator = standing_coordinator(TOKEN.encode(), "127.0.0.1:0")
    workers = []
    try:
        workers = start_workers(coordinator.url, tmp_path, 3, tcp_helpers)
        compiled = crowdgraph.compile(zoo.gpt2("tiny"), partitions=3, max_length=16)
        prompts = [[5, 6, 7], [8], [9, 10]]
        with RemoteExecutor(coordinator.url, token=TOKEN, min_workers=3) as ex:
            first = compiled.generate(prompts, max_new_tokens=5, executor=ex, timeout=RUN_TIMEOUT)
            kept = compiled.last_report.kept
            again = compiled.generate(prompts, max_new_tokens=5, executor=ex, timeout=RUN_TIMEOUT)
        sent = compiled.generate(prompts, max_new_tokens=5, keep_caches=False)
    finally:
        coordinator.stop()
        for proc in workers:
            tcp_helpers.stop_process(proc)
    assert sorted(n for n in kept.values() if n) == [3, 3], kept  # two partitions read a cache
    assert first.tolist() == again.tolist() == sent.tolist()
