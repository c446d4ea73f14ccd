"""Durable acceptor state: a restarted acceptor never contradicts a promise or acceptance, and
sqlite holds the state before the reply leaves the core."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemoe.cluster.config import ClusterConfig
from edgemoe.cluster.consensus import Consensus, build_proposal
from edgemoe.cluster.messages import Accept, Accepted, Nack, Prepare, Promise, Proposal
from edgemoe.cluster.outbox import Outbox
from edgemoe.cluster.simnet import capacity_round_robin
from edgemoe.cluster.storage import AcceptorState, MemoryStorage, SqliteStorage, Storage

PLACE = capacity_round_robin(2, 4, 1000)
GENESIS = ("a", "b", "c")


def value(proposer: str) -> Proposal:
    return build_proposal(1, [(n, 8000) for n in GENESIS], [], PLACE, None, proposer, "test")


def acceptor(storage: Storage) -> Consensus:
    return Consensus("a", storage, PLACE, ClusterConfig.fast(), random.Random(0), GENESIS)


def replies(c: Consensus, msg: object) -> list[object]:
    out = Outbox()
    c.handle(0.0, msg, out)
    return [m for _, m in out.messages]


def test_restarted_acceptor_refuses_a_ballot_below_its_promise(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite"
    first = acceptor(SqliteStorage(db))
    (p,) = replies(first, Prepare("b", 1, (5, "b")))
    assert isinstance(p, Promise) and p.accepted_ballot is None
    first.storage.close()  # type: ignore[attr-defined]

    again = acceptor(SqliteStorage(db))
    (n,) = replies(again, Prepare("c", 1, (4, "c")))
    assert isinstance(n, Nack) and n.promised == (5, "b")
    (n2,) = replies(again, Accept("c", 1, (4, "c"), value("c")))
    assert isinstance(n2, Nack)


def test_restarted_acceptor_reports_what_it_accepted(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite"
    first = acceptor(SqliteStorage(db))
    v = value("b")
    replies(first, Prepare("b", 1, (2, "b")))
    (ok,) = replies(first, Accept("b", 1, (2, "b"), v))
    assert isinstance(ok, Accepted)
    first.storage.close()  # type: ignore[attr-defined]

    again = acceptor(SqliteStorage(db))
    (p,) = replies(again, Prepare("c", 1, (3, "c")))
    assert isinstance(p, Promise)
    assert p.accepted_ballot == (2, "b") and p.accepted_value == v


def test_promise_is_in_sqlite_before_the_reply_is_returned(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite"
    c = acceptor(SqliteStorage(db))
    (p,) = replies(c, Prepare("b", 1, (7, "b")))
    assert isinstance(p, Promise)
    # a second connection (another process after a crash would do the same) sees it already
    row = (
        sqlite3.connect(db).execute("SELECT p_round, p_node FROM acceptor WHERE epoch=1").fetchone()
    )
    assert row == (7, "b")


class FailingStorage(MemoryStorage):
    def save_acceptor(self, epoch: int, state: AcceptorState) -> None:
        raise OSError("disk full")


def test_no_reply_leaves_when_the_write_fails() -> None:
    c = acceptor(FailingStorage())
    out = Outbox()
    with pytest.raises(OSError):
        c.handle(0.0, Prepare("b", 1, (1, "b")), out)
    assert out.messages == []


class ForgetfulStorage(MemoryStorage):
    """What a non-durable acceptor would look like after a restart: nothing remembered."""

    def acceptor(self, epoch: int) -> AcceptorState:
        return AcceptorState()


ops = st.lists(
    st.tuples(
        st.sampled_from(["prepare", "accept", "restart"]),
        st.integers(1, 6),
        st.sampled_from(["b", "c"]),
    ),
    min_size=1,
    max_size=12,
)


def run_ops(make: Callable[[], Storage], seq: list[tuple[str, int, str]]) -> list[str]:
    """Feed `seq` to one acceptor, reopening storage from `make` on each restart; return
    every answer that contradicts an earlier one."""
    c = acceptor(make())
    promised: tuple[int, str] | None = None
    accepted: tuple[int, str] | None = None
    bad = []
    for op, rnd, who in seq:
        ballot = (rnd, who)
        if op == "restart":
            c = acceptor(make())
            continue
        if op == "prepare":
            (r,) = replies(c, Prepare(who, 1, ballot))
            if isinstance(r, Promise):
                if promised is not None and ballot < promised:
                    bad.append(f"promised {ballot} after {promised}")
                if r.accepted_ballot != accepted:
                    bad.append(f"reported {r.accepted_ballot}, accepted {accepted}")
                promised = max(promised or ballot, ballot)
        else:
            (r,) = replies(c, Accept(who, 1, ballot, value(who)))
            if isinstance(r, Accepted):
                if promised is not None and ballot < promised:
                    bad.append(f"accepted {ballot} below promise {promised}")
                accepted = max(accepted or ballot, ballot)
                promised = max(promised or ballot, ballot)
    return bad


@settings(max_examples=40, deadline=None)
@given(ops)
def test_restarts_never_contradict_a_promise_sqlite(seq: list[tuple[str, int, str]]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        db = Path(d) / "c.sqlite"
        assert run_ops(lambda: SqliteStorage(db), seq) == []


def test_the_property_fails_for_an_acceptor_that_forgets() -> None:
    seq = [("prepare", 5, "b"), ("restart", 0, "b"), ("prepare", 3, "c")]
    assert run_ops(lambda: ForgetfulStorage(), seq)
    shared = MemoryStorage()  # the simulator's storage survives a crash: no contradiction
    assert run_ops(lambda: shared, seq) == []
