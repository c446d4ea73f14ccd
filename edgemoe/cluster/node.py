"""One cluster node: membership, statistics and holdings gossip, consensus and migration
composed into the single sans-IO object the daemon (or the simulator) drives.

Driving it: call `start(now)` once, `join(now, peers)` with known (node id, address) pairs,
`handle(now, message)` for every message received, and `tick(now)` whenever the clock passes
`next_deadline()` (a timer armed after every call is enough). Every call returns an `Outbox`:
send each (destination node id, message) and act on each effect.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from edgemoe.cluster.config import ClusterConfig
from edgemoe.cluster.consensus import Consensus, PlacementFn, PlacementPending, build_proposal
from edgemoe.cluster.effects import Decided
from edgemoe.cluster.membership import ALIVE, SUSPECT, Membership
from edgemoe.cluster.messages import (
    Accept,
    Accepted,
    Ack,
    Alive,
    CatchUp,
    Dead,
    Gossip,
    Learn,
    Nack,
    Ping,
    PingReq,
    Prepare,
    Promise,
    Proposal,
    PushPull,
    Shard,
    Snapshot,
    Suspect,
    Versioned,
)
from edgemoe.cluster.migration import Migration, RoutingTable
from edgemoe.cluster.outbox import Outbox
from edgemoe.cluster.stats_map import VersionedMap
from edgemoe.cluster.storage import Storage

# (current statistics payloads, the payloads the current epoch was placed on), both per origin
# -> how far they moved apart (compared with `ClusterConfig.drift_threshold`)
DriftFn = Callable[[Mapping[str, Any], Mapping[str, Any]], float]
STATS, HOLDINGS = "stats", "holdings"
PLACEMENT_POLL_S = 0.05  # a proposal waiting for its placement (computed elsewhere) retries
_CONSENSUS = (Prepare, Promise, Accept, Accepted, Nack, Learn, CatchUp)


def holdings_payload(payload: Any) -> tuple[int, list[Shard]] | None:
    """(epoch, shards) of a holdings payload, None if it is malformed."""
    try:
        epoch = int(payload["epoch"])
        shards = [(int(l), int(e)) for l, e in payload["shards"]]
    except (TypeError, KeyError, ValueError):
        return None
    return epoch, shards


class Node:
    """The cluster brain of one daemon; see the module docstring for how to drive it."""

    def __init__(
        self,
        node_id: str,
        addr: str,
        capacity: int,
        *,
        storage: Storage,
        placement: PlacementFn,
        genesis: Iterable[str],
        config: ClusterConfig | None = None,
        seed: int = 0,
        drift: DriftFn | None = None,
    ) -> None:
        self.node_id = node_id
        self.config = config or ClusterConfig.lan()
        self.rng = random.Random(f"{seed}:{node_id}")
        self.membership = Membership(node_id, addr, capacity, self.config, self.rng)
        self.consensus = Consensus(node_id, storage, placement, self.config, self.rng, genesis)
        self.migration = Migration(node_id, self.config)
        self.stats = VersionedMap(STATS)
        self.holdings = VersionedMap(HOLDINGS)
        self.routing = RoutingTable()
        self.drift = drift
        self._stats_version = 0
        self._next_push_pull = float("inf")
        self._next_catchup = 0.0
        self._trigger_at: float | None = None
        # epoch, members and snapshots of a proposal whose placement is being computed
        # elsewhere: its retries for that epoch use them, so statistics published meanwhile do
        # not restart the computation
        self._held: tuple[int, list[tuple[str, int]], list[Snapshot]] | None = None
        self._trigger_reason = ""
        self._trigger_key: tuple[int, int, int] | None = None
        self._trigger_why: str | None = None
        self._decided_at = 0.0  # when we learned the last decision (drift hysteresis)
        self._stats_changes = 0
        self._started = False
        for v in self.consensus.log:
            self.migration.on_decided(v)
        self.membership.epoch = self.consensus.last_epoch

    # ---- views -------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.consensus.last_epoch

    @property
    def decisions(self) -> list[Proposal]:
        return self.consensus.log

    def is_alive(self, node: str) -> bool:
        return self.membership.state_of(node) in (ALIVE, SUSPECT)

    def alive_members(self) -> list[str]:
        return self.membership.alive_ids()

    def address_of(self, node: str) -> str | None:
        m = self.membership.members.get(node)
        return m.addr if m else None

    def routing_table(self) -> dict[Shard, list[str]]:
        """(layer, expert) -> live nodes announcing it (what requests should follow)."""
        return self.routing.table(self.is_alive)

    def holders(self, layer: int, expert: int) -> list[str]:
        return self.routing.holders((layer, expert), self.is_alive)

    def stats_snapshots(self) -> dict[str, tuple[int, Any]]:
        return {o: v for o in self.stats if (v := self.stats.get(o)) is not None}

    def drift_now(self) -> float | None:
        """Drift of the current epoch's members' statistics from those it was placed on
        (None without a drift measure or a decided epoch). Non-members' statistics are left
        out: a dead node's last snapshot stays in the map and must not re-place forever."""
        cur = self.consensus.current
        if self.drift is None or cur is None:
            return None
        ids = cur.member_ids()
        used = {s.origin: s.payload for s in cur.snapshots}
        now_stats = {o: p for o, (_, p) in self.stats_snapshots().items() if o in ids}
        return self.drift(now_stats, used)

    # ---- inputs ------------------------------------------------------------------------

    def start(self, now: float) -> Outbox:
        out = Outbox()
        self._started = True
        self._decided_at = now  # a (re)started node has not seen the workload settle yet
        self.membership.start(now)
        self._next_push_pull = now + self.rng.uniform(0, self.config.push_pull_interval)
        self.migration.announce(out)  # holdings (empty after a restart) at a fresh version
        self._publish_holdings()
        self._after(now, out)
        self._loopback(now, out)
        return out

    def join(self, now: float, peers: Iterable[tuple[str, str]]) -> Outbox:
        """Push-pull with each known (node id, address); the shell resolves addresses."""
        out = Outbox()
        for node, addr in peers:
            if node == self.node_id:
                continue
            if node not in self.membership.members:
                self.membership.apply(now, Alive(node, -1, addr, 0), Outbox())
            out.send(node, self._push_pull(reply=False))
        return out

    def handle(self, now: float, msg: Any) -> Outbox:
        out = Outbox()
        if not self._started:
            return out
        self._dispatch(now, msg, out)
        self._loopback(now, out)
        return out

    def _loopback(self, now: float, out: Outbox) -> None:
        """Deliver messages addressed to ourselves (we are one of our own acceptors)."""
        for _ in range(64):
            mine = [m for d, m in out.messages if d == self.node_id]
            if not mine:
                return
            out.messages = [(d, m) for d, m in out.messages if d != self.node_id]
            for m in mine:
                self._dispatch(now, m, out)

    def _dispatch(self, now: float, msg: Any, out: Outbox) -> None:
        if isinstance(msg, Ping | Ack | PingReq | Gossip):
            self._items(now, msg.items, out)
            self._peer_epoch(now, msg.sender, msg.epoch, out)
            if isinstance(msg, Ping):
                self.membership.on_ping(now, msg, out)
            elif isinstance(msg, Ack):
                self.membership.on_ack(now, msg, out)
            elif isinstance(msg, PingReq):
                self.membership.on_ping_req(now, msg, out)
        elif isinstance(msg, PushPull):
            self.membership.merge_remote(now, msg.members, out)
            self._items(now, msg.versioned, out)
            self._peer_epoch(now, msg.sender, msg.epoch, out)
            if not msg.reply:
                out.send(msg.sender, self._push_pull(reply=True))
        elif isinstance(msg, _CONSENSUS):
            self.consensus.handle(now, msg, out)
        self._after(now, out)

    def tick(self, now: float) -> Outbox:
        out = Outbox()
        if not self._started:
            return out
        self.membership.tick(now, out)
        self.consensus.tick(now, out)
        if now >= self._next_push_pull:
            n = self.membership.live_count()
            self._next_push_pull = now + self.config.push_pull_every(n)
            target = self.membership.push_pull_target()
            if target is not None:
                out.send(target, self._push_pull(reply=False))
        self._after(now, out)
        self._loopback(now, out)
        return out

    def next_deadline(self) -> float:
        t = min(
            self.membership.next_deadline(),
            self.consensus.next_deadline(),
            self._next_push_pull,
        )
        if self._trigger_at is not None:
            t = min(t, self._trigger_at)
        if self.migration.pending:
            t = min(t, min(self.migration.pending.values()) + self.config.fetch_timeout)
        return t

    def publish_stats(self, now: float, payload: Any) -> Outbox:
        """Spread this node's (opaque) statistics snapshot; versions are assigned here."""
        out = Outbox()
        self._stats_version = max(self._stats_version, self.stats.version(self.node_id)) + 1
        self._merge(now, Versioned(STATS, self.node_id, self._stats_version, payload), out)
        self._after(now, out)
        self._loopback(now, out)
        return out

    def shard_loaded(self, now: float, layer: int, expert: int) -> Outbox:
        """The shell verified and loaded (layer, expert); announce it."""
        out = Outbox()
        if self.migration.loaded((layer, expert), out):
            self._publish_holdings()
        self._after(now, out)
        self._loopback(now, out)
        return out

    def shard_failed(self, now: float, layer: int, expert: int) -> Outbox:
        """A fetch failed; it is reissued (from the then-current sources) on the next step."""
        out = Outbox()
        self.migration.failed((layer, expert))
        self._after(now, out)
        self._loopback(now, out)
        return out

    def request_epoch(
        self, now: float, members: Sequence[str] | None = None, reason: str = "operator"
    ) -> Outbox:
        """Operator request: propose a new epoch now. With `members`, that member set is used;
        if the current acceptors have no live majority, it is decided by those members alone
        (forced) and the survivors adopt it."""
        out = Outbox()
        chosen = sorted(set(members)) if members else None
        acceptors = self.consensus.acceptors()
        live = sum(1 for a in acceptors if self.is_alive(a))
        forced = chosen is not None and live < len(acceptors) // 2 + 1
        self._propose(now, reason, out, chosen, forced)
        self._after(now, out)
        self._loopback(now, out)
        return out

    def leave(self, now: float) -> Outbox:
        """Graceful leave: gossip our departure to a few peers; stop driving us afterwards."""
        out = Outbox()
        d = self.membership.leave(now)
        targets = [n for n in self.alive_members() if n != self.node_id]
        for t in self.rng.sample(targets, min(len(targets), self.config.gossip_nodes + 2)):
            out.send(t, Gossip(self.node_id, self.epoch, (d, *self.membership.piggyback())))
        return out

    # ---- internals ---------------------------------------------------------------------

    def _push_pull(self, reply: bool) -> PushPull:
        return PushPull(
            self.node_id,
            reply,
            self.membership.full_state(),
            tuple(self.stats.items() + self.holdings.items()),
            self.epoch,
        )

    def _peer_epoch(self, now: float, sender: str, epoch: int, out: Outbox) -> None:
        if epoch > self.epoch and now >= self._next_catchup:
            self._next_catchup = now + self.config.catchup_interval
            out.send(sender, CatchUp(self.node_id, self.epoch))

    def _items(self, now: float, items: Iterable[Any], out: Outbox) -> None:
        for item in items:
            if isinstance(item, Versioned):
                self._merge(now, item, out)
            elif isinstance(item, Alive | Suspect | Dead):
                self.membership.apply(now, item, out)

    def _merge(self, now: float, item: Versioned, out: Outbox) -> None:
        if item.kind not in (STATS, HOLDINGS):
            return
        vmap = self.stats if item.kind == STATS else self.holdings
        held = None
        if item.kind == HOLDINGS:
            held = holdings_payload(item.payload)
            if held is None:
                return  # malformed: ignore it rather than let it shadow a good version
        if item.origin == self.node_id and item.kind == HOLDINGS:
            stale = item.version == self.migration.version and item.payload != self._holdings()
            if item.version > self.migration.version or stale:  # from before a restart
                self.migration.version = item.version
                self.migration.announce(out)
                self._publish_holdings()
            return
        if item.origin == self.node_id and item.version > self._stats_version:
            self._stats_version = item.version  # pre-restart stats: next publish goes above
        if vmap.merge(item.origin, item.version, item.payload):
            self.membership.queue.push(("v", item.kind, item.origin), item)
            if item.kind == STATS:
                self._stats_changes += 1
            if held is not None:
                self.routing.set_holdings(item.origin, held[1], held[0])

    def _holdings(self) -> dict[str, Any]:
        """Our holdings payload: the shards we hold and the epoch we had learned then."""
        return {"epoch": self.epoch, "shards": [list(s) for s in sorted(self.migration.holding)]}

    def _publish_holdings(self) -> None:
        payload = self._holdings()
        item = Versioned(HOLDINGS, self.node_id, self.migration.version, payload)
        self.holdings.merge(self.node_id, item.version, item.payload)
        self.routing.set_holdings(self.node_id, self.migration.holding, self.epoch)
        self.membership.queue.push(("v", HOLDINGS, self.node_id), item)

    def _after(self, now: float, out: Outbox) -> None:
        """Follow-ups of any input: new decisions drive migration, triggers arm proposals."""
        for eff in out.effects:
            if isinstance(eff, Decided) and eff.epoch > self.migration.epoch:
                self.migration.on_decided(eff.value)
                self._trigger_at = None
                self._decided_at = now
        self.membership.epoch = self.epoch
        changed = self.migration.step(now, self.routing, self.is_alive, out)
        if changed or self.routing.epoch_of(self.node_id) != self.epoch:
            # re-announce at a new epoch too: others drop their copies only on an announcement
            # made at their epoch or later (see migration.py)
            self.migration.announce(out)
            self._publish_holdings()
        if self.membership.leaving:
            return
        self._check_triggers(now, out)

    def _wanted_members(self) -> list[tuple[str, int]]:
        ms = self.membership.members
        return [(n, ms[n].capacity) for n in self.alive_members()]

    def _trigger(self) -> str | None:
        """Why a new epoch is wanted (None: it is not); recomputed only when its inputs
        (live set, decisions, statistics) changed, since it runs after every message."""
        key = (self.membership.changes, self.epoch, self._stats_changes)
        if key != self._trigger_key:
            self._trigger_key, self._trigger_why = key, self._compute_trigger()
        return self._trigger_why

    def _compute_trigger(self) -> str | None:
        cur = self.consensus.current
        wanted = self._wanted_members()
        if cur is None:
            live = sum(1 for g in self.consensus.genesis if self.is_alive(g))
            if self.node_id in self.consensus.genesis and live > len(self.consensus.genesis) // 2:
                return "genesis"
            return None
        if tuple(wanted) != cur.members:
            return "membership"
        if self.config.drift_threshold < float("inf"):
            drift = self.drift_now()
            if drift is not None and drift > self.config.drift_threshold:
                return "drift"
        return None

    def _check_triggers(self, now: float, out: Outbox) -> None:
        if self.consensus.proposing():
            return
        reason = self._trigger()
        if reason is None:
            self._trigger_at = None
            return
        if self._trigger_at is None or reason != self._trigger_reason:
            # (re)armed when the reason changes too: a membership change must not wait out
            # the hold of a drift trigger armed before it
            order = sorted(a for a in self.consensus.acceptors() if self.is_alive(a))
            rank = order.index(self.node_id) if self.node_id in order else len(order)
            jitter = self.rng.uniform(0, self.config.propose_stagger)
            delay = self.config.propose_delay + rank * self.config.propose_stagger + jitter
            start = now
            if reason == "drift":
                start = max(now, self._decided_at + self.config.drift_min_interval)
            self._trigger_at = start + delay
            self._trigger_reason = reason
            return
        if now >= self._trigger_at:
            try:
                self._propose(now, reason, out, None, False)
            except PlacementPending:  # computing off the event loop: ask again shortly
                self._trigger_at = now + PLACEMENT_POLL_S
                return
            self._trigger_at = None

    def _propose(
        self, now: float, reason: str, out: Outbox, members: list[str] | None, forced: bool
    ) -> None:
        ms = self.membership.members
        if members is None:
            chosen = self._wanted_members()
        else:
            chosen = [(n, ms[n].capacity if n in ms else 0) for n in members]
        ids = {n for n, _ in chosen}
        snaps = [
            Snapshot(o, v, p) for o, (v, p) in sorted(self.stats_snapshots().items()) if o in ids
        ]
        if self._held is not None and self._held[:2] == (self.epoch + 1, chosen):
            snaps = self._held[2]
        try:
            value = build_proposal(
                self.epoch + 1,
                chosen,
                snaps,
                self.consensus.placement,
                self.consensus.current,
                self.node_id,
                reason,
                forced,
            )
        except PlacementPending:
            self._held = (self.epoch + 1, chosen, snaps)
            raise
        self._held = None
        self.consensus.propose(now, value, out, [n for n, _ in value.members] if forced else ())
