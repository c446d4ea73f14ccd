"""Migration planner: current holders -> target holders as make-before-break copy/drop steps.

A copy (src -> dst) needs a free slot on dst; a drop is allowed only while another server still
holds the expert, so no expert is ever without a holder. Copies are grouped into epochs of at
most `budget_bytes`. When every receiving server is full and its pending drops are the last
copies (a swap cycle), one expert is parked on a server with a free slot and dropped there later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgemoe.placement.problem import PlacementError


@dataclass(frozen=True)
class Move:
    """One step: kind "copy" (src sends to dst, `bytes` on the wire) or "drop" (src frees it)."""

    layer: int
    expert: int
    src: int
    dst: int
    bytes: int
    kind: str = "copy"

    def to_dict(self) -> dict[str, int | str]:
        return {"layer": self.layer, "expert": self.expert, "from": self.src, "to": self.dst,
                "bytes": self.bytes, "kind": self.kind}


@dataclass
class MigrationPlan:
    """Epochs of steps in execution order; each epoch's copies total at most the budget."""

    epochs: list[list[Move]] = field(default_factory=list)

    @property
    def moves(self) -> list[Move]:
        return [m for ep in self.epochs for m in ep]

    @property
    def bytes_total(self) -> int:
        return sum(m.bytes for m in self.moves)


def plan_migration(current_holders: np.ndarray, target_holders: np.ndarray, expert_bytes: int,
                   budget_bytes: int, capacity_slots: np.ndarray | None = None) -> MigrationPlan:
    """Make-before-break plan from `current_holders` to `target_holders` (bool [S, L, E]).

    `capacity_slots` int [S] defaults to max(current, target) holdings per server. Raises
    PlacementError when the target leaves an expert unheld, the budget is below one expert, or
    no order fits the capacities.
    """
    cur = np.asarray(current_holders, dtype=bool).copy()
    tgt = np.asarray(target_holders, dtype=bool)
    if cur.shape != tgt.shape or cur.ndim != 3:
        raise PlacementError(f"holders must both be [S, L, E], got {cur.shape} and {tgt.shape}")
    if not tgt.any(0).all() or not cur.any(0).all():
        raise PlacementError("every expert must have a holder in current and target")
    if budget_bytes < expert_bytes:
        raise PlacementError(f"budget {budget_bytes} B is below one expert ({expert_bytes} B)")
    S = cur.shape[0]
    if capacity_slots is None:
        capacity_slots = np.maximum(cur.reshape(S, -1).sum(1), tgt.reshape(S, -1).sum(1))
    cap = np.asarray(capacity_slots, dtype=np.int64)
    if np.any(tgt.reshape(S, -1).sum(1) > cap) or np.any(cur.reshape(S, -1).sum(1) > cap):
        raise PlacementError("a placement exceeds the given capacity")
    epochs: list[list[Move]] = [[]]
    spent = 0
    parked = np.zeros_like(cur)  # temporary copies made to break a swap cycle

    def free() -> np.ndarray:
        return cap - cur.reshape(S, -1).sum(1)

    # each round drops, copies or parks at least one expert; parks are bounded by the surplus
    for _ in range(4 * int((cur ^ tgt).sum()) + 4):
        progress = False
        extra = cur & ~tgt
        # drops that keep another holder; parked copies last, so a parked copy outlives the
        # copy it stands in for instead of being dropped right away (which looped forever)
        for s, l, e in np.concatenate([np.argwhere(extra & ~parked), np.argwhere(extra & parked)]):
            if not cur[s, l, e]:
                continue
            if cur[:, l, e].sum() >= 2:
                cur[s, l, e] = False
                parked[s, l, e] = False
                epochs[-1].append(Move(int(l), int(e), int(s), -1, 0, "drop"))
                progress = True
        missing = tgt & ~cur
        if not missing.any() and not (cur & ~tgt).any():
            break
        fr = free()
        for d, l, e in np.argwhere(missing):
            if fr[d] <= 0:
                continue
            if spent + expert_bytes > budget_bytes:
                epochs.append([])
                spent = 0
            src = int(np.flatnonzero(cur[:, l, e])[0])
            cur[d, l, e] = True
            fr[d] -= 1
            spent += expert_bytes
            epochs[-1].append(Move(int(l), int(e), src, int(d), int(expert_bytes)))
            progress = True
        if progress:
            continue
        # stuck: every receiver is full and its surplus experts are last copies; park one
        fr = free()
        stuck = np.argwhere(cur & ~tgt)
        for s, l, e in stuck:
            spots = np.flatnonzero((fr > 0) & ~cur[:, l, e])
            if len(spots):
                d = int(spots[0])
                if spent + expert_bytes > budget_bytes:
                    epochs.append([])
                    spent = 0
                cur[d, l, e] = True
                parked[d, l, e] = True
                spent += expert_bytes
                epochs[-1].append(Move(int(l), int(e), int(s), d, int(expert_bytes)))
                break
        else:
            raise PlacementError("no make-before-break order fits the capacities: "
                                 "every server is full and no expert can be parked")
    else:
        raise PlacementError("migration planner made no progress (internal error)")
    return MigrationPlan([ep for ep in epochs if ep])
