"""Worker to worker: held outputs, fetched from the holder's peer port or through the coordinator."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket

import numpy as np
import pytest

import crowdgraph
from crowdgraph import wire, zoo
from crowdgraph.errors import ExecutionError
from crowdgraph.executor import Job, Reporter
from crowdgraph.runtime import open_session, run_session
from crowdgraph_tcp import TcpExecutor
from crowdgraph_tcp.bridge import HeldOutput
from crowdgraph_tcp.peers import OFF_LOOP_BYTES, FetchError, HeldOutputs, PeerLinks, PeerServer


HELLO = {"name": "test", "memory_budget": 1, "cores": 1, "platform": "test"}


@pytest.fixture(scope="module")
def tiny():
    """The tiny DistilBERT in three partitions, a 16x128 batch and the whole model's outputs."""
    model = zoo.distilbert("tiny")
    batch = zoo.sample_inputs(model, batch=16, sequence=128)
    compiled = crowdgraph.compile(model, partitions=3, sample={k: v[:4] for k, v in batch.items()})
    return compiled, batch, run_session(open_session(model.SerializeToString()), batch)


def _through_coordinator(report) -> int:
    return sum(t.wire_in + t.wire_out for t in report.tasks)


def test_the_direct_example_runs_and_matches_the_oracle(tcp_helpers):
    out = tcp_helpers.run_example("tcp_direct.py", timeout=180)
    diffs = [float(x) for x in re.findall(r"max abs difference to the whole model: (\S+)", out)]
    assert len(diffs) == 2 and max(diffs) <= 1e-4, out
    sizes = re.findall(r"direct=(\w+): ([\d.]+) (k?B|MB) of tensors", out)
    scale = {"B": 1, "kB": 1e3, "MB": 1e6}
    star, direct = (float(n) * scale[u] for _, n, u in sizes)
    assert direct < star / 10, out


@pytest.mark.parametrize("reachable", [True, False], ids=["peer ports", "through the coordinator"])
def test_readers_fetch_what_other_workers_hold(tiny, reachable):
    """One worker per partition (the pipeline rule), so every boundary tensor changes worker: from the
    holder's peer port, or, where the announced address cannot be reached, through the coordinator."""
    compiled, batch, expected = tiny
    args = [] if reachable else ["--peer-address", "127.0.0.1:9"]  # the discard port: nothing listens
    with TcpExecutor.local(workers=3, memory="64MB", worker_args=args) as ex:
        outputs = compiled.run(batch, executor=ex, microbatch=4, policy="pipeline", timeout=120)
        relayed = ex.coordinator.relayed_bytes
        logs = "".join(path.read_text() for path in ex.logs.values())
    np.testing.assert_allclose(outputs["logits"], expected["logits"], rtol=1e-4, atol=1e-5)
    report = compiled.last_report
    runs = {p: {t.worker for t in report.tasks if t.partition == p} for p in ("p0", "p1", "p2")}
    assert not runs["p0"] & runs["p1"] and not runs["p1"] & runs["p2"], runs
    moved = sum(t.bytes_in for t in report.tasks if t.partition != "p0")
    assert _through_coordinator(report) < moved / 10  # RUN and RESULT carry no boundary tensor
    if reachable:
        assert relayed == 0
    else:
        assert relayed > moved / 2
        assert "fetching through the coordinator from now on" in logs


