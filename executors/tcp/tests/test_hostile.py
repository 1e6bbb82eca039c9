"""What a hostile peer holding the token can try, and what stops it.

A coordinator may send a worker any partition; a worker may answer with
anything.  Each test plays the hostile side with crafted messages and checks
the other side refuses it with a clear answer and keeps working.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import crowdgraph
from crowdgraph import wire, zoo
from crowdgraph.wire import Message
from crowdgraph_tcp import TcpExecutor
from crowdgraph_tcp.worker import Agent, PartitionCache
from tests.oracle import assert_matches, oracle


def _point_at(tensor: TensorProto, location: str, **extra: int) -> None:
    """Make ``tensor`` claim its bytes live in external data at ``location`` (its raw bytes kept)."""
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    for key, value in extra.items():
        tensor.external_data.add(key=key, value=str(value))


def _partition(where: str, location: str, **extra: int) -> bytes:
    """y = x + w, with one 2 KiB weight (in an initializer, a Constant, or a Constant inside an If)."""
    weight = numpy_helper.from_array(np.arange(512, dtype=np.float32), "w")
    if where != "subgraph":
        _point_at(weight, location, **extra)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [512])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [512])
    if where == "initializer":
        nodes, initializers = [helper.make_node("Add", ["x", "w"], ["y"])], [weight]
    elif where == "constant":
        nodes = [helper.make_node("Constant", [], ["w"], value=weight), helper.make_node("Add", ["x", "w"], ["y"])]
        initializers = []
    else:  # a Constant inside both branches of an If
        def branch(name: str) -> onnx.GraphProto:
            inner = numpy_helper.from_array(np.arange(512, dtype=np.float32), f"w_{name}")
            _point_at(inner, location, **extra)
            out = helper.make_tensor_value_info(f"w_{name}_out", TensorProto.FLOAT, [512])
            return helper.make_graph([helper.make_node("Constant", [], [f"w_{name}_out"], value=inner)],
                                     name, [], [out])
        flag = numpy_helper.from_array(np.array(True), "flag")
        nodes = [helper.make_node("If", ["flag"], ["w"], then_branch=branch("then"), else_branch=branch("else")),
                 helper.make_node("Add", ["x", "w"], ["y"])]
        initializers = [flag]
    graph = helper.make_graph(nodes, "hostile", [x], [y], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _load(agent: Agent, data: bytes) -> Message:
    load = Message(wire.LOAD, {"partition": "p0", "sha256": hashlib.sha256(data).hexdigest(), "from_cache": False},
                   blobs={"model": data})
    kind, parts = agent.handle(load)
    return wire.decode(b"".join(bytes(part) for part in parts))


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def sandbox(tmp_path):
    """A worker whose cache is ``tmp_path/home/cache`` and the folders around it it must not touch."""
    cache_dir = tmp_path / "home" / "cache"
    agent = Agent("tcp://127.0.0.1:9", b"token", 64 << 20, cache=PartitionCache(cache_dir))
    return agent, tmp_path, cache_dir


@pytest.mark.parametrize("where", ["initializer", "constant", "subgraph"])
@pytest.mark.parametrize("location", ["ABSOLUTE", "../../outside.txt", "../.bashrc", "sub/dir.data",
                                      "OWN", "OWN+RANGE"])
def test_a_partition_referring_to_external_data_is_refused_and_nothing_of_it_is_kept(sandbox, where, location):
    agent, root, cache_dir = sandbox
    extra = {}
    if location == "ABSOLUTE":
        location = str(root / "outside.txt")
    elif location.startswith("OWN"):  # its own data file's name can only be known from the sha256; guess one
        extra = {"offset": 0, "length": 1 << 30} if location.endswith("RANGE") else {}
        location = "own.onnx.data"
    before = _files(root)
    answer = _load(agent, _partition(where, location, **extra))
    assert answer.type == wire.FAILED
    assert answer.header["load"] == "p0" and "external data" in answer.header["error"]
    assert _files(root) == before  # nothing written inside the cache or outside it
    assert agent.cache.digests() == [] and agent.resident.session is None


@pytest.mark.parametrize("where", ["initializer", "constant"])
def test_the_refusal_names_the_tensor_and_the_place(sandbox, where):
    agent, root, _ = sandbox
    answer = _load(agent, _partition(where, "../.bashrc"))
    assert "tensor 'w' refers to external data at '../.bashrc'" in answer.header["error"]


def test_an_honest_partition_still_loads_and_is_cached(sandbox):
    agent, root, cache_dir = sandbox
    weight = numpy_helper.from_array(np.arange(512, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "honest",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [512])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [512])], [weight])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=zoo.IR_VERSION).SerializeToString()
    answer = _load(agent, data)
    assert answer.type == wire.LOADED
    sha = hashlib.sha256(data).hexdigest()
    assert agent.cache.digests() == [sha]
    assert sorted(os.listdir(cache_dir)) == [f"{sha}.json", f"{sha}.onnx", f"{sha}.onnx.data"]


@pytest.mark.parametrize("location, length", [("../secret.txt", 2048), ("OWN", 1 << 20)])
def test_a_stored_entry_reaching_outside_its_data_file_is_removed_and_never_announced(tmp_path, location, length):
    """An entry left by an older worker (valid manifest, hashes matching) that refers outside its own file."""
    (tmp_path / "secret.txt").write_bytes(bytes(2048))
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    model = onnx.ModelProto()
    model.ParseFromString(_partition("initializer", "x"))
    sha = "ab" * 32
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    del weight.external_data[:]
    data_name = f"{sha}.onnx.data"
    _point_at(weight, data_name if location == "OWN" else location, offset=0, length=length)
    (cache_dir / f"{sha}.onnx").write_bytes(model.SerializeToString())
    (cache_dir / data_name).write_bytes(bytes(2048))
    files = {name: hashlib.sha256((cache_dir / name).read_bytes()).hexdigest() for name in (f"{sha}.onnx", data_name)}
    (cache_dir / f"{sha}.json").write_text(json.dumps({"format": 1, "sha256": sha, "files": files}))
    cache = PartitionCache(cache_dir)
    assert cache.digests() == [] and os.listdir(cache_dir) == []
    assert (tmp_path / "secret.txt").read_bytes() == bytes(2048)



# ------------------------------------------------- strings a peer sends


def test_a_worker_named_with_a_lone_surrogate_is_refused_and_drivers_still_join():
    """HELLO {"name": "\\ud800"} (a JSON escape no UTF-8 can carry) gets a REFUSE, not a seat in the crowd."""
    with TcpExecutor.local(workers=1, memory="64MB") as ex:
        with socket.create_connection(("127.0.0.1", ex.coordinator.port), timeout=10) as sock:
            sock.sendall(_frame(wire.HELLO, {"versions": [1], "name": "NAME", "memory_budget": 1 << 26, "cores": 1,
                                             "platform": "test", "codecs": ["none"], "cached": []}, r"\ud800"))
            refuse = _answers(sock)[0]
        assert refuse.type == wire.REFUSE and "lone surrogate" in refuse.header["reason"]
        assert ex.coordinator.run_sync(lambda: len(ex.coordinator.workers)) == 1  # the honest one only


def _frame(type_name: str, header: dict, name: str) -> bytes:
    """A frame of ``header`` whose string "NAME" becomes the raw JSON text ``name`` (which encode would refuse)."""
    control = json.dumps(header).replace('"NAME"', f'"{name}"').encode()
    return struct.pack("<4sBBHQII", b"CRWD", 1, wire.MESSAGE_TYPES[type_name], 0, len(control), len(control), 0) + control


def _answers(sock: socket.socket) -> list[Message]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return wire.FrameDecoder().feed(data)


@contextlib.contextmanager
def _worker_of(tmp_path, tcp_helpers, memory: str = "64MB"):
    """A real crowdgraph-worker process joined to this test, which plays its coordinator.

    Yields ``(proc, sock, conn)``: the worker's process, the socket to it and
    the coordinator's side of the connection, open.
    """
    token = b"hostile-test-token"
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(30)
        proc = subprocess.Popen(
            [sys.executable, "-m", "crowdgraph_tcp.worker", f"tcp://127.0.0.1:{server.getsockname()[1]}",
             "--token", token.decode(), "--memory", memory, "--cache-dir", str(tmp_path / "cache"),
             "--threads", "1"],
            env=tcp_helpers.child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            sock, _ = server.accept()
            with sock:
                sock.settimeout(30)
                conn = wire.Connection(wire.COORDINATOR, token=token, now=time.monotonic(), heartbeat=30.0)
                while not conn.receive_data(sock.recv(65536), now=time.monotonic()):
                    sock.sendall(b"".join(conn.data_to_send()))
                conn.welcome("w1", now=time.monotonic())
                sock.sendall(b"".join(conn.data_to_send()))
                yield proc, sock, conn
        finally:
            tcp_helpers.stop_process(proc)


def _ask(sock: socket.socket, conn: wire.Connection, message: Message) -> Message:
    """Send ``message`` to the worker and return its answer (heartbeats answered on the way)."""
    sock.sendall(b"".join(bytes(part) for part in wire.encode_parts(message, codec=conn.codec)))
    while True:
        data = sock.recv(1 << 20)
        assert data, "the worker closed the connection"
        answers = conn.receive_data(data, now=time.monotonic())
        sock.sendall(b"".join(conn.data_to_send()))
        if answers:
            return answers[0]


def test_a_worker_given_a_partition_named_with_a_lone_surrogate_says_why_and_exits_cleanly(tmp_path, tcp_helpers):
    with _worker_of(tmp_path, tcp_helpers) as (proc, sock, conn):
        sock.sendall(_frame(wire.LOAD, {"partition": "NAME", "sha256": "0" * 64, "from_cache": True}, r"\ud800"))
        answers = _answers(sock)
        assert proc.wait(30) == 1
    out = proc.stdout.read().decode()
    assert [m.type for m in answers] == [wire.BYE] and "lone surrogate" in answers[0].header["reason"]
    assert "lone surrogate" in out and "Traceback" not in out, out


def _adder(size: int) -> tuple[bytes, np.ndarray]:
    """y = x + w with ``size`` float weights (bytes of the model, w)."""
    w = np.random.default_rng(0).standard_normal(size).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "adder",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=zoo.IR_VERSION)
    return model.SerializeToString(), w


def _load_message(data: bytes, name: str = "p0") -> Message:
    return Message(wire.LOAD, {"partition": name, "sha256": hashlib.sha256(data).hexdigest(), "from_cache": False},
                   blobs={"model": data})


def test_a_large_partition_streams_into_the_cache_and_one_over_the_budget_is_refused_unkept(tmp_path, tcp_helpers):
    """A 4 MB partition is written to the cache as it arrives; a 12 MB one, over the 8 MB budget, gets FAILED."""
    model, w = _adder(1 << 20)
    too_big, _ = _adder(3 << 20)
    with _worker_of(tmp_path, tcp_helpers, memory="8MB") as (proc, sock, conn):
        refused = _ask(sock, conn, _load_message(too_big, "huge"))
        assert refused.type == wire.FAILED and refused.header["load"] == "huge"
        assert "more than this worker's budget of 8.0 MB; it was refused and not kept" in refused.header["error"]
        assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".tmp-")]
        assert _ask(sock, conn, _load_message(model)).type == wire.LOADED  # the connection is still fine
        x = np.ones(1 << 20, np.float32)
        result = _ask(sock, conn, Message(wire.RUN, {"task": ["p0", 0], "outputs": ["y"]}, tensors={"x": x}))
        assert result.type == wire.RESULT
        np.testing.assert_array_equal(result.tensors["y"], x + w)
    sha = hashlib.sha256(model).hexdigest()
    stored = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert stored == [f"{sha}.json", f"{sha}.onnx", f"{sha}.onnx.data"]
    assert (tmp_path / "cache" / f"{sha}.onnx.data").stat().st_size == w.nbytes


def test_every_answer_of_the_worker_to_a_bad_load_can_be_sent(sandbox):
    """Even a LOAD that never came through the wire (names unchecked) gets a FAILED that encodes."""
    agent, _, _ = sandbox
    load = Message(wire.LOAD, {"partition": "\ud800", "sha256": "0" * 64, "from_cache": True})
    kind, parts = agent.handle(load)
    failed = wire.decode(b"".join(bytes(part) for part in parts))
    assert kind == failed.type == wire.FAILED and "not in this worker's cache" in failed.header["error"]


# ------------------------------------------------------ results that lie

#: A worker agent whose results have twice the rows they should.
LIAR = """
import sys
import numpy as np
from crowdgraph_tcp import worker

