"""The nemesis' plan, as data: a seeded list of fault steps, the same for the same seed.

Sans-IO: (seed, nodes, duration) in, steps out; `runner.py` applies them. Each step is held
a while and then healed, with a quiet gap between: partitions (majority / minority, a bridge
node that sees both sides, one node isolated), kill -9 then restart on the same state dir,
SIGSTOP/SIGCONT 2-15 s, SIGTERM leave then rejoin, a link at 1 Mbit/s, a lossy link (a share
of its packets dropped), and once, midway, a fresh node with no model and no shards joining,
whose link is then slowed or made lossy while it pulls its experts (a fault timed during a
migration: the runner waits for one to be under way). Some steps carry a second fault on
another node at the same time (`also`), never taking down more than a minority.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

KINDS = ("partition", "bridge", "isolate", "kill", "pause", "leave", "slow", "lossy")
# Kinds that can join another fault on another node in one step (`Step.also`).
SECOND = ("kill", "pause", "leave", "slow", "lossy")
DOWN = ("kill", "pause", "leave", "isolate")  # take their node out of the cluster
SECOND_SHARE = 0.3  # share of steps with a second fault, where the cluster has >= 4 nodes
PAUSE_S = (2.0, 15.0)
HOLD_S = (4.0, 12.0)  # partitions, slow links, a leave's time away
RESTART_AFTER_S = (2.0, 5.0)  # a killed daemon comes back this long after
GAP_S = (3.0, 8.0)  # quiet between a heal and the next fault
SLOW_MBPS = 1.0
LOSS = 0.2  # share of a lossy link's packets dropped, each way
MIGRATION_WAIT_S = 15.0  # a step timed during a migration waits at most this for one


@dataclass(frozen=True)
class Step:
    """Fault `kind` at `at` seconds into the run, healed `hold` seconds later. `nodes`: the
    targets; `cuts`: pairs of nodes that cannot talk (partitions)."""

    step: int
    kind: str
    at: float
    hold: float
    nodes: tuple[int, ...] = ()
    cuts: tuple[tuple[int, int], ...] = ()
    # "migration": applied once some node has a migration under way (at most
    # MIGRATION_WAIT_S after `at`); "": at `at`
    during: str = ""
    also: tuple[Step, ...] = ()  # faults applied with this one, each healed after its hold

    def parts(self) -> tuple[Step, ...]:
        return (self, *self.also)

    def down(self) -> set[int]:
        return {n for p in self.parts() if p.kind in DOWN for n in p.nodes}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cuts(a: list[int], b: list[int]) -> tuple[tuple[int, int], ...]:
    return tuple(sorted((min(x, y), max(x, y)) for x in a for y in b))


def _step(rng: random.Random, i: int, kind: str, at: float, nodes: int) -> Step:
    order = list(range(nodes))
    rng.shuffle(order)
    minority = order[: (nodes - 1) // 2] or order[:1]
    if kind == "partition":  # majority | minority
        return Step(i, kind, at, rng.uniform(*HOLD_S), cuts=_cuts(minority, order[len(minority):]))
    if kind == "bridge":  # two sides, one node that sees both
        bridge, rest = order[0], order[1:]
        half = len(rest) // 2
        return Step(i, kind, at, rng.uniform(*HOLD_S), nodes=(bridge,),
                    cuts=_cuts(rest[:half], rest[half:]))  # fmt: skip
    if kind == "isolate":
        return Step(i, kind, at, rng.uniform(*HOLD_S), nodes=(order[0],),
                    cuts=_cuts(order[:1], order[1:]))  # fmt: skip
    if kind == "pause":
        return Step(i, kind, at, rng.uniform(*PAUSE_S), nodes=(order[0],))
    if kind == "kill":
        return Step(i, kind, at, rng.uniform(*RESTART_AFTER_S), nodes=(order[0],))
    return Step(i, kind, at, rng.uniform(*HOLD_S), nodes=(order[0],))  # leave, slow


def _second(rng: random.Random, first: Step, nodes: int) -> Step | None:
    """Another node-level fault with `first`, on a node `first` leaves alone, keeping a
    majority up (at most (nodes - 1) // 2 nodes down) and every node of a cut reachable."""
    busy = set(first.nodes) | {n for pair in first.cuts for n in pair}
    free = [n for n in range(nodes) if n not in busy]
    if not free:
        return None
    kind = rng.choice(SECOND)
    node = rng.choice(free)
    if kind in DOWN and len(first.down()) + 1 > (nodes - 1) // 2:
        kind = rng.choice(("slow", "lossy"))
    hold = rng.uniform(*PAUSE_S) if kind == "pause" else (
        rng.uniform(*RESTART_AFTER_S) if kind == "kill" else rng.uniform(*HOLD_S))
    return Step(first.step, kind, first.at, hold, nodes=(node,))


def make_schedule(seed: int, nodes: int, duration: float, *, join: bool = True) -> list[Step]:
    """Faults from a few seconds in until `duration`; with `join`, node `nodes` (a spare
    namespace) joins at the first gap past half the run, and its link is slowed or made lossy
    during the migration that gives it experts."""
    rng = random.Random(seed)
    steps: list[Step] = []
    t = rng.uniform(*GAP_S)
    joined = not join
    while t < duration:
        if not joined and t >= duration / 2:
            steps.append(Step(len(steps), "join", t, 0.0, nodes=(nodes,)))
            joined = True
            kind = rng.choice(("slow", "lossy"))
            s = Step(len(steps), kind, t + 1.0, rng.uniform(*HOLD_S), nodes=(nodes,),
                     during="migration")  # fmt: skip
            steps.append(s)
            t = s.at + MIGRATION_WAIT_S + s.hold + rng.uniform(*GAP_S)
            continue
        kinds = KINDS if nodes >= 3 else ("kill", "pause", "leave", "slow", "lossy")
        s = _step(rng, len(steps), rng.choice(kinds), t, nodes)
        if nodes >= 4 and rng.random() < SECOND_SHARE and (extra := _second(rng, s, nodes)):
            s = Step(s.step, s.kind, s.at, s.hold, s.nodes, s.cuts, also=(extra,))
        steps.append(s)
        t = s.at + max(p.hold for p in s.parts()) + rng.uniform(*GAP_S)
    return steps