def test_a_lost_holder_s_outputs_are_computed_again(tiny):
    """The worker holding p0's outputs is killed as soon as it holds some: they are reported lost,
    computed again elsewhere, and the outputs still equal the whole model's."""
    compiled, batch, expected = tiny
    with TcpExecutor.local(workers=4, memory="64MB") as ex:
        answered, killed = ex.bridge.answered, []

        def kill_first_holder(worker, action, message, size, received):
            result = answered(worker, action, message, size, received)
            if message.header.get("held") and action.partition == "p0" and not killed:
                os.kill(ex.processes[worker].pid, signal.SIGKILL)
                killed.append(worker)
            return result

        ex.bridge.answered = kill_first_holder
        outputs = compiled.run(batch, executor=ex, microbatch=2, policy="pipeline", timeout=120)
    np.testing.assert_allclose(outputs["logits"], expected["logits"], rtol=1e-4, atol=1e-5)
    report = compiled.last_report
    assert killed and report.workers[killed[0]].lost
    finished_p0 = [t for t in report.tasks if t.partition == "p0"]
    assert len(finished_p0) > 8  # some of the eight micro-batches' first stage ran twice


def test_the_peer_port_serves_only_the_crowd():
    """A wrong token is refused at the handshake; the right one may only FETCH, and what is not
    held there is answered as such, not guessed."""
    with TcpExecutor.local(workers=1, memory="64MB") as ex:
        (worker,) = ex.coordinator.workers.values()
        address = worker.peer_address
        assert address is not None and address.startswith("127.0.0.1:")

        async def attempts():
            with pytest.raises(wire.Refused, match="does not match the holder.s"):
                await PeerLinks(b"not the token", HELLO).fetch(address, worker.id, ("p0", 0), ["y"])
            links = PeerLinks(ex.token, HELLO)
            with pytest.raises(FetchError, match="not held here"):
                await links.fetch(address, worker.id, ("p0", 0), ["y"])
            with pytest.raises(FetchError, match="not w9"):
                await links.fetch(address, "w9", ("p0", 0), ["y"])
            links.close()

        asyncio.run(attempts())
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:  # no handshake: a RUN is refused
            s.sendall(wire.encode(wire.Message(wire.RUN, {"task": ["p0", 0], "outputs": ["y"]})))
            s.settimeout(10)
            answer = wire.FrameDecoder().feed(s.recv(65536))
        assert answer and answer[0].type == wire.REFUSE and "HELLO" in answer[0].header["reason"]
        assert ex.coordinator.workers  # the worker is unharmed