honest_run = worker.Agent._run

def lying_run(self, message):
    answer = honest_run(self, message)
    answer.tensors = {name: np.concatenate([value, value]) for name, value in answer.tensors.items()}
    return answer

worker.Agent._run = lying_run
sys.exit(worker.main(sys.argv[1:]))
"""


def test_a_worker_whose_results_break_the_output_specs_is_dropped_and_the_run_still_matches(tmp_path, tcp_helpers):
    model = zoo.distilbert("tiny")
    feeds = zoo.sample_inputs(model, batch=4, sequence=16)
    compiled = crowdgraph.compile(model, partitions=3, input_shapes={name: (1, 16) for name in feeds})
    with TcpExecutor.local(workers=1, memory="64MB") as ex:
        liar = tcp_helpers.scripted_worker(ex, LIAR, "liar", tmp_path)
        try:
            got = compiled.run(feeds, executor=ex, microbatch=1, timeout=60)
            assert liar.wait(30) == 0  # told BYE: it leaves
        finally:
            tcp_helpers.stop_process(liar)
        report = compiled.last_report
    assert_matches(got, oracle(model, feeds))
    (lost,) = [w.lost for w in report.workers.values() if w.lost]
    assert "sent a bad result for task" in lost and "rows; the micro-batch has 1" in lost


def test_on_a_standing_coordinator_a_driver_has_the_lying_worker_disconnected(tmp_path, tcp_helpers):
    """``crowdgraph serve``: the driver that caught the lie reports it, the coordinator says BYE to the liar."""
    from crowdgraph_tcp.relay import standing_coordinator

    model = zoo.distilbert("tiny")
    feeds = zoo.sample_inputs(model, batch=2, sequence=16)
    compiled = crowdgraph.compile(model, partitions=2, input_shapes={name: (1, 16) for name in feeds})
    token = "standing-liar-test-token"
    coordinator = standing_coordinator(token.encode(), "127.0.0.1:0")
    procs = []
    try:
        for name, script in (("honest", ["-m", "crowdgraph_tcp.worker"]), ("liar", ["-c", LIAR])):
            procs.append(subprocess.Popen(
                [sys.executable, *script, coordinator.url, "--token", token, "--memory", "64MB", "--name", name,
                 "--threads", "1", "--cache-dir", str(tmp_path / name)],
                env=tcp_helpers.child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        with TcpExecutor.from_url(coordinator.url, token=token, min_workers=2, join_timeout=60) as ex:
            got = compiled.run(feeds, executor=ex, microbatch=1, timeout=60)
            report = compiled.last_report
        liar = procs[1]
        assert liar.wait(30) == 0, "the lying worker was not told to leave"  # BYE: it exits cleanly
        out = liar.stdout.read().decode()
        assert "sent a bad result for task" in out and "reported by driver" in out, out
        assert [w.name for w in coordinator.run_sync(lambda: list(coordinator.workers.values()))] == ["honest"]
    finally:
        coordinator.stop()
        for proc in procs:
            tcp_helpers.stop_process(proc)
    assert_matches(got, oracle(model, feeds))
    (lost,) = [w.lost for w in report.workers.values() if w.lost]
    assert "sent a bad result for task" in lost
