"""Wire messages of the cluster cores: plain frozen dataclasses with a msgpack-able dict form.

`to_wire(msg)` gives a dict of str/int/float/bool/bytes/list/dict tagged with the type name
under ``"__t"``; `from_wire(d)` rebuilds it through the registry (lists come back as tuples).
Fields named in a class's ``_opaque`` (statistics payloads) are carried untouched.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

TAG = "__t"
REGISTRY: dict[str, type] = {}

Ballot = tuple[int, str]  # (round, proposer node id), compared lexicographically
Shard = tuple[int, int]  # (layer, expert)


def wire(cls: type) -> type:
    """Class decorator: register a dataclass under its name for `from_wire`."""
    REGISTRY[cls.__name__] = cls
    return cls


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        opaque: tuple[str, ...] = getattr(value, "_opaque", ())
        out: dict[str, Any] = {TAG: type(value).__name__}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            out[f.name] = v if f.name in opaque else _encode(v)
        return out
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    if isinstance(value, frozenset | set):
        return sorted(_encode(v) for v in value)
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and TAG in value:
        name = value[TAG]
        cls = REGISTRY.get(name) if isinstance(name, str) else None
        if cls is None:
            raise ValueError(f"unknown message type {name!r}")
        opaque: tuple[str, ...] = getattr(cls, "_opaque", ())
        names = {f.name for f in dataclasses.fields(cls)}
        extra = set(value) - names - {TAG}
        if extra:
            raise ValueError(f"{name}: unexpected fields {sorted(extra)}")
        try:
            return cls(
                **{k: (v if k in opaque else _decode(v)) for k, v in value.items() if k != TAG}
            )
        except TypeError as exc:
            raise ValueError(f"{name}: {exc}") from None
    if isinstance(value, list | tuple):
        return tuple(_decode(v) for v in value)
    return value


def to_wire(msg: Any) -> dict[str, Any]:
    """The msgpack-able dict of a registered message."""
    return _encode(msg)


def from_wire(d: Any) -> Any:
    """Rebuild a message from `to_wire`'s dict; ValueError on anything malformed."""
    if not isinstance(d, dict):
        raise ValueError("a message is a dict")
    return _decode(d)


def digest(obj: Any) -> str:
    """A stable hex digest of a message or value (msgpack of its wire form)."""
    return hashlib.sha256(msgpack.packb(_encode(obj), use_bin_type=True)).hexdigest()


# ---- piggybacked gossip items -------------------------------------------------------------


@wire
@dataclass(frozen=True)
class Alive:
    """`node` is alive at `incarnation`; carries how to reach it and its expert capacity."""

    node: str
    incarnation: int
    addr: str
    capacity: int


@wire
@dataclass(frozen=True)
class Suspect:
    node: str
    incarnation: int
    by: str


@wire
@dataclass(frozen=True)
class Dead:
    """`node` is dead at `incarnation` (left=True: it said goodbye)."""

    node: str
    incarnation: int
    by: str
    left: bool = False


@wire
@dataclass(frozen=True)
class Versioned:
    """One origin's versioned snapshot of `kind` ("stats" or "holdings"); newest version wins."""

    _opaque: ClassVar[tuple[str, ...]] = ("payload",)
    kind: str
    origin: str
    version: int
    payload: Any


Item = Alive | Suspect | Dead | Versioned


# ---- membership -----------------------------------------------------------------------------


@wire
@dataclass(frozen=True)
class Ping:
    """Direct probe; `target` guards against a reused address answering for someone else."""

    sender: str
    seq: int
    target: str
    epoch: int = 0
    items: tuple[Item, ...] = ()


@wire
@dataclass(frozen=True)
class Ack:
    sender: str
    seq: int
    epoch: int = 0
    items: tuple[Item, ...] = ()


@wire
@dataclass(frozen=True)
class PingReq:
    """Ask `sender`'s peer to probe `target` and forward the ack back under `seq`."""

    sender: str
    seq: int
    target: str
    epoch: int = 0
    items: tuple[Item, ...] = ()


@wire
@dataclass(frozen=True)
class Gossip:
    sender: str
    epoch: int = 0
    items: tuple[Item, ...] = ()


@wire
@dataclass(frozen=True)
class PushPull:
    """Full state for anti-entropy: every member record and every versioned snapshot."""

    sender: str
    reply: bool
    members: tuple[Alive | Suspect | Dead, ...]
    versioned: tuple[Versioned, ...]
    epoch: int = 0


# ---- consensus ------------------------------------------------------------------------------


@wire
@dataclass(frozen=True)
class Snapshot:
    """An opaque statistics snapshot as used by a proposal."""

    _opaque: ClassVar[tuple[str, ...]] = ("payload",)
    origin: str
    version: int
    payload: Any


@wire
@dataclass(frozen=True)
class Proposal:
    """The value of one epoch: members with capacities, the inputs used, placement and plan.

    `assignment` is ((node, ((layer, expert), ...)), ...) sorted; `plan` is
    ((layer, expert, from_node or "", to_node), ...) where "" means "from disk".
    `forced` marks an operator-chosen member set adopted when the old quorum is lost.
    """

    epoch: int
    members: tuple[tuple[str, int], ...]
    snapshots: tuple[Snapshot, ...]
    stats_digest: str
    assignment: tuple[tuple[str, tuple[Shard, ...]], ...]
    plan: tuple[tuple[int, int, str, str], ...]
    proposer: str
    reason: str
    forced: bool = False

    def member_ids(self) -> tuple[str, ...]:
        return tuple(m for m, _ in self.members)

    def shards_of(self, node: str) -> frozenset[Shard]:
        for n, shards in self.assignment:
            if n == node:
                return frozenset(tuple(s) for s in shards)  # type: ignore[misc]
        return frozenset()


@wire
@dataclass(frozen=True)
class Prepare:
    sender: str
    epoch: int
    ballot: Ballot
    forced_members: tuple[str, ...] = ()


@wire
@dataclass(frozen=True)
class Promise:
    sender: str
    epoch: int
    ballot: Ballot
    accepted_ballot: Ballot | None
    accepted_value: Proposal | None


@wire
@dataclass(frozen=True)
class Accept:
    sender: str
    epoch: int
    ballot: Ballot
    value: Proposal
    forced_members: tuple[str, ...] = ()


@wire
@dataclass(frozen=True)
class Accepted:
    sender: str
    epoch: int
    ballot: Ballot


@wire
@dataclass(frozen=True)
class Nack:
    """The acceptor promised `promised` (higher than the ballot asked) or rejects the value."""

    sender: str
    epoch: int
    ballot: Ballot
    promised: Ballot | None
    reason: str = ""


@wire
@dataclass(frozen=True)
class Learn:
    """Decided values, contiguous from some epoch (announcement and catch-up reply)."""

    sender: str
    decisions: tuple[Proposal, ...]


@wire
@dataclass(frozen=True)
class CatchUp:
    """Ask for every decision after `after`."""

    sender: str
    after: int


Message = Ping | Ack | PingReq | Gossip | PushPull | Prepare | Promise | Accept | Accepted | Nack
Message = Message | Learn | CatchUp
