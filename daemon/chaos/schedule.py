"""The nemesis' plan, as data: a seeded list of fault steps, the same for the same seed.

Sans-IO: (seed, nodes, duration) in, steps out; `runner.py` applies them. One fault at a
time, each held a while and then healed, with a quiet gap between: partitions (majority /
minority, a bridge node that sees both sides, one node isolated), kill -9 then restart on the
same state dir, SIGSTOP/SIGCONT 2-15 s, SIGTERM leave then rejoin, a link at 1 Mbit/s, and
once, midway, a fresh node with no model and no shards joining.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

KINDS = ("partition", "bridge", "isolate", "kill", "pause", "leave", "slow")
PAUSE_S = (2.0, 15.0)
HOLD_S = (4.0, 12.0)  # partitions, slow links, a leave's time away
RESTART_AFTER_S = (2.0, 5.0)  # a killed daemon comes back this long after
GAP_S = (3.0, 8.0)  # quiet between a heal and the next fault
SLOW_MBPS = 1.0


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


def make_schedule(seed: int, nodes: int, duration: float, *, join: bool = True) -> list[Step]:
    """Faults from a few seconds in until `duration`; with `join`, node `nodes` (a spare
    namespace) joins at the first gap past half the run."""
    rng = random.Random(seed)
    steps: list[Step] = []
    t = rng.uniform(*GAP_S)
    joined = not join
    while t < duration:
        if not joined and t >= duration / 2:
            steps.append(Step(len(steps), "join", t, 0.0, nodes=(nodes,)))
            joined = True
            t += rng.uniform(*GAP_S)
            continue
        kinds = KINDS if nodes >= 3 else ("kill", "pause", "leave", "slow")
        s = _step(rng, len(steps), rng.choice(kinds), t, nodes)
        steps.append(s)
        t = s.at + s.hold + rng.uniform(*GAP_S)
    return steps
