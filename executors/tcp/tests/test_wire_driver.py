"""The wire messages and fields crowdgraph-tcp added for drivers (docs/protocol.md §7.4), and the
driver-side bridge that both TCP executors share (no sockets)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import crowdgraph
from crowdgraph import wire
from crowdgraph.errors import ProtocolError
from crowdgraph.executor import Job, Reporter
from crowdgraph.wire import Message, decode, encode
from crowdgraph_tcp.bridge import DriverBridge, Holding, take_answer
from tests import models

RECORD = {"id": "w1", "name": "pi", "memory_budget": 64 * 2**20, "cores": 4, "platform": "linux-aarch64",
          "cached": ["ab" * 32], "resident": None, "rss": 80 * 2**20}


@pytest.mark.parametrize("message", [
    Message(wire.CROWD, {}),
    Message(wire.CROWD, {"workers": [RECORD, dict(RECORD, id="w2", resident="cd" * 32, cached=[])]}),
    Message(wire.JOINED, {"worker": {k: v for k, v in RECORD.items() if k != "rss"}}),
    Message(wire.LOST, {"worker": "w1", "reason": "its connection closed"}),
    Message(wire.HELLO, {"versions": [1], "name": "driver@x", "memory_budget": 0, "cores": 1, "platform": "p",
                         "codecs": ["none"], "cached": [], "role": "driver", "rss": 123}),
    Message(wire.WELCOME, {"worker_id": "d1", "signature": "0" * 64, "heartbeat": 5.0, "role": "driver"}),
    Message(wire.RUN, {"task": ["p0", 1], "outputs": ["y"], "worker": "w1"}),
    Message(wire.FAILED, {"load": "p0", "error": "gone", "worker": "w1"}),
])
def test_driver_messages_round_trip(message):
    back = decode(encode(message))
    assert back.type == message.type and back.header == message.header


@pytest.mark.parametrize(("message", "match"), [
    (Message(wire.JOINED, {"worker": dict(RECORD, cores=0)}), "worker record"),
    (Message(wire.JOINED, {"worker": {"id": "w1"}}), "worker record"),
    (Message(wire.CROWD, {"workers": [dict(RECORD, resident="xyz")]}), "list of worker records"),
    (Message(wire.LOST, {"worker": "w1"}), "lacks 'reason'"),
    (Message(wire.HELLO, {"versions": [1], "name": "n", "memory_budget": 0, "cores": 1, "platform": "p",
                          "codecs": ["none"], "cached": [], "role": "boss"}), "role"),
    (Message(wire.RUN, {"task": ["p0", 1], "outputs": [], "worker": 3}), "'worker' must be a printable name"),
])
def test_bad_driver_messages_are_refused_both_ways(message, match):
    with pytest.raises(ValueError, match=match):
        encode(message)
    # A peer that sends it anyway: the receiver's decoder refuses it too.
    import json
    import struct

    control = json.dumps(message.header).encode()
    frame = struct.pack("<4sBBHQII", b"CRWD", 1, wire.MESSAGE_TYPES[message.type], 0, len(control),
                        len(control), 0) + control
    with pytest.raises(ProtocolError, match=match):
        decode(frame)


def test_the_new_codes_do_not_clash_and_are_documented():
    assert len(set(wire.MESSAGE_TYPES.values())) == len(wire.MESSAGE_TYPES)
    assert (wire.MESSAGE_TYPES[wire.CROWD], wire.MESSAGE_TYPES[wire.JOINED], wire.MESSAGE_TYPES[wire.LOST]) == (
        0x30, 0x31, 0x32)


# ------------------------------------------------------- the driver-side bridge

@pytest.fixture(scope="module")
def two_partitions():
    model, _ = models.chain(n_layers=2, width=8, batch=2)
    compiled = crowdgraph.compile(model, partitions=2, input_shapes={"x": (2, 8)})
    return {p.name: p for p in compiled.partitions}


def started(partitions, crowd=(), *, address_workers=False):
    bridge, reporter, notices = DriverBridge(address_workers=address_workers), Reporter(), []
    reporter.add_listener(notices.append)
    infos, unloads = bridge.start(Job(partitions), reporter, crowd)
    return bridge, notices, infos, unloads


def test_a_run_starts_from_the_crowd_and_frees_other_plans(two_partitions):
    first = next(iter(two_partitions.values()))
    crowd = [Holding("w1", 2**26, [first.sha256], first.sha256), Holding("w2", 2**26, [], "cd" * 32)]
    bridge, _, infos, unloads = started(two_partitions, crowd)
    assert [(i.id, i.cached, i.resident) for i in infos] == [
        ("w1", frozenset({first.name}), first.name), ("w2", frozenset(), None)]
    ((worker, unload),) = unloads  # w2 holds a partition of another plan
    assert worker == "w2" and unload.kind == wire.UNLOAD and unload.purpose.reporter is None
    assert [w for w, _ in bridge.reset(crowd)] == ["w1", "w2"]


@pytest.mark.parametrize("address_workers", [False, True])
def test_frames_name_their_worker_only_on_driver_connections(two_partitions, address_workers):
    part = next(iter(two_partitions.values()))
    bridge, *_ = started(two_partitions, address_workers=address_workers)
    load = bridge.load("w1", part, from_cache=False)
    assert load.message.blobs["model"] == part.model_bytes
    assert ("worker" in load.message.header) == address_workers
    run = bridge.run("w1", (part.name, 0), part, {"x": np.ones((2, 8), np.float32)},
                     lambda m: [encode(m)])
    assert (decode(run.parts[0]).header.get("worker") == "w1") == address_workers


def test_a_cache_miss_resends_the_bytes_and_reports_nothing(two_partitions):
    part = next(iter(two_partitions.values()))
    bridge, notices, *_ = started(two_partitions)
    load = bridge.load("w1", part, from_cache=True)
    assert load.message.blobs == {}
    resend = bridge.answered("w1", load, Message(wire.FAILED, {"load": part.name, "error": "not cached"}), 90, 1.0)
    assert resend.kind == wire.LOAD and not resend.from_cache and resend.purpose is load.purpose
    assert resend.message.blobs["model"] == part.model_bytes and notices == []
    resend.sent = 1.0
    assert bridge.answered("w1", resend, Message(wire.LOADED, {"partition": part.name, "sha256": part.sha256,
                                                                 "seconds": 0.5, "rss": 7}), 90, 2.0) is None
    (loaded,) = notices
    assert loaded.kind == "loaded" and loaded.start == 1.5 and loaded.rss == 7


def test_inputs_that_cannot_be_sent_fail_the_task(two_partitions):
    part = next(iter(two_partitions.values()))
    bridge, notices, *_ = started(two_partitions)
    assert bridge.run("w1", (part.name, 0), part, {"x": np.ones(2, dtype=[("a", "i4")])}, lambda m: [encode(m)]) is None
    (failed,) = notices
    assert failed.kind == "failed" and "cannot send the inputs" in failed.error


@settings(max_examples=80, deadline=None)
@given(offset=st.floats(-1e4, 1e4), answers=st.lists(
    st.tuples(st.floats(0, 10), st.floats(0, 5), st.floats(0, 2), st.floats(0, 1)), min_size=1, max_size=8))
def test_worker_times_map_into_the_send_to_receive_window(two_partitions, offset, answers):
    """Invariant: a task's mapped times lie between its RUN leaving and its RESULT arriving, in order,
    and never before the true time (worker clock + the true offset), whatever the trips took."""
    part = next(iter(two_partitions.values()))
    bridge, notices, *_ = started(two_partitions)
    t = 0.0
    for i, (wait, compute, trip_out, trip_back) in enumerate(answers):
        t += wait
        sent = t
        received = sent + trip_out + compute + trip_back
        start_w = sent + trip_out - offset           # the worker's clock reads driver time - offset
        end_w = start_w + compute
        t = received
        run = bridge.run("w1", (part.name, i), part, {}, lambda m: [b""])
        run.sent = sent
        bridge.answered("w1", run, Message(wire.RESULT, {"task": [part.name, i], "start": start_w, "end": end_w,
                                                          "peak_rss": 1, "rss": 1}), 10, received)
        stats = notices[-1].stats
        assert sent <= stats.start <= stats.end <= received
        assert stats.end >= end_w + offset - 1e-6 * (1 + abs(offset))


@settings(max_examples=80, deadline=None)
@given(offset=st.floats(-1e4, 1e4), actions=st.lists(
    st.tuples(st.booleans(), st.floats(0, 2), st.floats(0, 5), st.floats(0, 2), st.floats(0, 1)), min_size=2, max_size=8))
def test_a_workers_answers_map_in_the_order_it_carried_them_out(two_partitions, offset, actions):
    """Invariant: actions sent before the previous one finished (as the scheduler pipelines a LOAD
    behind a RUN) run one at a time on the worker, and their mapped times never overlap: a load
    never seems to begin while the task before it still ran."""
    part = next(iter(two_partitions.values()))
    bridge, notices, *_ = started(two_partitions)
    sent = began = ended = arrived = 0.0
    previous_end = -float("inf")
    for i, (is_load, gap, compute, trip_out, trip_back) in enumerate(actions):
        sent += gap
        began = max(sent + trip_out, ended)          # the worker's one compute thread, in order
        ended = began + compute
        arrived = max(arrived, ended + trip_back)    # one TCP stream: answers arrive in order
        if is_load:
            action = bridge.load("w1", part, from_cache=False)
            answer = Message(wire.LOADED, {"partition": part.name, "sha256": part.sha256, "seconds": compute, "rss": 1})
        else:
            action = bridge.run("w1", (part.name, i), part, {}, lambda m: [b""])
            answer = Message(wire.RESULT, {"task": [part.name, i], "start": began - offset, "end": ended - offset,
                                           "peak_rss": 1, "rss": 1})
        action.sent = sent
        bridge.answered("w1", action, answer, 10, arrived)
        times = notices[-1] if is_load else notices[-1].stats
        assert sent <= times.start <= times.end <= arrived
        assert times.start >= previous_end
        previous_end = times.end


def test_answers_match_their_actions_by_kind_and_key(two_partitions):
    part = next(iter(two_partitions.values()))
    bridge, *_ = started(two_partitions)
    runs = [bridge.run("w1", (part.name, i), part, {}, lambda m: [b""]) for i in range(3)]
    load, unload = bridge.load("w1", part, from_cache=True), bridge.unload("w1", part.name, None)
    outstanding = [*runs, load, unload]
    assert take_answer(outstanding, Message(wire.UNLOADED, {"partition": part.name, "rss": 1})) is unload
    assert take_answer(outstanding, Message(wire.RESULT, {"task": [part.name, 1], "start": 0, "end": 0,
                                                          "peak_rss": 0, "rss": 0})) is runs[1]
    assert take_answer(outstanding, Message(wire.FAILED, {"load": part.name, "error": "x"})) is load
    assert take_answer(outstanding, Message(wire.FAILED, {"load": "p9", "error": "x"})) is None
    assert outstanding == [runs[0], runs[2]]
