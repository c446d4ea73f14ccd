"""Unit behaviour of the small state machines: migration's drop rule, membership refutation,
the broadcast queue, order-independent snapshot merges, proposal verification."""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from edgemoe.cluster.config import ClusterConfig
from edgemoe.cluster.consensus import PlacementInputs, build_proposal, check_proposal
from edgemoe.cluster.dissemination import BroadcastQueue
from edgemoe.cluster.effects import DropShard, FetchShard, MemberSuspect
from edgemoe.cluster.membership import ALIVE, Membership
from edgemoe.cluster.messages import Alive, Proposal, Suspect, Versioned, from_wire, to_wire
from edgemoe.cluster.migration import Migration, RoutingTable
from edgemoe.cluster.outbox import Outbox
from edgemoe.cluster.simnet import capacity_round_robin
from edgemoe.cluster.stats_map import VersionedMap

PLACE = capacity_round_robin(1, 2, 1000)
S = (0, 0)


def decided(epoch: int, holder: str, prev: Proposal | None = None) -> Proposal:
    """A decision giving shard S to `holder` and (0, 1) to the other of a, b."""
    other = "b" if holder == "a" else "a"
    members = [("a", 1000), ("b", 1000)]

    def place(inputs: PlacementInputs) -> dict[str, list[tuple[int, int]]]:
        return {holder: [S], other: [(0, 1)]}

    return build_proposal(epoch, members, [], place, prev, "a", "test")


def test_old_holder_keeps_the_shard_until_the_new_holder_announces_at_its_epoch() -> None:
    m = Migration("a", ClusterConfig.fast())
    m.holding = {S}
    e1 = decided(1, "a")
    e2 = decided(2, "b", e1)
    m.on_decided(e1)
    m.on_decided(e2)
    routing = RoutingTable()
    alive = lambda n: True  # noqa: E731
    out = Outbox()
    # b announced S, but at epoch 1: stale for a decision made at epoch 2
    routing.set_holdings("b", [S], epoch=1)
    assert not m.step(0.0, routing, alive, out)
    assert S in m.holding and not any(isinstance(e, DropShard) for e in out.effects)
    routing.set_holdings("b", [S], epoch=2)
    assert m.step(0.0, routing, alive, out)
    assert S not in m.holding
    assert DropShard(2, 0, 0) in out.effects


def test_a_dead_announcer_does_not_count_as_a_copy() -> None:
    m = Migration("a", ClusterConfig.fast())
    m.holding = {S}
    m.on_decided(decided(1, "b"))
    routing = RoutingTable()
    routing.set_holdings("b", [S], epoch=1)
    out = Outbox()
    assert not m.step(0.0, routing, lambda n: n != "b", out)
    assert S in m.holding


def test_fetch_goes_to_live_announcers_and_is_reissued_after_the_timeout() -> None:
    cfg = ClusterConfig.fast()
    m = Migration("a", cfg)
    m.on_decided(decided(1, "a"))
    routing = RoutingTable()
    routing.set_holdings("b", [S], epoch=1)
    routing.set_holdings("c", [S], epoch=1)
    out = Outbox()
    m.step(0.0, routing, lambda n: n != "c", out)
    assert FetchShard(1, 0, 0, ("b",)) in out.effects
    again = Outbox()
    m.step(cfg.fetch_timeout / 2, routing, lambda n: True, again)
    assert not any(isinstance(e, FetchShard) and (e.layer, e.expert) == S for e in again.effects)
    m.step(cfg.fetch_timeout + 0.1, routing, lambda n: True, again)
    assert FetchShard(1, 0, 0, ("b", "c")) in again.effects


def test_a_suspected_node_refutes_with_a_higher_incarnation() -> None:
    mem = Membership("a", "x", 1, ClusterConfig.fast(), random.Random(0))
    mem.start(0.0)
    out = Outbox()
    mem.apply(0.0, Alive("b", 0, "y", 1), out)
    mem.apply(0.1, Suspect("a", 0, "b"), out)
    assert mem.incarnation == 1 and mem.members["a"].state == ALIVE
    queued = mem.queue.take(100)
    assert Alive("a", 1, "x", 1) in queued
    mem.apply(0.2, Suspect("b", 0, "a"), out)
    assert MemberSuspect("b", 0) in out.effects
    mem.apply(0.3, Alive("b", 1, "y", 1), out)  # b refuted
    assert mem.state_of("b") == ALIVE


def test_broadcast_queue_retires_items_after_the_limit_and_replaces_by_key() -> None:
    q = BroadcastQueue(lambda: 3)
    q.push("k", Alive("a", 0, "x", 1))
    q.push("k", Alive("a", 1, "x", 1))
    sent = [q.take(10) for _ in range(4)]
    assert sent[:3] == [[Alive("a", 1, "x", 1)]] * 3 and sent[3] == []


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 5), st.integers()), max_size=12),
    st.randoms(use_true_random=False),
)
def test_snapshot_merges_do_not_depend_on_delivery_order(
    items: list[tuple[str, int, int]], rnd: random.Random
) -> None:
    # one payload per (origin, version), as a real origin produces
    uniq = {(o, v): p for o, v, p in items}
    a, b = VersionedMap("stats"), VersionedMap("stats")
    seq = [(o, v, p) for (o, v), p in uniq.items()]
    for o, v, p in seq:
        a.merge(o, v, p)
    rnd.shuffle(seq)
    for o, v, p in seq + seq:  # duplicates too
        b.merge(o, v, p)
    assert a.items() == b.items()


def test_acceptors_reject_a_tampered_proposal() -> None:
    members = [("a", 2000), ("b", 2000)]
    v = build_proposal(1, members, [], PLACE, None, "a", "genesis")
    assert check_proposal(v, None, PLACE) is None
    moved = tuple((n, s) for n, s in reversed(v.assignment))
    assert check_proposal(replace(v, assignment=moved), None, PLACE) is not None
    assert check_proposal(replace(v, epoch=2), None, PLACE) == "wrong epoch"
    wire = from_wire(to_wire(v))
    assert wire == v and check_proposal(wire, None, PLACE) is None
    assert from_wire(to_wire(Versioned("stats", "a", 1, {"x": [1]}))).payload == {"x": [1]}
