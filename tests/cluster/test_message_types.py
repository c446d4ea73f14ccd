"""Cluster messages are decoded against their declared field types: a wrongly typed, missing
or unexpected field is a MessageError with a reason, and every real message round-trips."""

from __future__ import annotations

import pytest

from edgemoe.cluster.messages import (
    Accept,
    Alive,
    Dead,
    Gossip,
    Learn,
    MessageError,
    Nack,
    Ping,
    Promise,
    Proposal,
    PushPull,
    Snapshot,
    Suspect,
    Versioned,
    from_wire,
    to_wire,
)

PROPOSAL = Proposal(2, (("n1", 10), ("n2", 5)), (Snapshot("n1", 1, {"counts": [1, 2]}),), "d",
                    (("n1", ((0, 1), (1, 0))),), ((0, 1, "", "n1"),), "n1", "drift",
                    True)  # fmt: skip
MESSAGES = [
    Ping("n1", 1, "n2", 3, (Alive("n1", -1, "http://h:1", 0), Suspect("n2", 1, "n1"),
                            Dead("n3", 2, "n1", True), Versioned("stats", "n1", 4, b"\x00"))),
    Gossip("n1"),
    PushPull("n1", False, (Alive("n2", 0, "u", 1), Dead("n3", 1, "n2")),
             (Versioned("holdings", "n2", 1, [[0, 1]]),), 7),
    Promise("n2", 2, (3, "n1"), None, None),
    Promise("n2", 2, (3, "n1"), (2, "n2"), PROPOSAL),
    Accept("n1", 2, (3, "n1"), PROPOSAL, ("n1", "n2")),
    Nack("n2", 2, (3, "n1"), None, "stale"),
    Learn("n1", (PROPOSAL, PROPOSAL)),
]  # fmt: skip


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: object) -> None:
    assert from_wire(to_wire(msg)) == msg


@pytest.mark.parametrize(
    ("wire", "reason", "where"),
    [
        ({"__t": "Gossip", "sender": "x", "items": [
            {"__t": "Alive", "node": "y", "incarnation": "1", "addr": "u", "capacity": 1}]},
         "type", "incarnation"),
        ({"__t": "Ping", "sender": "x", "seq": 1, "target": "y", "epoch": "zzz"}, "type", "epoch"),
        ({"__t": "Ping", "sender": "x", "seq": True, "target": "y"}, "type", "seq"),
        ({"__t": "Ping", "sender": "x", "seq": 1.0, "target": "y"}, "type", "seq"),
        ({"__t": "Ping", "sender": "x", "seq": -5, "target": "y"}, "value", "seq"),
        ({"__t": "Ping", "sender": "x", "seq": 2**64 - 1, "target": "y"}, "value", "seq"),
        ({"__t": "Ping", "sender": "x", "seq": 1}, "field", "target"),
        ({"__t": "Ping", "sender": "x", "seq": 1, "target": "y", "extra": 1}, "field", "extra"),
        ({"__t": "Accept", "sender": "x", "epoch": 1, "ballot": [1], "value": None}, "type",
         "ballot"),
        ({"__t": "Accept", "sender": "x", "epoch": 1, "ballot": [1, "x"], "value": None}, "type",
         "value"),
        ({"__t": "Gossip", "sender": "x", "items": [{"__t": "Ping", "sender": "y", "seq": 1,
                                                      "target": "z"}]}, "type", "items"),
        ({"__t": "Gossip", "sender": "x", "items": "abc"}, "type", "items"),
        ({"__t": "Gossip", "sender": ["x"]}, "type", "sender"),
        ({"__t": "Nope"}, "unknown", "Nope"),
        ({"__t": "Ping", "sender": "x", "seq": 1, "target": "y", "items": [{"__t": []}]}, "type",
         "items"),  # an unhashable tag where a union of messages is expected (found by fuzzing)
        ({"sender": "x"}, "unknown", "None"),
        ([1, 2], "type", "map"),
    ],
)  # fmt: skip
def test_a_wrongly_typed_message_is_refused_with_its_reason(wire: object, reason: str,
                                                            where: str) -> None:  # fmt: skip
    with pytest.raises(MessageError) as info:
        from_wire(wire)
    assert info.value.reason == reason, info.value
    assert where in str(info.value)
