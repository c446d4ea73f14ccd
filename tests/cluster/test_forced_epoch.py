"""When the quorum is lost for good, an operator's member set is decided by those members alone
(forced epoch) and the survivors adopt it, with no safety violation."""

from __future__ import annotations

import math
import random

from edgemoe.cluster.config import ClusterConfig
from edgemoe.cluster.consensus import Consensus, build_proposal
from edgemoe.cluster.messages import Accept, Promise
from edgemoe.cluster.outbox import Outbox
from edgemoe.cluster.simnet import Scenario, SimNet, capacity_round_robin
from edgemoe.cluster.storage import AcceptorState, MemoryStorage


def test_survivors_adopt_an_operator_member_set_after_losing_the_quorum() -> None:
    sc = Scenario(
        nodes=5,
        seed=1,
        duration=100.0,
        loss=0.1,
        crashes=tuple((8.0, i, math.inf) for i in range(3)),  # 3 of 5 gone: no majority
    )
    net = SimNet(sc)
    net.run(60.0)
    survivor = net.nodes["n0003"]
    assert survivor is not None
    stuck = survivor.epoch
    assert survivor.alive_members() == ["n0003", "n0004"]
    assert "n0000" in survivor.consensus.acceptors()  # the old quorum is still in force
    net.sc = sc
    now = net.local("n0003", net.now)
    net._deliver_out("n0003", survivor.request_epoch(now, ["n0003", "n0004"]))
    res = net.run()
    for node in ("n0003", "n0004"):
        n = net.nodes[node]
        assert n is not None and n.consensus.current is not None
        assert n.epoch == stuck + 1
        assert n.consensus.current.member_ids() == ("n0003", "n0004")
        assert n.consensus.current.forced
    assert not any(res.violations.values()), res.examples


def test_a_forced_proposal_is_not_replaced_by_a_normal_value_the_survivors_accepted() -> None:
    """Survivors that accepted a normal value (never decided: the old quorum is gone) must not
    make the operator's forced proposal re-propose it; acceptors refuse a non-forced value
    under forced members, so that would stall forever."""
    place = capacity_round_robin(1, 2, 1000)
    genesis = ("a", "b", "c", "d", "e")
    normal = build_proposal(1, [(n, 2000) for n in genesis], [], place, None, "c", "genesis")
    storage = MemoryStorage()
    storage.save_acceptor(1, AcceptorState((1, "c"), (1, "c"), normal))
    c = Consensus("a", storage, place, ClusterConfig.fast(), random.Random(0), genesis)
    forced = build_proposal(1, [("a", 2000), ("b", 2000)], [], place, None, "a", "op", True)
    out = Outbox()
    c.propose(0.0, forced, out, ["a", "b"])
    ballot = c._prop.ballot  # type: ignore[union-attr]
    c.handle(0.0, Promise("a", 1, ballot, (1, "c"), normal), out)
    c.handle(0.0, Promise("b", 1, ballot, (1, "c"), normal), out)
    accepts = [m for _, m in out.messages if isinstance(m, Accept)]
    assert accepts and all(m.value == forced for m in accepts)
