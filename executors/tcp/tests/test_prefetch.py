"""Weights ahead of need over TCP: STORE puts a partition on a worker's disk, never in its memory."""

from __future__ import annotations

import hashlib
import io
import re
import socket
import time

import numpy as np

import crowdgraph
from crowdgraph import wire, zoo
from crowdgraph.runtime import open_session, run_session
from crowdgraph.wire import Message
from crowdgraph_tcp import TcpExecutor
from crowdgraph_tcp.bridge import Action, PendingStore
from crowdgraph_tcp.coordinator import STORE_CHUNK_BYTES


def test_the_prefetch_example_reads_stored_partitions_from_disk(tcp_helpers):
    out = tcp_helpers.run_example("tcp_prefetch.py", timeout=180)
    found = re.findall(r"prefetch=(\w+): (\d+) partitions stored ahead; (\d+) of (\d+) loads read from disk; "
                       r"tiers (\{.*?\}); partition bytes sent with loads (\d+); "
                       r"max abs difference to the whole model: (\S+)", out)
    assert [f[0] for f in found] == ["False", "True"], out
    (_, stored_off, disk_off, _, _, sent_off, diff_off) = found[0]
    (_, stored_on, disk_on, _, tiers_on, sent_on, diff_on) = found[1]
    assert max(float(diff_off), float(diff_on)) <= 1e-4
    # Without prefetch nothing is stored ahead; a worker that comes back to a partition it held
    # earlier still reads it from its cache, which a busy machine's timing may or may not bring.
    assert int(stored_off) == 0
    assert int(stored_on) > 0 and int(disk_on) > int(disk_off) and "2:" in tiers_on
    assert int(sent_on) < int(sent_off)  # the stored partitions' loads sent no bytes


def test_a_partition_the_worker_does_not_keep_is_sent_with_its_load():
    """A cache too small for any partition: every STORE is answered kept=false,
    and each load still gets the bytes (a missed cache read sends them)."""
    model = zoo.distilbert("tiny")
    batch = zoo.sample_inputs(model, batch=4, sequence=16)
    compiled = crowdgraph.compile(model, partitions=6, sample={k: v[:1] for k, v in batch.items()})
    expected = run_session(open_session(model.SerializeToString()), batch)
    with TcpExecutor.local(workers=2, memory="64MB", cache_size="1KB", prefetch=True) as executor:
        outputs = compiled.run(batch, executor=executor, microbatch=1, timeout=60)
        logs = "".join(path.read_text() for path in executor.logs.values() if path.exists())
    report = compiled.last_report
    np.testing.assert_allclose(outputs["logits"], expected["logits"], atol=1e-4)
    assert report.stored and not any(load.from_cache for load in report.loads)
    assert "did not keep partition" in logs and "more than this worker can keep" in logs


class RawWorker:
    """A worker that is only a :class:`wire.Connection` on a socket: the test reads and answers each frame."""

    def __init__(self, executor: TcpExecutor):
        self.conn = wire.Connection(wire.WORKER, token=executor.token, now=time.monotonic())
        self.conn.hello({"name": "raw", "memory_budget": 2**26, "cores": 1, "platform": "test", "cached": [],
                         "stores": True}, now=time.monotonic())
        self.sock = socket.create_connection((executor.coordinator.host, executor.coordinator.port), timeout=10)
        self.inbox: list[wire.Message] = []
        while self.conn.state != wire.OPEN:  # (the WELCOME is not kept)
            self._flush()
            self.conn.receive_data(self.sock.recv(1 << 20), now=time.monotonic())

    def _flush(self) -> None:
        self.sock.sendall(b"".join(bytes(p) for p in self.conn.data_to_send()))

    def next(self) -> wire.Message:
        while not any(m.type not in (wire.PING, wire.PONG) for m in self.inbox):
            self.inbox += self.conn.receive_data(self.sock.recv(1 << 20), now=time.monotonic())
            self._flush()
        while self.inbox[0].type in (wire.PING, wire.PONG):
            self.inbox.pop(0)
        return self.inbox.pop(0)

    def quiet(self, seconds: float = 0.3) -> bool:
        """Whether nothing but heartbeats arrives for ``seconds``."""
        self.sock.settimeout(seconds)
        try:
            self.inbox += self.conn.receive_data(self.sock.recv(1 << 20), now=time.monotonic())
        except socket.timeout:
            pass
        finally:
            self.sock.settimeout(10)
        return not any(m.type not in (wire.PING, wire.PONG) for m in self.inbox)

    def answer(self, message: wire.Message) -> None:
        self.conn.send(message, now=time.monotonic())
        self._flush()


