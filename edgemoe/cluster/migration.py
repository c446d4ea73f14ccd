"""Make-before-break migration of expert shards for one node, and the routing table.

For the decided assignment, the node fetches each shard it must hold and does not (from a live
node announcing it, or from disk when none does), announces it once loaded, and drops a shard
it no longer needs only when another live node that is assigned it announces holding it in an
announcement made at the dropper's epoch or later, so the last live copy is never dropped.

Why the epoch stamp: without it, two nodes can each trust the other's stale announcement
(epoch 2 moves s from A to B, A drops; epoch 3 moves s back to A, and B drops on A's epoch-1
announcement that it still has not seen superseded). A holder announcing at epoch e >= ours
either is assigned s at e (and keeps it for all of e) or drops it only on the same rule at a
higher epoch, so the chain of holders we rely on always ends at a real copy.
Routing = live nodes announcing a shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from edgemoe.cluster.config import ClusterConfig
from edgemoe.cluster.effects import AnnounceHolding, DropShard, FetchShard
from edgemoe.cluster.messages import Proposal, Shard
from edgemoe.cluster.outbox import Outbox


class RoutingTable:
    """shard -> live nodes announcing it, rebuilt from the latest holdings per node."""

    def __init__(self) -> None:
        self._by_shard: dict[Shard, set[str]] = {}
        self._of: dict[str, frozenset[Shard]] = {}
        self._epoch: dict[str, int] = {}

    def set_holdings(self, node: str, shards: Iterable[Shard], epoch: int = 0) -> None:
        """`node`'s full announced set, made when it had learned `epoch`."""
        new = frozenset((int(l), int(e)) for l, e in shards)
        self._epoch[node] = epoch
        old = self._of.get(node, frozenset())
        for s in old - new:
            holders = self._by_shard.get(s)
            if holders is not None:
                holders.discard(node)
        for s in new - old:
            self._by_shard.setdefault(s, set()).add(node)
        self._of[node] = new

    def holdings_of(self, node: str) -> frozenset[Shard]:
        return self._of.get(node, frozenset())

    def epoch_of(self, node: str) -> int:
        """The epoch `node` had learned when it made the announcement we know (-1: none)."""
        return self._epoch.get(node, -1)

    def holders(self, shard: Shard, alive: Callable[[str], bool]) -> list[str]:
        return sorted(n for n in self._by_shard.get(shard, ()) if alive(n))

    def table(self, alive: Callable[[str], bool]) -> dict[Shard, list[str]]:
        out = {s: sorted(n for n in ns if alive(n)) for s, ns in self._by_shard.items()}
        return {s: ns for s, ns in sorted(out.items()) if ns}


class Migration:
    """One node's shard fetches, announcements and drops for the current decision."""

    def __init__(self, node_id: str, config: ClusterConfig) -> None:
        self.node_id = node_id
        self.config = config
        self.holding: set[Shard] = set()
        self.version = 0
        self.epoch = 0
        self.target: frozenset[Shard] = frozenset()
        self.assigned: dict[Shard, frozenset[str]] = {}
        self.pending: dict[Shard, float] = {}  # shard -> time the fetch was issued

    def on_decided(self, value: Proposal) -> None:
        self.epoch = value.epoch
        self.target = value.shards_of(self.node_id)
        by: dict[Shard, set[str]] = {}
        for n, shards in value.assignment:
            for s in shards:
                by.setdefault((int(s[0]), int(s[1])), set()).add(n)
        self.assigned = {s: frozenset(ns) for s, ns in by.items()}
        for s in list(self.pending):
            if s not in self.target:
                del self.pending[s]

    def announce(self, out: Outbox) -> AnnounceHolding:
        self.version += 1
        eff = AnnounceHolding(self.version, frozenset(self.holding))
        out.emit(eff)
        return eff

    def loaded(self, shard: Shard, out: Outbox) -> bool:
        """The shell loaded `shard`; True if the announcement changed."""
        self.pending.pop(shard, None)
        if shard in self.holding:
            return False
        self.holding.add(shard)
        self.announce(out)
        return True

    def failed(self, shard: Shard) -> None:
        self.pending.pop(shard, None)

    def step(
        self,
        now: float,
        routing: RoutingTable,
        alive: Callable[[str], bool],
        out: Outbox,
    ) -> bool:
        """Issue due fetches and safe drops; True if our holdings changed (announce them)."""
        for s in sorted(self.target - self.holding):
            issued = self.pending.get(s)
            if issued is not None and now - issued < self.config.fetch_timeout:
                continue
            sources = tuple(h for h in routing.holders(s, alive) if h != self.node_id)
            self.pending[s] = now
            out.emit(FetchShard(self.epoch, s[0], s[1], sources))
        dropped = False
        for s in sorted(self.holding - self.target):
            keepers = self.assigned.get(s, frozenset())
            safe = any(
                h != self.node_id and h in keepers and routing.epoch_of(h) >= self.epoch
                for h in routing.holders(s, alive)
            )
            if safe:
                self.holding.discard(s)
                out.emit(DropShard(self.epoch, s[0], s[1]))
                dropped = True
        return dropped

    def summary(self) -> Mapping[str, int]:
        return {"pending": len(self.pending), "holding": len(self.holding)}
