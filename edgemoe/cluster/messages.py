"""Wire messages of the cluster cores: plain frozen dataclasses with a msgpack-able dict form.

`to_wire(msg)` gives a dict of str/int/float/bool/bytes/list/dict tagged with the type name
under ``"__t"``; `from_wire(d)` rebuilds it through the registry (lists come back as tuples),
checking every field against its annotation (peers are trusted to follow the protocol, but a
buggy one must not raise inside another's tasks). Fields named in a class's ``_opaque``
(statistics payloads) are carried untouched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import types
import typing
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


class MessageError(ValueError):
    """A cluster message that does not match its declared types; `reason` is one of "unknown"
    (no such message type), "field" (missing or unexpected field), "type" (a value of the
    wrong type) or "value" (out of bounds), for the refusal metric."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


MAX_INT = 2**63  # ints are msgpack's 64-bit ones; -1 is "none yet" (an unknown incarnation)
MAX_STR = 4096
MAX_ITEMS = 1 << 20
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        every = typing.get_type_hints(cls, globalns=globals())
        hints = _HINTS[cls] = {f.name: every[f.name] for f in dataclasses.fields(cls)}
    return hints


def _decode(value: Any, hint: Any = None, where: str = "message") -> Any:
    """`value` rebuilt as `hint` (a registered message when None), every field checked
    against its annotation; MessageError names the first thing that does not fit."""
    if hint is None or (isinstance(hint, type) and hint in REGISTRY.values()):
        return _decode_message(value, hint, where)
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        arms = typing.get_args(hint)
        if value is None:
            if type(None) in arms:
                return None
            raise MessageError("type", f"{where}: None where {hint} is expected")
        tag = value.get(TAG) if isinstance(value, dict) else None
        if isinstance(tag, str) and (tagged := REGISTRY.get(tag)) in arms:
            return _decode_message(value, tagged, where)
        errors = []
        for arm in arms:
            if arm is type(None):
                continue
            try:
                return _decode(value, arm, where)
            except MessageError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else MessageError("type", f"{where}: not {hint}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise MessageError("type", f"{where}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            if len(value) > MAX_ITEMS:
                raise MessageError("value", f"{where}: {len(value)} items")
            return tuple(_decode(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise MessageError("type", f"{where}: expected {len(args)} items, got {len(value)}")
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_decode(v, a, f"{where}[{i}]") for i, (v, a) in pairs)
    return _scalar(value, hint, where)


def _scalar(value: Any, hint: Any, where: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise MessageError("type", f"{where}: expected a bool, got {type(value).__name__}")
    elif hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise MessageError("type", f"{where}: expected an int, got {type(value).__name__}")
        if not -1 <= value < MAX_INT:
            raise MessageError("value", f"{where}: {value} out of range")
    elif hint is str:
        if not isinstance(value, str):
            raise MessageError("type", f"{where}: expected a str, got {type(value).__name__}")
        if len(value) > MAX_STR:
            raise MessageError("value", f"{where}: string of {len(value)} characters")
    elif hint is type(None):
        if value is not None:
            raise MessageError("type", f"{where}: expected None")
    else:  # an annotation this decoder does not know: a bug here, not in the sender
        raise TypeError(f"{where}: cannot decode {hint!r}")
    return value


def _decode_message(value: Any, cls: type | None, where: str) -> Any:
    if not isinstance(value, dict):
        raise MessageError("type", f"{where}: a message is a map, got {type(value).__name__}")
    name = value.get(TAG)
    found = REGISTRY.get(name) if isinstance(name, str) else None
    if found is None or (cls is not None and found is not cls):
        want = cls.__name__ if cls is not None else "a message type"
        raise MessageError("unknown", f"{where}: message type {name!r} where {want} is expected")
    opaque: tuple[str, ...] = getattr(found, "_opaque", ())
    hints = _hints(found)
    extra = set(value) - set(hints) - {TAG}
    if extra:
        raise MessageError("field", f"{name}: unexpected fields {sorted(map(str, extra))}")
    required = {f.name for f in dataclasses.fields(found)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = required - set(value)
    if missing:
        raise MessageError("field", f"{name}: missing fields {sorted(missing)}")
    kwargs = {
        k: (v if k in opaque else _decode(v, hints[k], f"{name}.{k}"))
        for k, v in value.items()
        if k != TAG
    }
    return found(**kwargs)


def to_wire(msg: Any) -> dict[str, Any]:
    """The msgpack-able dict of a registered message."""
    return _encode(msg)


def from_wire(d: Any) -> Any:
    """Rebuild a message from `to_wire`'s dict; MessageError (a ValueError) on anything that
    does not match the message's declared field types."""
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
