"""Leaderless placement consensus: one single-decree Paxos instance per epoch.

Epoch e+1 is decided by the members of epoch e's decision (the genesis set for epoch 1),
with majority quorums. Any node may propose; ballots are (round, node id) and a proposer that
is refused or times out retries with a higher round after a randomised backoff. Acceptors
verify a value by recomputing the injected, deterministic placement from the inputs the value
carries, and write promises and acceptances to `Storage` before replying. Decided values form
a contiguous log; a node that missed epochs asks a peer for the rest (`CatchUp`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from edgemoe.cluster.config import ClusterConfig
from edgemoe.cluster.effects import Decided, Proposed
from edgemoe.cluster.messages import (
    Accept,
    Accepted,
    Ballot,
    CatchUp,
    Learn,
    Nack,
    Prepare,
    Promise,
    Proposal,
    Shard,
    Snapshot,
    digest,
)
from edgemoe.cluster.outbox import Outbox
from edgemoe.cluster.storage import AcceptorState, Storage

MAX_LEARN = 32


@dataclass(frozen=True)
class PlacementInputs:
    """What the injected placement function sees: sorted members and the snapshots used."""

    epoch: int
    members: tuple[tuple[str, int], ...]  # (node id, capacity bytes), sorted by node id
    snapshots: tuple[Snapshot, ...]  # sorted by origin


PlacementFn = Callable[[PlacementInputs], Mapping[str, Iterable[Shard]]]


class PlacementPending(Exception):
    """Raised by a placement function computing elsewhere (a worker, off the event loop):
    ask again later. A proposal trigger stays armed; an acceptor's driver computes a value's
    placement before it hands the Accept over (`placement_inputs`)."""


def placement_inputs(
    epoch: int, members: Iterable[tuple[str, int]], snapshots: Iterable[Snapshot]
) -> PlacementInputs:
    """The placement function's inputs for a value with these members and snapshots."""
    mem = tuple(sorted((str(n), int(c)) for n, c in members))
    return PlacementInputs(epoch, mem, tuple(sorted(snapshots, key=lambda s: s.origin)))


def stats_digest(snapshots: Iterable[Snapshot]) -> str:
    return digest(tuple((s.origin, s.version) for s in snapshots))


def normalize(
    members: Iterable[str], assignment: Mapping[str, Iterable[Shard]]
) -> tuple[tuple[str, tuple[Shard, ...]], ...]:
    """Sorted ((node, sorted shards), ...) over every member; raises on a non-member key."""
    ids = sorted(members)
    extra = set(assignment) - set(ids)
    if extra:
        raise ValueError(f"placement assigned shards to non-members {sorted(extra)}")
    return tuple(
        (n, tuple(sorted((int(l), int(e)) for l, e in assignment.get(n, ())))) for n in ids
    )


def make_plan(
    prev: Proposal | None, assignment: tuple[tuple[str, tuple[Shard, ...]], ...]
) -> tuple[tuple[int, int, str, str], ...]:
    """Moves from the previous decision: each new (shard, holder) with a suggested source
    (a previous holder that stays a member, else "" = load from disk)."""
    members = {n for n, _ in assignment}
    prev_holders: dict[Shard, list[str]] = {}
    prev_of: dict[str, frozenset[Shard]] = {}
    if prev is not None:
        for n, shards in prev.assignment:
            prev_of[n] = frozenset(shards)
            for s in shards:
                prev_holders.setdefault(s, []).append(n)
    plan = []
    for n, shards in assignment:
        for s in shards:
            if s in prev_of.get(n, frozenset()):
                continue
            src = sorted(h for h in prev_holders.get(s, ()) if h in members and h != n)
            plan.append((s[0], s[1], src[0] if src else "", n))
    return tuple(sorted(plan))


def build_proposal(
    epoch: int,
    members: Iterable[tuple[str, int]],
    snapshots: Iterable[Snapshot],
    placement: PlacementFn,
    prev: Proposal | None,
    proposer: str,
    reason: str,
    forced: bool = False,
) -> Proposal:
    inputs = placement_inputs(epoch, members, snapshots)
    mem, snaps = inputs.members, inputs.snapshots
    assignment = normalize((n for n, _ in mem), placement(inputs))
    return Proposal(
        epoch=epoch,
        members=mem,
        snapshots=snaps,
        stats_digest=stats_digest(snaps),
        assignment=assignment,
        plan=make_plan(prev, assignment),
        proposer=proposer,
        reason=reason,
        forced=forced,
    )


