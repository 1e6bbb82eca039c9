"""The wire messages and fields crowdgraph-tcp added for drivers (docs/protocol.md §7.4)."""

from __future__ import annotations

import pytest

from crowdgraph import wire
from crowdgraph.errors import ProtocolError
from crowdgraph.wire import Message, decode, encode

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
    (Message(wire.RUN, {"task": ["p0", 1], "outputs": [], "worker": 3}), "'worker' must be a string"),
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