def test_tensors_on_either_side_of_the_off_loop_size_cross_a_peer_link_whole():
    """Encoded and decoded inline below OFF_LOOP_BYTES, on a thread above it: the same tensors either way."""
    rng = np.random.default_rng(0)
    tensors = {"small": rng.standard_normal((8, 128, 768)).astype(np.float32),  # 3 MB, inline
               "large": rng.standard_normal(OFF_LOOP_BYTES // 4 + 1).astype(np.float32)}  # on a thread
    token = b"t" * 32

    async def fetch_both():
        held = HeldOutputs(limit=1 << 30)
        for name, value in tensors.items():
            held.keep((name, 0), {"y": value})
        server = PeerServer(held, token)
        server.me = "w1"
        host, port = await server.start("127.0.0.1", 0)
        links = PeerLinks(token, HELLO)
        try:
            return {name: (await links.fetch(f"{host}:{port}", "w1", (name, 0), ["y"]))["y"] for name in tensors}
        finally:
            links.close()
            server.close()

    for name, got in asyncio.run(fetch_both()).items():
        np.testing.assert_array_equal(got, tensors[name])


def test_held_outputs_are_gathered_and_dropped(tiny):
    """The driver's gather fetches a held output through the coordinator; forget drops it on the worker."""
    compiled, batch, expected = tiny
    with TcpExecutor.local(workers=3, memory="64MB") as ex:
        compiled.run(batch, executor=ex, microbatch=4, timeout=120)
        assert all(ex.bridge.held_bytes(w) == 0 for w in ex.coordinator.workers)  # all dropped after the run
        outputs, values = compiled.partitions[0].outputs, {}
        reporter = Reporter()
        ex.start(Job({p.name: p for p in compiled.partitions}, compiled.memory_budget), reporter)
        worker = next(iter(ex.coordinator.workers))
        part = compiled.partitions[0]
        ex.load(worker, part)
        ex.run(worker, (part.name, 0), part, {"input_ids": batch["input_ids"][:4]})
        while True:
            notice = reporter.next(30)
            if type(notice).__name__ == "Finished":
                values = notice.outputs
                break
        handle = values[outputs[0]]
        assert isinstance(handle, HeldOutput) and handle.worker == worker
        whole = run_session(open_session(part.model_bytes), {"input_ids": batch["input_ids"][:4]})
        np.testing.assert_array_equal(ex.gather({"h": handle})["h"], whole[outputs[0]])
        ex.forget([handle])
        ex.coordinator.run_sync(lambda: None)
        assert ex.bridge.held_bytes(worker) == 0
        with pytest.raises(ExecutionError, match="not held"):
            ex.gather({"h": handle})


# Holders whose RESULTs say they hold outputs, then answer every FETCH that they do not, or with a
# tensor cut to half its rows.
UNSERVING_HOLDER = """
import sys
from crowdgraph_tcp import peers, worker

honest_get = peers.HeldOutputs.get

def get(self, task, names):
    if sys.argv[1] == "forgets":
        raise KeyError(f"outputs {list(names)} of task {list(task)} are not held here")
    return {name: value[: len(value) // 2] for name, value in honest_get(self, task, names).items()}

peers.HeldOutputs.get = get
sys.exit(worker.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("mode, why", [("forgets", "not held here"), ("cuts", "its holder announced")])
def test_a_holder_that_does_not_serve_what_it_holds_is_dropped_and_the_run_still_matches(tiny, tmp_path, tcp_helpers,
                                                                                          mode, why):
    """Its reader, refused or given the wrong form, asks the coordinator, which sees the holder's
    answer itself, drops it, and the outputs it held are computed again elsewhere.  Its 4 MB budget
    fits only the first partition, so it holds."""
    compiled, batch, expected = tiny
    with TcpExecutor.local(workers=2, memory="64MB") as ex:
        liar = tcp_helpers.scripted_worker(ex, UNSERVING_HOLDER, mode, tmp_path, mode, memory="4MB")
        try:
            outputs = compiled.run(batch, executor=ex, microbatch=4, timeout=60)
            assert liar.wait(30) == 0  # told BYE: it leaves
        finally:
            tcp_helpers.stop_process(liar)
    np.testing.assert_allclose(outputs["logits"], expected["logits"], rtol=1e-4, atol=1e-5)
    (lost,) = [w.lost for w in compiled.last_report.workers.values() if w.lost]
    assert "did not send outputs it holds" in lost and why in lost


UNFETCHING_READER = """
import sys
from crowdgraph_tcp import peers, worker

async def never_fetch(self, entries, me, relay):
    raise peers.FetchError(entries[0]["holder"], "could not fetch (a lie)")

worker.Agent._fetch_inputs = never_fetch
sys.exit(worker.main(sys.argv[1:]))
"""


def test_a_reader_that_says_a_connected_holder_failed_it_is_dropped(tiny, tmp_path, tcp_helpers):
    """A reader fetches through the coordinator when a holder's port fails it, so its word that the
    holder failed it while the holder is still connected is a lie: the reader is dropped.  The honest
    worker's 4 MB fit only the first partition, so with the liar gone the run cannot go on, and says so."""
    compiled, batch, _ = tiny
    with TcpExecutor.local(workers=1, memory="4MB") as ex:
        liar = tcp_helpers.scripted_worker(ex, UNFETCHING_READER, "unfetching", tmp_path)
        try:
            with pytest.raises(crowdgraph.WorkerLostError, match="no remaining worker can hold partition"):
                compiled.run(batch, executor=ex, microbatch=4, timeout=60)
            assert liar.wait(30) == 0  # told BYE: it leaves
            said = liar.stdout.read().decode()
        finally:
            tcp_helpers.stop_process(liar)
    assert "said it could not fetch inputs from" in said, said
