"""Standby copies: expert shards kept on disk at a few nodes besides their placed holders.

An expert placed on one node only is lost to the cluster when that node dies, until a new
epoch re-places it (tens of seconds on a loaded box); meanwhile the router computes it from
its shard file, which only helps if some live node has that file. So after each decided
epoch every node computes, for every expert, its standby nodes by rendezvous hashing (the
highest ``hash(node, layer, expert)`` among the epoch's members that are not its holders
and are alive, `COPIES` of them) and fetches the shards it stands by for. A standby copy is
never loaded nor announced as a holding: it is only a source for fetching (a peer's, or this
node's own when it computes an orphan expert). Every node ranks the same way, so a node
looking for a file asks the expert's standby nodes first (`ranked`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from edgemoe.daemon.peers import PeerError
from edgemoe.daemon.store import CorruptShard, ShardStore
from edgemoe.model.manifest import Manifest

log = logging.getLogger(__name__)
Expert = tuple[int, int]

# Standby nodes per expert besides its placed holders: 2 survives a holder and one standby
# down at once (the chaos nemesis never takes more than a minority), at 2/N of the model's
# bytes more on each node's disk (never in memory).
COPIES = 2
# Seconds after a decision before standby fetches start: the placement's own transfers
# (what must be loaded to serve) go first on the links and disks.
START_DELAY_S = 2.0
# Standby fetches in flight at once: background traffic, kept below the migration's 4.
PARALLEL = 2
# Seconds between checks of the standby set while nothing is decided: a member that died
# moves its standby duty to the next node in rank, and failed fetches are retried.
RECHECK_S = 5.0


def _score(node: str, layer: int, expert: int) -> bytes:
    return hashlib.sha256(f"{node}\0{layer}\0{expert}".encode()).digest()


def ranked(members: Iterable[str], layer: int, expert: int,
           exclude: Iterable[str] = ()) -> list[str]:  # fmt: skip
    """`members` less `exclude`, by rendezvous score for the expert (highest first): the same
    order on every node, and moving one member moves only its own experts' standbys."""
    skip = set(exclude)
    cands = {m for m in members if m not in skip}
    return sorted(cands, key=lambda n: _score(n, layer, expert), reverse=True)


def standby_nodes(members: Iterable[str], layer: int, expert: int, holders: Iterable[str],
                  alive: Callable[[str], bool] = lambda _: True,
                  copies: int = COPIES) -> list[str]:  # fmt: skip
    """The expert's standby nodes: the first `copies` members by rank that are not its
    holders and are `alive`."""
    return [n for n in ranked(members, layer, expert, holders) if alive(n)][:copies]


@dataclass(frozen=True)
class Epoch:
    """What the standby duty depends on: the decided epoch's members and placed holders."""

    epoch: int
    members: tuple[str, ...]
    holders: Mapping[Expert, frozenset[str]]


def epoch_of(value: object) -> Epoch:
    """An `Epoch` from a decided `Proposal` (members and assignment)."""
    holders: dict[Expert, set[str]] = {}
    for node, shards in value.assignment:  # type: ignore[attr-defined]
        for layer, expert in shards:
            holders.setdefault((int(layer), int(expert)), set()).add(node)
    return Epoch(value.epoch, tuple(value.member_ids()),  # type: ignore[attr-defined]
                 {k: frozenset(v) for k, v in holders.items()})  # fmt: skip


class Standby:
    """Keeps this node's standby shards on disk for the epoch in force (a supervised loop)."""

    def __init__(
        self,
        node_id: str,
        store: ShardStore,
        experts: Sequence[Expert],
        current: Callable[[], Epoch | None],
        alive: Callable[[str], bool],
        fetch: Callable[[int, int], Awaitable[None]],
        on_fetched: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.node_id = node_id
        self.store = store
        self.experts = list(experts)
        self.current = current
        self.alive = alive
        self.fetch = fetch
        self.on_fetched = on_fetched
        self.wake = asyncio.Event()
        self.epoch = 0  # the epoch of the last pass
        self.duty: set[Expert] = set()  # the shards this node stands by for
        self.pending: set[Expert] = set()  # of those, not on disk yet
        self.fetched = 0  # standby shards fetched since start

    def decided(self) -> None:
        """A new epoch was decided: look again (after START_DELAY_S)."""
        self.wake.set()

    def mine(self, ep: Epoch) -> set[Expert]:
        """The experts this node stands by for in `ep` (the alive view of now)."""
        me = self.node_id
        if me not in ep.members:
            return set()
        out = set()

        def alive(node: str) -> bool:
            return node == me or self.alive(node)

        for layer, expert in self.experts:
            holders = ep.holders.get((layer, expert), frozenset())
            if me in holders:
                continue
            if me in standby_nodes(ep.members, layer, expert, holders, alive):
                out.add((layer, expert))
        return out

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), RECHECK_S)
            ep = self.current()
            if ep is None:
                continue
            if self.wake.is_set() or ep.epoch != self.epoch:
                self.wake.clear()
                await asyncio.sleep(START_DELAY_S)  # the placement's transfers go first
                ep = self.current() or ep
            await self.pass_once(ep)

    async def pass_once(self, ep: Epoch) -> None:
        """Fetch every standby shard of `ep` this node lacks, PARALLEL at a time."""
        self.duty = self.mine(ep)
        self.pending = set(self.duty)  # until checked: the view never says done too early
        self.epoch = ep.epoch
        todo = [k for k in sorted(self.duty) if not await self.store.verified(
            Manifest.expert_path(*k))]  # fmt: skip
        self.pending = set(todo)
        if not todo:
            return
        log.info("standby: fetching %d expert shards for epoch %d", len(todo), ep.epoch)
        gate = asyncio.Semaphore(PARALLEL)

        async def one(key: Expert) -> None:
            async with gate:
                if (cur := self.current()) is not None and cur.epoch != ep.epoch:
                    return  # a newer epoch: the next pass decides again
                try:
                    await self.fetch(*key)
                except (PeerError, CorruptShard, OSError) as exc:
                    log.info("standby: expert %d/%d not fetched yet (%s)", *key, exc)
                    return
                self.pending.discard(key)
                self.fetched += 1
                self.on_fetched(int(self.store.info(Manifest.expert_path(*key))["bytes"]))

        await asyncio.gather(*(one(k) for k in todo))

    def view(self) -> dict[str, object]:
        return {"epoch": self.epoch, "experts": len(self.duty), "pending": len(self.pending),
                "fetched": self.fetched}  # fmt: skip
