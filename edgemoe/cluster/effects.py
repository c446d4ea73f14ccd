"""Effects the cores ask their shell to perform or learn about (never sent on the wire)."""

from __future__ import annotations

from dataclasses import dataclass

from edgemoe.cluster.messages import Proposal


@dataclass(frozen=True)
class MemberAlive:
    node: str
    addr: str
    capacity: int
    incarnation: int


@dataclass(frozen=True)
class MemberSuspect:
    node: str
    incarnation: int


@dataclass(frozen=True)
class MemberDead:
    node: str
    incarnation: int
    left: bool


@dataclass(frozen=True)
class Proposed:
    """This node proposed `value` (as a phase-2 value) for its epoch."""

    value: Proposal


@dataclass(frozen=True)
class Decided:
    """Epoch `epoch` is decided with `value` (emitted once per epoch, in order)."""

    epoch: int
    value: Proposal


@dataclass(frozen=True)
class FetchShard:
    """Pull (layer, expert) from one of `sources` (announcing holders) or from disk if empty;
    call `Node.shard_loaded` once it is verified and loaded."""

    epoch: int
    layer: int
    expert: int
    sources: tuple[str, ...]


@dataclass(frozen=True)
class AnnounceHolding:
    """This node now announces `shards` (the full set) at `version`."""

    version: int
    shards: frozenset[tuple[int, int]]


@dataclass(frozen=True)
class DropShard:
    """Free (layer, expert): someone else live announces it and it is not ours to keep."""

    epoch: int
    layer: int
    expert: int


Effect = (
    MemberAlive
    | MemberSuspect
    | MemberDead
    | Proposed
    | Decided
    | FetchShard
    | AnnounceHolding
    | DropShard
)
