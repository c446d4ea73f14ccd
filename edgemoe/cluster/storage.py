"""Durable acceptor state and decision log.

Paxos is only safe if an acceptor never forgets a promise or an acceptance, so the consensus
core writes through `Storage` before it sends any reply. `SqliteStorage` commits with
``synchronous=FULL`` (fsync) on every write; `MemoryStorage` is for the simulator, where a
"crash" keeps the object and so keeps what was written.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import msgpack

from edgemoe.cluster.messages import Ballot, Proposal, from_wire, to_wire


@dataclass(frozen=True)
class AcceptorState:
    """What one acceptor promised and accepted for one epoch."""

    promised: Ballot | None = None
    accepted_ballot: Ballot | None = None
    accepted_value: Proposal | None = None


class Storage(Protocol):
    def acceptor(self, epoch: int) -> AcceptorState: ...

    def save_acceptor(self, epoch: int, state: AcceptorState) -> None:
        """Durable when it returns."""

    def append_decision(self, value: Proposal) -> None:
        """Durable when it returns; `value.epoch` is last_epoch() + 1."""

    def decisions(self, after: int = 0) -> list[Proposal]: ...

    def last_epoch(self) -> int: ...


class MemoryStorage:
    """In-memory storage; survives a simulated crash because the simulator keeps the object."""

    def __init__(self) -> None:
        self._acceptor: dict[int, AcceptorState] = {}
        self._log: list[Proposal] = []

    def acceptor(self, epoch: int) -> AcceptorState:
        return self._acceptor.get(epoch, AcceptorState())

    def save_acceptor(self, epoch: int, state: AcceptorState) -> None:
        self._acceptor[epoch] = state

    def append_decision(self, value: Proposal) -> None:
        if value.epoch != len(self._log) + 1:
            raise ValueError(f"decision for epoch {value.epoch} after {len(self._log)}")
        self._log.append(value)

    def decisions(self, after: int = 0) -> list[Proposal]:
        return list(self._log[after:])

    def last_epoch(self) -> int:
        return len(self._log)


def _pack(obj: object) -> bytes | None:
    return None if obj is None else msgpack.packb(to_wire(obj), use_bin_type=True)


def _unpack(blob: bytes | None) -> Proposal | None:
    return None if blob is None else from_wire(msgpack.unpackb(blob, raw=False))


def _ballot(r: int | None, n: str | None) -> Ballot | None:
    return None if r is None or n is None else (int(r), str(n))


class SqliteStorage:
    """sqlite file; every write is its own transaction committed with fsync."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(str(self.path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS acceptor (epoch INTEGER PRIMARY KEY, p_round INTEGER,"
            " p_node TEXT, a_round INTEGER, a_node TEXT, a_value BLOB)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS decision (epoch INTEGER PRIMARY KEY, value BLOB NOT NULL)"
        )

    def close(self) -> None:
        self._db.close()

    def acceptor(self, epoch: int) -> AcceptorState:
        row = self._db.execute(
            "SELECT p_round, p_node, a_round, a_node, a_value FROM acceptor WHERE epoch = ?",
            (epoch,),
        ).fetchone()
        if row is None:
            return AcceptorState()
        return AcceptorState(_ballot(row[0], row[1]), _ballot(row[2], row[3]), _unpack(row[4]))

    def save_acceptor(self, epoch: int, state: AcceptorState) -> None:
        p = state.promised or (None, None)
        a = state.accepted_ballot or (None, None)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR REPLACE INTO acceptor VALUES (?, ?, ?, ?, ?, ?)",
                (epoch, p[0], p[1], a[0], a[1], _pack(state.accepted_value)),
            )

    def append_decision(self, value: Proposal) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            last = self._db.execute("SELECT COALESCE(MAX(epoch), 0) FROM decision").fetchone()[0]
            if value.epoch != last + 1:
                raise ValueError(f"decision for epoch {value.epoch} after {last}")
            self._db.execute("INSERT INTO decision VALUES (?, ?)", (value.epoch, _pack(value)))

    def decisions(self, after: int = 0) -> list[Proposal]:
        rows = self._db.execute(
            "SELECT value FROM decision WHERE epoch > ? ORDER BY epoch", (after,)
        ).fetchall()
        return [v for (blob,) in rows if (v := _unpack(blob)) is not None]

    def last_epoch(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(epoch), 0) FROM decision").fetchone()[0])
