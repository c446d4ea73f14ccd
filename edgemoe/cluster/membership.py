"""SWIM failure detection with Lifeguard refinements, sans-IO (model: HashiCorp memberlist).

Probes one member per protocol period, asks `indirect_checks` peers to probe on a missed ack,
suspects a member that stays silent, and declares it dead when the suspicion timeout (which
shrinks with independent confirmations) runs out unless it refutes with a higher incarnation.
State changes spread as piggybacked items and by periodic push-pull of the full table.

Join sync: piggybacking moves at most `max_piggyback` items per message, so when N nodes join
at once through a few seeds, N fresh records crowd every queue and the periodic push-pull
(tens of seconds) is what finally fills the gaps. A node that has just started and whose view
has grown since (the join's reply) therefore sends its member table to a random live peer
every `join_sync_interval`; the peer merges it and answers with its full state (the normal
push-pull reply), so the two views become their union and knowledge roughly doubles per
interval: a mass join converges in O(log N) rounds. Checks that find the view unchanged double
the interval (a node that misses a few members still pulls them from its next peer), and after
`join_sync_backoffs` of them in a row the phase ends. A node joining a settled cluster does a
few such exchanges and stops; one that started with a static member list (`preload`) and
learned nothing new does none.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from edgemoe.cluster.config import ClusterConfig
from edgemoe.cluster.dissemination import BroadcastQueue
from edgemoe.cluster.effects import MemberAlive, MemberDead, MemberSuspect
from edgemoe.cluster.messages import (
    Ack,
    Alive,
    Dead,
    Gossip,
    Item,
    Ping,
    PingReq,
    PushPull,
    Suspect,
)
from edgemoe.cluster.outbox import Outbox

ALIVE, SUSPECT, DEAD, LEFT = "alive", "suspect", "dead", "left"


@dataclass
class Member:
    node: str
    addr: str
    capacity: int
    incarnation: int
    state: str
    since: float


@dataclass
class _Suspicion:
    start: float
    lo: float
    hi: float
    k: int
    by: set[str] = field(default_factory=set)

    def deadline(self) -> float:
        c = len(self.by) - 1
        if self.k < 1 or c <= 0:
            return self.start + (self.hi if self.k >= 1 else self.lo)
        frac = math.log(c + 1) / math.log(self.k + 1)
        return self.start + max(self.lo, self.hi - (self.hi - self.lo) * frac)


@dataclass
class _Probe:
    seq: int
    target: str
    timeout_at: float
    end_at: float
    acked: bool = False
    indirect: bool = False


class Membership:
    """One node's view of the group; feed it messages and ticks, read `members`."""

    def __init__(
        self, node_id: str, addr: str, capacity: int, config: ClusterConfig, rng: random.Random
    ) -> None:
        self.node_id = node_id
        self.config = config
        self.rng = rng
        self.incarnation = 0
        self.members: dict[str, Member] = {node_id: Member(node_id, addr, capacity, 0, ALIVE, 0.0)}
        self.queue = BroadcastQueue(lambda: config.retransmit_limit(self.live_count()))
        self.awareness = 0
        self.epoch = 0  # stamped on outgoing messages by the node
        self.leaving = False
        self._seq = 0
        self._probe: _Probe | None = None
        self._probe_order: list[str] = []
        self._relays: dict[int, tuple[str, int, float]] = {}
        self._suspicions: dict[str, _Suspicion] = {}
        self._next_probe = 0.0
        self._next_gossip = 0.0
        self._sync_at = math.inf  # next join-sync check; inf before start and after the phase
        self._sync_idle = 0  # join-sync checks in a row that found the view unchanged
        self._sync_base = 1  # members known at start: the phase syncs once the view grew
        self._sync_known = 1  # members known at the previous join-sync check
        self._live = 1
        self._alive_ids = [node_id]
        self.changes = 0  # bumped whenever the live set or a capacity may have changed

    # ---- views -------------------------------------------------------------------------

    def live_count(self) -> int:
        return self._live

    def alive_ids(self) -> list[str]:
        """Members currently alive or suspect (suspects still serve), self included, sorted."""
        return list(self._alive_ids)

    def state_of(self, node: str) -> str | None:
        m = self.members.get(node)
        return m.state if m else None

    def record(self, m: Member) -> Alive | Suspect | Dead:
        if m.state == ALIVE:
            return Alive(m.node, m.incarnation, m.addr, m.capacity)
        if m.state == SUSPECT:
            return Suspect(m.node, m.incarnation, self.node_id)
        return Dead(m.node, m.incarnation, self.node_id, m.state == LEFT)

    def full_state(self) -> tuple[Alive | Suspect | Dead, ...]:
        return tuple(self.record(m) for m in self.members.values())

    def _recount(self) -> None:
        """Refresh the live set after a change between live (alive, suspect) and not live;
        callers read it on every message, so it is kept rather than recomputed."""
        live = (m.node for m in self.members.values() if m.state in (ALIVE, SUSPECT))
        self._alive_ids = sorted(live)
        self._live = len(self._alive_ids)
        self.changes += 1

    def preload(self, now: float, records: Iterable[Alive]) -> None:
        """Know `records` as alive without gossiping them: a static member list every node
        starts with (the simulator's large clusters; a daemon's configured seeds need push-pull
        instead). Records of known members are ignored."""
        for a in records:
            if a.node not in self.members:
                self.members[a.node] = Member(a.node, a.addr, a.capacity, a.incarnation, ALIVE, now)
        self._recount()

    # ---- timers ------------------------------------------------------------------------

    def start(self, now: float) -> None:
        self.queue.push(("m", self.node_id), self.record(self.members[self.node_id]))
        self._next_probe = now + self.rng.uniform(0, self.config.probe_interval)
        self._next_gossip = now + self.rng.uniform(0, self.config.gossip_interval)
        self._sync_base = self._sync_known = len(self.members)
        self._sync_idle = 0
        self._sync_at = now + self.config.join_sync_interval

    def next_deadline(self) -> float:
        t = min(self._next_probe, self._next_gossip, self._sync_at)
        p = self._probe
        if p is not None and not p.acked:  # an acked probe has no timer left
            t = min(t, p.end_at if p.indirect else p.timeout_at)
        for s in self._suspicions.values():
            t = min(t, s.deadline())
        return t

    def tick(self, now: float, out: Outbox) -> None:
        for node, s in list(self._suspicions.items()):
            if now >= s.deadline():
                m = self.members[node]
                del self._suspicions[node]
                if m.state == SUSPECT:
                    self.apply(now, Dead(node, m.incarnation, self.node_id), out)
        p = self._probe
        if p is not None and not p.acked:
            if not p.indirect and now >= p.timeout_at:
                p.indirect = True
                self._send_indirect(p, out)
            elif p.indirect and now >= p.end_at:
                self._probe_failed(now, p, out)
        if now >= self._next_probe:
            self._start_probe(now, out)
        if now >= self._next_gossip:
            self._next_gossip = now + self.config.gossip_interval
            self._gossip(now, out)
        if now >= self._sync_at:
            self._join_sync(now, out)

    def _scale(self) -> int:
        return self.awareness + 1

    def _pick_probe_target(self) -> str | None:
        for _ in range(2):
            while self._probe_order:
                node = self._probe_order.pop()
                m = self.members.get(node)
                if m is not None and m.state in (ALIVE, SUSPECT):
                    return node
            self._probe_order = [n for n in self.members if n != self.node_id]
            self.rng.shuffle(self._probe_order)
        return None

    def _start_probe(self, now: float, out: Outbox) -> None:
        if self._probe is not None and not self._probe.acked and self._probe.end_at > now:
            self._next_probe = self._probe.end_at
            return
        self._next_probe = now + self.config.probe_interval * self._scale()
        target = self._pick_probe_target()
        if target is None:
            self._probe = None
            return
        self._seq += 1
        self._probe = _Probe(
            self._seq,
            target,
            now + self.config.probe_timeout * self._scale(),
            now + self.config.probe_interval * self._scale(),
        )
        out.send(target, Ping(self.node_id, self._seq, target, self.epoch, self.piggyback()))

    def _send_indirect(self, p: _Probe, out: Outbox) -> None:
        peers = [
            n
            for n, m in self.members.items()
            if n not in (self.node_id, p.target) and m.state == ALIVE
        ]
        k = min(self.config.indirect_checks, len(peers))
        for peer in self.rng.sample(peers, k):
            out.send(peer, PingReq(self.node_id, p.seq, p.target, self.epoch))

    def _probe_failed(self, now: float, p: _Probe, out: Outbox) -> None:
        self._probe = None
        self.awareness = min(self.awareness + 1, self.config.awareness_max - 1)
        m = self.members.get(p.target)
        if m is not None and m.state == ALIVE:
            self.apply(now, Suspect(p.target, m.incarnation, self.node_id), out)

    def _gossip_targets(self, now: float) -> list[str]:
        cands = [
            n
            for n, m in self.members.items()
            if n != self.node_id
            and (
                m.state in (ALIVE, SUSPECT)
                or (m.state == DEAD and now - m.since < self.config.gossip_to_dead)
            )
        ]
        return self.rng.sample(cands, min(self.config.gossip_nodes, len(cands)))

    def _gossip(self, now: float, out: Outbox) -> None:
        if not len(self.queue):
            return
        for target in self._gossip_targets(now):
            items = self.piggyback()
            if not items:
                break
            out.send(target, Gossip(self.node_id, self.epoch, tuple(items)))

    def _join_sync(self, now: float, out: Outbox) -> None:
        """After start, merge tables with a random live peer every join_sync_interval, backing
        off while the view stays unchanged (see the module docstring)."""
        known = len(self.members)
        self._sync_idle = 0 if known != self._sync_known else self._sync_idle + 1
        self._sync_known = known
        if self.leaving or self._sync_idle > self.config.join_sync_backoffs:
            self._sync_at = math.inf
            return
        self._sync_at = now + self.config.join_sync_interval * 2**self._sync_idle
        peers = [n for n in self._alive_ids if n != self.node_id]
        if known > self._sync_base and peers:
            # member records only: versioned state is the node's and keeps to its gossip and
            # periodic push-pull; the peer's reply is a full push-pull as usual
            msg = PushPull(self.node_id, False, self.full_state(), (), self.epoch)
            out.send(self.rng.choice(peers), msg)

    def piggyback(self) -> tuple[Item, ...]:
        return tuple(self.queue.take(self.config.max_piggyback))

    def push_pull_target(self) -> str | None:
        """A random other member, dead ones included (that is how partitions re-merge)."""
        cands = [n for n, m in self.members.items() if n != self.node_id and m.state != LEFT]
        return self.rng.choice(cands) if cands else None

    # ---- messages ----------------------------------------------------------------------

    def on_ping(self, now: float, msg: Ping, out: Outbox) -> None:
        if msg.target == self.node_id:
            out.send(msg.sender, Ack(self.node_id, msg.seq, self.epoch, self.piggyback()))

    def on_ping_req(self, now: float, msg: PingReq, out: Outbox) -> None:
        self._seq += 1
        self._relays[self._seq] = (msg.sender, msg.seq, now + 2 * self.config.probe_interval)
        if len(self._relays) > 256:
            self._relays = {k: v for k, v in self._relays.items() if v[2] > now}
        out.send(msg.target, Ping(self.node_id, self._seq, msg.target, self.epoch))

    def on_ack(self, now: float, msg: Ack, out: Outbox) -> None:
        relay = self._relays.pop(msg.seq, None)
        if relay is not None:
            out.send(relay[0], Ack(self.node_id, relay[1], self.epoch))
            return
        p = self._probe
        if p is not None and p.seq == msg.seq and not p.acked:
            p.acked = True
            self.awareness = max(self.awareness - 1, 0)

    # ---- state rules (memberlist's aliveNode / suspectNode / deadNode) -----------------

    def apply(self, now: float, item: Alive | Suspect | Dead, out: Outbox) -> None:
        if isinstance(item, Alive):
            self._alive(now, item, out)
        elif isinstance(item, Suspect):
            self._suspect(now, item, out)
        else:
            self._dead(now, item, out)

    def merge_remote(
        self, now: float, state: tuple[Alive | Suspect | Dead, ...], out: Outbox
    ) -> None:
        """Push-pull merge: a remote dead is taken as suspect so the node can still refute."""
        for rec in state:
            if isinstance(rec, Alive):
                self._alive(now, rec, out)
            elif not (isinstance(rec, Dead) and rec.left):
                self._suspect(now, Suspect(rec.node, rec.incarnation, rec.by), out)
            else:
                self._dead(now, rec, out)

    def _refute(self, incarnation: int) -> None:
        me = self.members[self.node_id]
        self.incarnation = max(self.incarnation, incarnation) + 1
        me.incarnation = self.incarnation
        me.state = ALIVE
        self.awareness = min(self.awareness + 1, self.config.awareness_max - 1)
        self.queue.push(("m", self.node_id), self.record(me))

    def _alive(self, now: float, a: Alive, out: Outbox) -> None:
        if a.node == self.node_id:
            if a.incarnation > self.incarnation and not self.leaving:
                self._refute(a.incarnation)
            return
        m = self.members.get(a.node)
        if m is None:
            m = Member(a.node, a.addr, a.capacity, a.incarnation, ALIVE, now)
            self.members[a.node] = m
        elif a.incarnation <= m.incarnation:
            return
        else:
            m.incarnation, m.addr, m.capacity = a.incarnation, a.addr, a.capacity
            was = m.state
            m.state, m.since = ALIVE, now
            if was == ALIVE:
                self.changes += 1  # capacity or address may differ
                self.queue.push(("m", a.node), a)
                return
        self._suspicions.pop(a.node, None)
        self.queue.push(("m", a.node), a)
        self._recount()
        out.emit(MemberAlive(a.node, a.addr, a.capacity, a.incarnation))

    def _suspect(self, now: float, s: Suspect, out: Outbox) -> None:
        m = self.members.get(s.node)
        if m is None or s.incarnation < m.incarnation or m.state in (DEAD, LEFT):
            return
        if s.node == self.node_id:
            if not self.leaving:
                self._refute(s.incarnation)
            return
        if m.state == SUSPECT and s.incarnation == m.incarnation:
            sus = self._suspicions.get(s.node)
            if sus is not None and s.by not in sus.by:
                sus.by.add(s.by)
                self.queue.push(("m", s.node), s)
            return
        m.incarnation, m.state, m.since = s.incarnation, SUSPECT, now
        lo, hi = self.config.suspicion_bounds(self.live_count())
        k = int(self.config.suspicion_mult) - 2
        self._suspicions[s.node] = _Suspicion(now, lo, hi, k, {s.by})
        self.queue.push(("m", s.node), s)
        out.emit(MemberSuspect(s.node, s.incarnation))

    def _dead(self, now: float, d: Dead, out: Outbox) -> None:
        m = self.members.get(d.node)
        if m is None or d.incarnation < m.incarnation:
            return
        if m.state == LEFT or (m.state == DEAD and not d.left):
            return
        if d.node == self.node_id:
            if not self.leaving:
                self._refute(d.incarnation)
            return
        m.incarnation, m.state, m.since = d.incarnation, (LEFT if d.left else DEAD), now
        self._suspicions.pop(d.node, None)
        self.queue.push(("m", d.node), d)
        self._recount()
        out.emit(MemberDead(d.node, d.incarnation, d.left))

    def leave(self, now: float) -> Dead:
        """Graceful leave: broadcast our own death as `left` (gossip it before stopping)."""
        self.leaving = True
        me = self.members[self.node_id]
        me.state = LEFT
        self._recount()
        d = Dead(self.node_id, self.incarnation, self.node_id, left=True)
        self.queue.push(("m", self.node_id), d)
        return d