def check_proposal(value: Proposal, prev: Proposal | None, placement: PlacementFn) -> str | None:
    """Why `value` is not a well-formed, recomputable successor of `prev` (None if it is)."""
    if value.epoch != (prev.epoch + 1 if prev else 1):
        return "wrong epoch"
    ids = [n for n, _ in value.members]
    if not ids or ids != sorted(set(ids)) or any(c < 0 for _, c in value.members):
        return "members must be non-empty, sorted, unique, capacities >= 0"
    try:
        again = build_proposal(
            value.epoch,
            value.members,
            value.snapshots,
            placement,
            prev,
            value.proposer,
            value.reason,
            value.forced,
        )
    except (ValueError, TypeError) as exc:
        return f"placement failed: {exc}"
    if again != value:
        return "placement or plan does not match its recomputation"
    return None


@dataclass
class _Proposer:
    epoch: int
    value: Proposal
    acceptors: tuple[str, ...]
    forced_members: tuple[str, ...]
    round: int
    phase: int = 0  # 0 waiting to start, 1 preparing, 2 accepting
    start_at: float = 0.0
    deadline: float = 0.0
    resend_at: float = 0.0
    attempt: int = 0
    promises: dict[str, Promise] = field(default_factory=dict)
    accepted: set[str] = field(default_factory=set)
    chosen: Proposal | None = None

    @property
    def ballot(self) -> Ballot:
        return (self.round, self.value.proposer)


