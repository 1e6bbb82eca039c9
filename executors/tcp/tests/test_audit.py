"""Spot checks over TCP: a real crowdgraph-worker made to lie is caught, quarantined and refused."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import crowdgraph
from crowdgraph import wire
from crowdgraph_tcp import TcpExecutor
from tests.models import chain
from tests.oracle import assert_matches, oracle

#: A worker agent whose results keep their shape and dtype but not their
#: values: on every task ("every"), on its 1st, 11th, 21st ... task
#: ("tenth"), or NaN everywhere ("nan").
LIAR = """
import sys
import numpy as np
from crowdgraph_tcp import worker

mode = sys.argv.pop(1)
honest_run = worker.Agent._run
told = [0]

def lie(value):
    if mode == "nan" and np.issubdtype(value.dtype, np.floating):
        return np.full_like(value, np.nan)
    return value + np.asarray(1, dtype=value.dtype)

def lying_run(self, message):
    answer = honest_run(self, message)
    told[0] += 1
    if mode != "tenth" or told[0] % 10 == 1:
        answer.tensors = {name: lie(value) for name, value in answer.tensors.items()}
    return answer

worker.Agent._run = lying_run
sys.exit(worker.main(sys.argv[1:]))
"""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def honest_four():
    """Four honest worker processes and a coordinator, shared by the tests here."""
    with TcpExecutor.local(workers=4, memory="64MB") as ex:
        yield ex


@pytest.fixture(scope="module")
def small_chain():
    model, feeds = chain(n_layers=4, width=32, batch=8)
    compiled = crowdgraph.compile(model, partitions=3, input_shapes={k: (1,) + v.shape[1:] for k, v in feeds.items()})
    return compiled, feeds, oracle(model, feeds)


def _liar(ex: TcpExecutor, mode: str, name: str, tmp_path, tcp_helpers) -> subprocess.Popen:
    return tcp_helpers.scripted_worker(ex, LIAR, name, tmp_path, mode)


@pytest.mark.parametrize("mode", ["every", "tenth", "nan"])
def test_a_crowd_of_five_with_one_liar_gives_the_oracle_and_names_the_liar(honest_four, small_chain, mode,
                                                                           tmp_path, tcp_helpers):
    compiled, feeds, want = small_chain
    name = f"liar-{mode}"
    liar = _liar(honest_four, mode, name, tmp_path, tcp_helpers)
    try:
        got = compiled.run(feeds, executor=honest_four, microbatch=1, audit=1.0, policy="greedy", timeout=120)
        assert liar.wait(30) == 0  # told BYE: it leaves
        output = liar.stdout.read().decode()
    finally:
        tcp_helpers.stop_process(liar)
    assert_matches(got, want)
    report = compiled.last_report
    (quarantined,) = report.audit.quarantined  # one worker, and the liar is the one told so:
    assert "quarantined" in output and "disagreed" in output, output
    assert report.workers[quarantined].lost == "quarantined"
    assert f"quarantined {quarantined}" in str(report)


def test_a_quarantined_worker_is_refused_when_it_comes_back_under_its_name(honest_four, small_chain, tmp_path,
                                                                           tcp_helpers):
    compiled, feeds, want = small_chain
    liar = _liar(honest_four, "every", "liar-back", tmp_path, tcp_helpers)
    try:
        compiled.run(feeds, executor=honest_four, microbatch=1, audit=1.0, policy="greedy", timeout=120)
        assert liar.wait(30) == 0
    finally:
        tcp_helpers.stop_process(liar)
    joined = honest_four.coordinator.run_sync(lambda: len(honest_four.coordinator.workers))
    again = subprocess.Popen(
        [sys.executable, "-m", "crowdgraph_tcp.worker", honest_four.url, "--token", honest_four.token.decode(),
         "--memory", "64MB", "--name", "liar-back", "--threads", "1", "--cache-dir", str(tmp_path / "again")],
        env=tcp_helpers.child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        again.wait(60)
        output = again.stdout.read().decode()
    finally:
        tcp_helpers.stop_process(again)
    assert "is quarantined for" in output and "liar-back" in output, output
    assert honest_four.coordinator.run_sync(lambda: len(honest_four.coordinator.workers)) == joined
    got = compiled.run(feeds, executor=honest_four, microbatch=1, audit=0.2, timeout=120)
    assert_matches(got, want)
    assert not compiled.last_report.audit.quarantined
    assert not np.isnan(got[next(iter(want))]).any()


def test_a_private_run_sends_no_worker_a_frame_with_the_models_inputs_or_outputs(honest_four, small_chain,
                                                                                monkeypatch):
    compiled, feeds, want = small_chain
    sent = []
    encode_parts = wire.encode_parts

    def spy(message, **options):  # every frame the driver's side sends a worker is encoded here
        sent.append(message)
        return encode_parts(message, **options)

    monkeypatch.setattr(wire, "encode_parts", spy)
    got = compiled.run(feeds, executor=honest_four, microbatch=1, private=True, audit=0.5, timeout=120)
    assert_matches(got, want)
    private = [p for p in compiled.partitions if {*p.inputs, *p.outputs} & {*feeds, *want}]
    assert private and len(private) < len(compiled.partitions)
    runs = [m for m in sent if m.type == wire.RUN]
    assert runs, "the crowd ran nothing"
    model_tensors = {*feeds, *want}
    rows = [row.tobytes() for value in (*feeds.values(), *want.values()) for row in value]
    for message in sent:
        assert not model_tensors & set(message.tensors), (message.type, sorted(message.tensors))
        for value in message.tensors.values():
            assert all(np.asarray(row).tobytes() not in rows for row in np.asarray(value))
        assert message.header.get("sha256") not in {p.sha256 for p in private}
    assert {t.worker for t in compiled.last_report.tasks if t.partition in {p.name for p in private}} == {"home"}


def test_on_a_standing_coordinator_the_outvoted_worker_is_quarantined_for_every_driver(small_chain, tmp_path,
                                                                                      tcp_helpers):
    """``crowdgraph serve``: the driver whose checks outvoted a worker has the coordinator refuse its name."""
    from crowdgraph_tcp.relay import standing_coordinator

    compiled, feeds, want = small_chain
    token = "standing-quarantine-test-token"
    coordinator = standing_coordinator(token.encode(), "127.0.0.1:0", quarantine_seconds=600)
    procs = []

    def worker(name: str, script: list[str]) -> subprocess.Popen:
        procs.append(subprocess.Popen(
            [sys.executable, *script, coordinator.url, "--token", token, "--memory", "64MB", "--name", name,
             "--threads", "1", "--cache-dir", str(tmp_path / name)],
            env=tcp_helpers.child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        return procs[-1]

    try:
        for k in range(3):
            worker(f"honest-{k}", ["-m", "crowdgraph_tcp.worker"])
        liar = worker("liar", ["-c", LIAR, "every"])
        with TcpExecutor.from_url(coordinator.url, token=token, min_workers=4, join_timeout=60) as ex:
            got = compiled.run(feeds, executor=ex, microbatch=1, audit=1.0, policy="greedy", timeout=120)
            report = compiled.last_report
        assert liar.wait(30) == 0, "the outvoted worker was not told to leave"
        assert "quarantined" in liar.stdout.read().decode()
        back = worker("liar", ["-m", "crowdgraph_tcp.worker"])  # an honest agent under the same name
        back.wait(60)
        assert "is quarantined for" in back.stdout.read().decode()
        names = sorted(w.name for w in coordinator.run_sync(lambda: list(coordinator.workers.values())))
        assert names == ["honest-0", "honest-1", "honest-2"]
    finally:
        coordinator.stop()
        for proc in procs:
            tcp_helpers.stop_process(proc)
    assert_matches(got, want)
    (quarantined,) = report.audit.quarantined
    assert report.workers[quarantined].lost == "quarantined"
