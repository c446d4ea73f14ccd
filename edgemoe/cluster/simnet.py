"""Seeded, deterministic network simulator for the cluster cores.

One event heap drives N `Node`s: messages get a per-link base delay times random jitter (so
they reorder), may be lost or duplicated, are dropped across partitions; nodes crash (losing
memory, keeping their `MemoryStorage`) and restart; each node's clock runs at its own rate.
Shard fetches take `fetch_time` and succeed only if the source still holds the shard and is
reachable. Everything random comes from one seed, so a `Scenario` replays exactly; the trace
records every fault, decision and shard event (and, with trace_messages, every delivery).
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

from edgemoe.cluster.config import ClusterConfig
from edgemoe.cluster.consensus import PlacementFn, PlacementInputs
from edgemoe.cluster.effects import (
    AnnounceHolding,
    Decided,
    DropShard,
    FetchShard,
    MemberDead,
    Proposed,
)
from edgemoe.cluster.invariants import InvariantChecker
from edgemoe.cluster.messages import Alive, Prepare, Shard, from_wire, to_wire
from edgemoe.cluster.node import Node
from edgemoe.cluster.outbox import Outbox
from edgemoe.cluster.storage import MemoryStorage


def capacity_round_robin(
    num_layers: int, num_experts: int, expert_bytes: int, replicas: int = 1
) -> PlacementFn:
    """A cheap deterministic placement: shards in order, each to the member(s) with the most
    free capacity left (ties by node id), `replicas` copies when members allow."""

    def place(inputs: PlacementInputs) -> dict[str, frozenset[Shard]]:
        free = {n: c // max(expert_bytes, 1) for n, c in inputs.members}
        out: dict[str, set[Shard]] = {n: set() for n, _ in inputs.members}
        for l in range(num_layers):
            for e in range(num_experts):
                order = sorted(free, key=lambda n: (-free[n], n))
                for n in order[: min(replicas, len(order))]:
                    if free[n] <= 0:
                        break
                    out[n].add((l, e))
                    free[n] -= 1
        return {n: frozenset(s) for n, s in out.items()}

    return place


@dataclass(frozen=True)
class Scenario:
    """Everything that determines a run; `replay` of the same scenario gives the same trace."""

    nodes: int = 8
    seed: int = 0
    duration: float = 30.0
    loss: float = 0.0
    duplicate: float = 0.0
    delay_min: float = 0.0005
    delay_max: float = 0.005
    jitter: float = 1.0  # delay = base * (1 + Exp(jitter)): higher means more reordering
    drift: float = 0.0  # each clock runs at a rate in [1 - drift, 1 + drift]
    start_spread: float = 1.0
    # (start, end, groups): nodes by index; a message crosses only inside one group.
    partitions: tuple[tuple[float, float, tuple[tuple[int, ...], ...]], ...] = ()
    # (time, node index, down for seconds or inf)
    crashes: tuple[tuple[float, int, float], ...] = ()
    genesis: int = 0  # first k nodes form the genesis acceptor set (0: all)
    layers: int = 4
    experts: int = 8
    expert_bytes: int = 1000
    capacity_slots: int = 16  # each node's capacity in shards
    replicas: int = 1
    fetch_time: float = 0.2
    stats_every: float = 0.0  # publish a statistics snapshot this often (0: never)
    fast_config: bool = True
    wire: bool = False  # round-trip every message through to_wire/msgpack/from_wire
    trace_messages: bool = False
    check_every: float = 0.5
    # every node starts (at once) knowing every other as alive, as from a static member list;
    # lets large clusters skip the mass join and measure one change spreading
    preload: bool = False

    def describe(self) -> str:
        return f"Scenario(**{asdict(self)!r})"


@dataclass
class RunResult:
    scenario: Scenario
    violations: dict[str, int]
    examples: list[str]
    trace_digest: str
    decided_epochs: int
    first_decision_at: float | None
    converged_at: float | None
    messages: int
    consensus_messages: int
    msgs_per_node_s: float
    lost_to_crash: int = 0
    decisions_at: list[float] = field(default_factory=list)


class SimNet:
    """The simulated cluster; `run()` to `scenario.duration`, then read the results."""

    def __init__(self, scenario: Scenario, placement: PlacementFn | None = None) -> None:
        sc = scenario
        self.sc = sc
        self.rng = random.Random(sc.seed)
        self.config = ClusterConfig.fast() if sc.fast_config else ClusterConfig.lan()
        self.placement = placement or capacity_round_robin(
            sc.layers, sc.experts, sc.expert_bytes, sc.replicas
        )
        self.ids = [f"n{i:04d}" for i in range(sc.nodes)]
        self.index = {n: i for i, n in enumerate(self.ids)}
        k = sc.genesis or sc.nodes
        self.genesis = tuple(self.ids[:k])
        self.storage = {n: MemoryStorage() for n in self.ids}
        self.nodes: dict[str, Node | None] = dict.fromkeys(self.ids)
        self.rate = {n: 1 + self.rng.uniform(-sc.drift, sc.drift) for n in self.ids}
        self.offset = {n: self.rng.uniform(0, 100) for n in self.ids}
        self.truth: dict[str, set[Shard]] = {n: set() for n in self.ids}
        # node -> (version, shards) -> boot in which it was announced (last one)
        self.announced: dict[str, dict[tuple[int, frozenset[Shard]], int]] = {
            n: {} for n in self.ids
        }
        self.boot: dict[str, int] = dict.fromkeys(self.ids, 0)
        self.checker = InvariantChecker()
        self.trace: list[tuple[Any, ...]] = []
        self.now = 0.0
        self._heap: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self._tick_at: dict[str, float] = {}
        self._link: dict[tuple[str, str], float] = {}
        self._groups: dict[str, int] | None = None
        self.messages = 0
        self.sent_by_type: dict[str, int] = {}
        self.decisions_at: list[float] = []
        self.converged_at: float | None = None
        self.started: set[str] = set()
        self.last_start = 0.0
        self.first_prepare: dict[int, float] = {}
        self.first_decided: dict[int, float] = {}
        # (time, observer, subject) for every MemberDead effect
        self.deaths: list[tuple[float, str, str]] = []
        for i, n in enumerate(self.ids):
            at = self.rng.uniform(0, sc.start_spread) if i and not sc.preload else 0.0
            self._push(at, "start", n)
        for start, end, groups in sc.partitions:
            self._push(start, "partition", groups)
            self._push(end, "heal", None)
        for t, i, down in sc.crashes:
            self._push(t, "crash", (self.ids[i % sc.nodes], down))
        if sc.stats_every > 0:
            self._push(sc.stats_every, "stats", None)
        self._push(sc.check_every, "check", None)

    # ---- plumbing ----------------------------------------------------------------------

    def _push(self, t: float, kind: str, data: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, data))

    def local(self, node: str, t: float) -> float:
        return self.offset[node] + t * self.rate[node]

    def _global(self, node: str, local: float) -> float:
        return (local - self.offset[node]) / self.rate[node]

    def _reachable(self, a: str, b: str) -> bool:
        g = self._groups
        return g is None or g.get(a, -1) == g.get(b, -2)

    def _delay(self, a: str, b: str) -> float:
        base = self._link.get((a, b))
        if base is None:
            h = hashlib.blake2b(f"{self.sc.seed}:{a}:{b}".encode(), digest_size=8).digest()
            u = int.from_bytes(h, "little") / 2**64
            base = self.sc.delay_min + u * (self.sc.delay_max - self.sc.delay_min)
            self._link[(a, b)] = base
        return base * (1 + self.rng.expovariate(1 / self.sc.jitter) if self.sc.jitter else 1)

    def _arm(self, node: str) -> None:
        n = self.nodes[node]
        if n is None:
            return
        dl = n.next_deadline()
        if math.isinf(dl):
            return
        t = max(self._global(node, dl), self.now + 1e-6)
        cur = self._tick_at.get(node)
        if cur is not None and cur <= t and cur >= self.now:
            return
        self._tick_at[node] = t
        self._push(t, "tick", (node, self.boot[node]))

    def _deliver_out(self, src: str, out: Outbox) -> None:
        for dest, msg in out.messages:
            self.messages += 1
            name = type(msg).__name__
            self.sent_by_type[name] = self.sent_by_type.get(name, 0) + 1
            if isinstance(msg, Prepare):
                self.first_prepare.setdefault(msg.epoch, self.now)
            if self.sc.wire:
                msg = from_wire(msgpack.unpackb(msgpack.packb(to_wire(msg)), raw=False))
            if self.rng.random() < self.sc.loss or not self._reachable(src, dest):
                continue
            copies = 2 if self.rng.random() < self.sc.duplicate else 1
            for _ in range(copies):
                self._push(self.now + self._delay(src, dest), "msg", (src, dest, msg))
        for eff in out.effects:
            self._effect(src, eff)
        self._arm(src)

    def _effect(self, node: str, eff: Any) -> None:
        if isinstance(eff, MemberDead):
            self.deaths.append((self.now, node, eff.node))
            self.trace.append((self.now, "dead", node, eff.node))
        elif isinstance(eff, Proposed):
            self.checker.proposed_value(eff.value)
        elif isinstance(eff, Decided):
            self.checker.decided_value(node, eff.value)
            self.decisions_at.append(self.now)
            self.first_decided.setdefault(eff.epoch, self.now)
            self.trace.append((self.now, "decided", node, eff.epoch, eff.value.reason))
        elif isinstance(eff, AnnounceHolding):
            self.announced[node][(eff.version, frozenset(eff.shards))] = self.boot[node]
        elif isinstance(eff, FetchShard):
            self.trace.append((self.now, "fetch", node, eff.layer, eff.expert, eff.sources))
            self._push(
                self.now + self.sc.fetch_time,
                "fetched",
                (node, self.boot[node], (eff.layer, eff.expert), eff.sources),
            )
        elif isinstance(eff, DropShard):
            shard = (eff.layer, eff.expert)
            live = {n: s for n, s in self.truth.items() if self.nodes[n] is not None}
            self.checker.drop(node, shard, live, self._relied_on_crashed(node, shard))
            self.truth[node].discard(shard)
            self.trace.append((self.now, "drop", node, eff.layer, eff.expert))

    def _known(self, viewer: Node, holder: str) -> tuple[int, frozenset[Shard]]:
        """(version, shards) of `holder`'s announcement as `viewer` knows it."""
        return viewer.holdings.version(holder), viewer.routing.holdings_of(holder)

    def _relied_on_crashed(self, node: str, shard: Shard) -> bool:
        """Whether a holder `node` saw announcing `shard` crashed after that announcement."""
        n = self.nodes[node]
        assert n is not None
        for h in n.routing.holders(shard, n.is_alive):
            boot = self.announced[h].get(self._known(n, h))
            if h != node and (self.nodes[h] is None or boot != self.boot[h]):
                return True
        return False

    # ---- events ------------------------------------------------------------------------

    def _start(self, node: str) -> None:
        n = Node(
            node,
            f"sim://{node}",
            self.sc.capacity_slots * self.sc.expert_bytes,
            storage=self.storage[node],
            placement=self.placement,
            genesis=self.genesis,
            config=self.config,
            seed=self.sc.seed * 1000003 + self.boot[node],
        )
        self.nodes[node] = n
        self.started.add(node)
        self.last_start = self.now
        self.trace.append((self.now, "start", node))
        t = self.local(node, self.now)
        if self.sc.preload:
            cap = self.sc.capacity_slots * self.sc.expert_bytes
            n.membership.preload(t, [Alive(p, 0, f"sim://{p}", cap) for p in self.ids if p != node])
            self._deliver_out(node, n.start(t))
            return
        out = n.start(t)
        peers = [p for p in self.ids if p != node and self.nodes[p] is not None]
        seeds = [self.ids[0]] if node != self.ids[0] else []
        if peers:
            seeds += self.rng.sample(peers, min(2, len(peers)))
        join = n.join(t, [(s, f"sim://{s}") for s in dict.fromkeys(seeds) if s != node])
        out.messages += join.messages
        self._deliver_out(node, out)

    def _fetched(self, node: str, boot: int, shard: Shard, sources: tuple[str, ...]) -> None:
        n = self.nodes[node]
        if n is None or boot != self.boot[node]:
            return
        t = self.local(node, self.now)
        ok = not sources or any(
            self.nodes[s] is not None and shard in self.truth[s] and self._reachable(s, node)
            for s in sources
        )
        if ok:
            self.truth[node].add(shard)
            self._deliver_out(node, n.shard_loaded(t, *shard))
        else:
            self._deliver_out(node, n.shard_failed(t, *shard))

    def _crash(self, node: str, down: float) -> None:
        if self.nodes[node] is None:
            return
        self.nodes[node] = None
        self.truth[node] = set()
        self.boot[node] += 1
        self._tick_at.pop(node, None)
        self.trace.append((self.now, "crash", node))
        if not math.isinf(down):
            self._push(self.now + down, "start", node)

    def _publish_stats(self) -> None:
        for node in self.ids:
            n = self.nodes[node]
            if n is not None:
                payload = {"rate": round(self.rng.random(), 3)}
                self._deliver_out(node, n.publish_stats(self.local(node, self.now), payload))
        self._push(self.now + self.sc.stats_every, "stats", None)

    def live(self) -> list[str]:
        return [n for n in self.ids if self.nodes[n] is not None]

    def membership_converged(self) -> bool:
        """Every running node sees exactly the running nodes as alive."""
        live = self.live()
        want = len(live)
        for node in live:
            n = self.nodes[node]
            assert n is not None
            if n.membership.live_count() != want:
                return False
        if want == len(self.ids):
            return True
        ref = sorted(live)
        return all(n.alive_members() == ref for x in live if (n := self.nodes[x]) is not None)

    def _check(self) -> None:
        everyone = len(self.started) == len(self.ids)
        if self.converged_at is None and everyone and self.membership_converged():
            self.converged_at = self.now
            self.trace.append((self.now, "converged"))
        live = self.live()
        for node in self.rng.sample(live, min(4, len(live))):
            n = self.nodes[node]
            assert n is not None
            table = n.routing_table()
            holders = {h for hs in table.values() for h in hs}
            known = {h: self._known(n, h) for h in holders}
            self.checker.routing(node, table, known, self.announced)
        self._push(self.now + self.sc.check_every, "check", None)

    def step(self) -> bool:
        if not self._heap:
            return False
        t, _, kind, data = heapq.heappop(self._heap)
        if t > self.sc.duration:
            heapq.heappush(self._heap, (t, 0, kind, data))
            return False
        self.now = t
        if kind == "msg":
            src, dest, msg = data
            n = self.nodes[dest]
            if n is None or not self._reachable(src, dest):
                return True
            if self.sc.trace_messages:
                self.trace.append((t, "deliver", src, dest, type(msg).__name__))
            self._deliver_out(dest, n.handle(self.local(dest, t), msg))
        elif kind == "tick":
            node, boot = data
            n = self.nodes[node]
            if n is None or boot != self.boot[node] or self._tick_at.get(node) != t:
                return True
            del self._tick_at[node]
            self._deliver_out(node, n.tick(self.local(node, t)))
        elif kind == "start":
            if self.nodes[data] is None:
                self._start(data)
        elif kind == "fetched":
            self._fetched(*data)
        elif kind == "crash":
            self._crash(*data)
        elif kind == "partition":
            self._groups = {
                self.ids[i % self.sc.nodes]: g for g, grp in enumerate(data) for i in grp
            }
            self.trace.append((t, "partition", data))
        elif kind == "heal":
            self._groups = None
            self.trace.append((t, "heal"))
        elif kind == "stats":
            self._publish_stats()
        elif kind == "check":
            self._check()
        return True

    def run(self, until: float | None = None) -> RunResult:
        if until is not None:
            self.sc = Scenario(**{**asdict(self.sc), "duration": until})
        while self.step():
            pass
        self.now = self.sc.duration
        return self.result()

    def logs(self) -> dict[str, list[Any]]:
        return {n: s.decisions() for n, s in self.storage.items()}

    def result(self) -> RunResult:
        self.checker.logs(self.logs())
        h = hashlib.sha256()
        for ev in self.trace:
            h.update(repr(ev).encode())
        epochs = max((s.last_epoch() for s in self.storage.values()), default=0)
        cons = sum(
            v
            for k, v in self.sent_by_type.items()
            if k in ("Prepare", "Promise", "Accept", "Accepted", "Nack", "Learn", "CatchUp")
        )
        span = max(self.now, 1e-9)
        return RunResult(
            scenario=self.sc,
            violations=self.checker.summary(),
            examples=list(self.checker.examples),
            trace_digest=h.hexdigest(),
            decided_epochs=epochs,
            first_decision_at=self.decisions_at[0] if self.decisions_at else None,
            converged_at=self.converged_at,
            messages=self.messages,
            consensus_messages=cons,
            msgs_per_node_s=self.messages / self.sc.nodes / span,
            lost_to_crash=self.checker.lost_to_crash,
            decisions_at=list(self.decisions_at),
        )


def replay(scenario: Scenario, placement: PlacementFn | None = None) -> RunResult:
    """Run `scenario` from scratch (same seed, same faults: same trace)."""
    return SimNet(scenario, placement).run()


def views(net: SimNet) -> Mapping[str, list[str]]:
    return {n: node.alive_members() for n in net.ids if (node := net.nodes[n]) is not None}