class Consensus:
    """Acceptor, proposer and learner of one node."""

    def __init__(
        self,
        node_id: str,
        storage: Storage,
        placement: PlacementFn,
        config: ClusterConfig,
        rng: random.Random,
        genesis: Iterable[str],
    ) -> None:
        self.node_id = node_id
        self.storage = storage
        self.placement = placement
        self.config = config
        self.rng = rng
        self.genesis = tuple(sorted(set(genesis)))
        self.log: list[Proposal] = storage.decisions()
        self.messages_sent = 0
        self._prop: _Proposer | None = None
        self._max_round: dict[int, int] = {}

    # ---- views -------------------------------------------------------------------------

    @property
    def last_epoch(self) -> int:
        return len(self.log)

    @property
    def current(self) -> Proposal | None:
        return self.log[-1] if self.log else None

    def acceptors(self) -> tuple[str, ...]:
        """Who decides the next epoch: the last decision's members, else the genesis set."""
        cur = self.current
        return cur.member_ids() if cur is not None else self.genesis

    def proposing(self) -> bool:
        return self._prop is not None

    def next_deadline(self) -> float:
        p = self._prop
        if p is None:
            return float("inf")
        return p.start_at if p.phase == 0 else min(p.deadline, p.resend_at)

    # ---- proposer ----------------------------------------------------------------------

    def propose(
        self, now: float, value: Proposal, out: Outbox, forced_members: Iterable[str] = ()
    ) -> None:
        """Start deciding epoch value.epoch (= last_epoch + 1) with `value` as our candidate."""
        if value.epoch != self.last_epoch + 1:
            raise ValueError(f"proposal for epoch {value.epoch}, next is {self.last_epoch + 1}")
        forced = tuple(sorted(set(forced_members)))
        acceptors = forced or self.acceptors()
        rnd = self._max_round.get(value.epoch, 0) + 1
        self._prop = _Proposer(value.epoch, value, acceptors, forced, rnd, start_at=now)
        self._start_phase1(now, out)

    def _quorum(self, p: _Proposer) -> int:
        return len(p.acceptors) // 2 + 1

    def _start_phase1(self, now: float, out: Outbox) -> None:
        p = self._prop
        assert p is not None
        p.round = max(p.round, self._max_round.get(p.epoch, 0) + 1)
        self._max_round[p.epoch] = p.round
        p.phase, p.promises, p.accepted, p.chosen = 1, {}, set(), None
        p.deadline = now + self.config.consensus_timeout
        self._send_phase(now, p, out)

    def _send_phase(self, now: float, p: _Proposer, out: Outbox) -> None:
        """(Re)send this phase's request to every acceptor that has not answered it yet."""
        p.resend_at = now + self.config.consensus_resend
        if p.phase == 1:
            for a in p.acceptors:
                if a not in p.promises:
                    self._send(out, a, Prepare(self.node_id, p.epoch, p.ballot, p.forced_members))
        else:
            assert p.chosen is not None
            for a in p.acceptors:
                if a not in p.accepted:
                    msg = Accept(self.node_id, p.epoch, p.ballot, p.chosen, p.forced_members)
                    self._send(out, a, msg)

    def _retry(self, now: float) -> None:
        p = self._prop
        assert p is not None
        p.attempt += 1
        p.phase = 0
        cap = min(p.attempt, 8)
        p.start_at = now + self.rng.uniform(0, self.config.consensus_backoff * cap)

    def tick(self, now: float, out: Outbox) -> None:
        p = self._prop
        if p is None:
            return
        if p.phase == 0 and now >= p.start_at:
            self._start_phase1(now, out)
        elif p.phase in (1, 2) and now >= p.deadline:
            self._retry(now)
        elif p.phase in (1, 2) and now >= p.resend_at:
            self._send_phase(now, p, out)

    def _send(self, out: Outbox, dest: str, msg: object) -> None:
        self.messages_sent += 1
        out.send(dest, msg)

    # ---- messages ----------------------------------------------------------------------

    def handle(self, now: float, msg: object, out: Outbox) -> None:
        if isinstance(msg, Prepare):
            self._on_prepare(now, msg, out)
        elif isinstance(msg, Accept):
            self._on_accept(now, msg, out)
        elif isinstance(msg, Promise):
            self._on_promise(now, msg, out)
        elif isinstance(msg, Accepted):
            self._on_accepted(now, msg, out)
        elif isinstance(msg, Nack):
            self._on_nack(now, msg, out)
        elif isinstance(msg, Learn):
            self.learn(now, msg.decisions, out, msg.sender)
        elif isinstance(msg, CatchUp):
            rest = self.log[max(msg.after, 0) : max(msg.after, 0) + MAX_LEARN]
            if rest:
                self._send(out, msg.sender, Learn(self.node_id, tuple(rest)))

    def _note_round(self, epoch: int, ballot: Ballot | None) -> None:
        if ballot is not None and ballot[0] > self._max_round.get(epoch, 0):
            self._max_round[epoch] = ballot[0]

    def _acceptor_gate(self, epoch: int, forced: tuple[str, ...], sender: str, out: Outbox) -> bool:
        """True if we can act as an acceptor of `epoch` now; else help the sender or catch up."""
        if epoch <= self.last_epoch:
            rest = self.log[epoch - 1 : epoch - 1 + MAX_LEARN]
            self._send(out, sender, Learn(self.node_id, tuple(rest)))
            return False
        if epoch > self.last_epoch + 1:
            self._send(out, sender, CatchUp(self.node_id, self.last_epoch))
            return False
        return self.node_id in (forced or self.acceptors())

    def _on_prepare(self, now: float, m: Prepare, out: Outbox) -> None:
        self._note_round(m.epoch, m.ballot)
        if not self._acceptor_gate(m.epoch, m.forced_members, m.sender, out):
            return
        st = self.storage.acceptor(m.epoch)
        if st.promised is None or m.ballot >= st.promised:
            if st.promised != m.ballot:
                st = AcceptorState(m.ballot, st.accepted_ballot, st.accepted_value)
                self.storage.save_acceptor(m.epoch, st)
            reply = Promise(self.node_id, m.epoch, m.ballot, st.accepted_ballot, st.accepted_value)
            self._send(out, m.sender, reply)
        else:
            self._send(out, m.sender, Nack(self.node_id, m.epoch, m.ballot, st.promised))

    def _on_accept(self, now: float, m: Accept, out: Outbox) -> None:
        self._note_round(m.epoch, m.ballot)
        if not self._acceptor_gate(m.epoch, m.forced_members, m.sender, out):
            return
        try:
            why = check_proposal(m.value, self.current, self.placement)
        except PlacementPending:  # not computed here yet: unanswered, the proposer retries
            return
        if why is None and bool(m.forced_members) != m.value.forced:
            why = "forced flag does not match the acceptor set"
        if why is None and m.forced_members and m.value.member_ids() != m.forced_members:
            why = "forced members differ from the value's members"
        st = self.storage.acceptor(m.epoch)
        if why is not None:
            self._send(out, m.sender, Nack(self.node_id, m.epoch, m.ballot, st.promised, why))
            return
        if st.promised is None or m.ballot >= st.promised:
            if st.accepted_ballot != m.ballot:
                self.storage.save_acceptor(m.epoch, AcceptorState(m.ballot, m.ballot, m.value))
            self._send(out, m.sender, Accepted(self.node_id, m.epoch, m.ballot))
        else:
            self._send(out, m.sender, Nack(self.node_id, m.epoch, m.ballot, st.promised))

    def _mine(self, epoch: int, ballot: Ballot, phase: int) -> _Proposer | None:
        p = self._prop
        if p is None or p.epoch != epoch or p.ballot != ballot or p.phase != phase:
            return None
        return p

    def _on_promise(self, now: float, m: Promise, out: Outbox) -> None:
        p = self._mine(m.epoch, m.ballot, 1)
        if p is None or m.sender not in p.acceptors:
            return
        p.promises[m.sender] = m
        if len(p.promises) < self._quorum(p):
            return
        # A value accepted under the other quorum system (normal vs operator-forced members)
        # cannot be re-proposed here (acceptors would refuse it forever); a forced epoch is the
        # operator's override of a quorum that is lost, so it carries its own value.
        prior = [
            x
            for x in p.promises.values()
            if x.accepted_ballot is not None
            and x.accepted_value is not None
            and x.accepted_value.forced == bool(p.forced_members)
            and (not p.forced_members or x.accepted_value.member_ids() == p.forced_members)
        ]
        if prior:
            best = max(prior, key=lambda x: x.accepted_ballot or (0, ""))
            p.chosen = best.accepted_value
        else:
            p.chosen = p.value
        assert p.chosen is not None
        p.phase = 2
        p.deadline = now + self.config.consensus_timeout
        out.emit(Proposed(p.chosen))
        self._send_phase(now, p, out)

    def _on_accepted(self, now: float, m: Accepted, out: Outbox) -> None:
        p = self._mine(m.epoch, m.ballot, 2)
        if p is None or m.sender not in p.acceptors:
            return
        p.accepted.add(m.sender)
        if len(p.accepted) >= self._quorum(p):
            value = p.chosen
            assert value is not None
            targets = set(p.acceptors) | set(value.member_ids())
            self.learn(now, (value,), out, None)
            for t in sorted(targets - {self.node_id}):
                self._send(out, t, Learn(self.node_id, (value,)))

    def _on_nack(self, now: float, m: Nack, out: Outbox) -> None:
        self._note_round(m.epoch, m.promised)
        p = self._prop
        if p is None or p.epoch != m.epoch or p.ballot != m.ballot or p.phase == 0:
            return
        if m.reason and m.promised is not None and m.promised > p.ballot:
            self._retry(now)
        elif m.reason:
            return  # one acceptor disagrees with the value; a quorum may still accept it
        else:
            self._retry(now)

    # ---- learner -----------------------------------------------------------------------

    def learn(
        self, now: float, values: Iterable[Proposal], out: Outbox, sender: str | None
    ) -> list[Proposal]:
        """Append decided values that extend our log (in order); ask `sender` for any gap."""
        new: list[Proposal] = []
        for v in sorted(values, key=lambda v: v.epoch):
            if v.epoch != self.last_epoch + 1:
                continue
            self.storage.append_decision(v)
            self.log.append(v)
            new.append(v)
            out.emit(Decided(v.epoch, v))
        if self._prop is not None and self._prop.epoch <= self.last_epoch:
            self._prop = None
        if sender is not None and any(v.epoch > self.last_epoch + 1 for v in values):
            self._send(out, sender, CatchUp(self.node_id, self.last_epoch))
        return new

    def abandon(self) -> None:
        self._prop = None