def test_store_chunks_let_runs_pass_and_a_load_from_cache_waits_for_the_last():
    """The coordinator sends a STORE one chunk per answer, so a RUN submitted meanwhile goes
    before the next chunk; a LOAD of that partition from the worker's cache (and what follows
    it) waits until the worker says it kept the whole partition."""
    data = bytes(range(256)) * (STORE_CHUNK_BYTES // 128 + 1)  # three chunks, the last one short
    sha = hashlib.sha256(data).hexdigest()
    with TcpExecutor(min_workers=1, join_timeout=10) as executor:
        worker = RawWorker(executor)
        wid = worker.conn.peer_id
        submit = lambda action: executor.coordinator.run_sync(lambda: executor.coordinator.submit(wid, action))
        submit(Action(wire.STORE, "p7", purpose=PendingStore(data), sha256=sha))
        first = worker.next()
        assert (first.type, first.header["offset"], first.header["size"]) == (wire.STORE, 0, len(data))
        assert worker.quiet(), "a second chunk went before the first was answered"
        run = Message(wire.RUN, {"task": ["p3", 0], "outputs": ["y"]}, tensors={"x": np.ones(2, np.float32)})
        submit(Action(wire.RUN, "p3", message=run, key=("p3", 0)))
        assert worker.next().type == wire.RUN  # not behind the rest of the partition
        assert executor.coordinator.has_cached(wid, sha)  # a LOAD now asks for the cache ...
        load = Message(wire.LOAD, {"partition": "p7", "sha256": sha, "from_cache": True})
        submit(Action(wire.LOAD, "p7", message=load, sha256=sha, from_cache=True))
        submit(Action(wire.UNLOAD, "p7", message=Message(wire.UNLOAD, {"partition": "p7"})))
        chunks = [first]
        while True:  # ... and waits, with the UNLOAD behind it, while the chunks come
            received = sum(len(c.blobs["model"]) for c in chunks)
            done = received == len(data)
            worker.answer(Message(wire.STORED, {"partition": "p7", "sha256": sha, "received": received,
                                                **({"kept": True} if done else {})}))
            if done:
                break
            chunks.append(worker.next())
            assert chunks[-1].type == wire.STORE and chunks[-1].header["offset"] == received
        assert len(chunks) == 3 and b"".join(c.blobs["model"] for c in chunks) == data
        after = worker.next()
        assert (after.type, after.header["from_cache"]) == (wire.LOAD, True)
        assert worker.quiet(), "the UNLOAD went before the LOAD from the cache was answered"
        worker.answer(Message(wire.LOADED, {"partition": "p7", "sha256": sha, "seconds": 0.1, "rss": 1}))
        assert worker.next().type == wire.UNLOAD


def test_a_worker_with_a_link_speed_reads_no_faster():
    """``--link-speed`` stands in for a slow link: a partition's bytes take at least size / speed to arrive."""
    model = zoo.distilbert("tiny")
    batch = zoo.sample_inputs(model, batch=1, sequence=8)
    compiled = crowdgraph.compile(model, partitions=1, sample=batch)
    size = len(compiled.partitions[0].model_bytes)
    speed = size  # one second for the partition
    with TcpExecutor.local(workers=1, memory="64MB", worker_args=["--link-speed", str(speed)]) as executor:
        start = time.perf_counter()
        compiled.run(batch, executor=executor, timeout=60)
        seconds = time.perf_counter() - start
    (load,) = compiled.last_report.loads
    assert load.bytes_sent >= size and seconds >= 0.9 * load.bytes_sent / speed


def test_wrapped_executors_pass_stores_on():
    """A live view and a private run wrap the TCP executor: its workers still get partitions ahead of need."""
    from crowdgraph.report import LiveView

    model = zoo.distilbert("tiny")
    batch = zoo.sample_inputs(model, batch=4, sequence=16)
    compiled = crowdgraph.compile(model, partitions=6, sample={k: v[:1] for k, v in batch.items()})
    expected = run_session(open_session(model.SerializeToString()), batch)
    for wrap, options in ((lambda ex: LiveView(ex, total_tasks=24, stream=io.StringIO()), {}),
                          (lambda ex: ex, {"private": True})):
        with TcpExecutor.local(workers=2, memory="64MB", prefetch=True) as executor:
            outputs = compiled.run(batch, executor=wrap(executor), microbatch=1, timeout=60, **options)
        report = compiled.last_report
        np.testing.assert_allclose(outputs["logits"], expected["logits"], atol=1e-4)
        stored = {(w, p) for w, p in report.stored}
        assert stored and any(load.from_cache and (load.worker, load.partition) in stored for load in report.loads)
