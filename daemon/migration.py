"""Migration executor: make this node hold what the decided placement gives it.

Make-before-break: for each shard it is assigned, pull it (from the planned source first,
then any peer with the file), verify, load, and only then report it held (so the caller
announces it). Dropping is a separate step the caller takes only when the protocol core
allows it (the new holder announced, never the last live copy).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from edgemoe.daemon.peers import PeerError
from edgemoe.daemon.store import CorruptShard

if TYPE_CHECKING:
    from edgemoe.model.local import LocalExperts

log = logging.getLogger(__name__)
Expert = tuple[int, int]


class MigrationExecutor:
    """Pulls and loads assigned experts a few at a time; remembers what it moved."""

    def __init__(
        self,
        local: LocalExperts,
        fetch_and_load: Callable[[int, int, str | None], Awaitable[None]],
        expert_bytes: int,
        *,
        parallel: int = 4,
    ) -> None:
        self.local = local
        self.fetch_and_load = fetch_and_load
        self.expert_bytes = expert_bytes
        self.parallel = parallel
        self.pending: set[Expert] = set()
        self.bytes_moved = 0
        self.failed: set[Expert] = set()

    async def acquire(
        self,
        wanted: Iterable[Expert],
        source: Callable[[Expert], str | None] = lambda _: None,
        on_held: Callable[[Expert], None] = lambda _: None,
    ) -> set[Expert]:
        """Load every expert of `wanted` not held yet; returns those now held."""
        todo = sorted(set(wanted) - self.local.held())
        self.pending |= set(todo)
        gate = asyncio.Semaphore(self.parallel)
        done: set[Expert] = set()

        async def one(key: Expert) -> None:
            async with gate:
                try:
                    await self.fetch_and_load(key[0], key[1], source(key))
                except (PeerError, CorruptShard, OSError, ValueError) as exc:
                    log.warning("could not acquire expert %d/%d: %s", key[0], key[1], exc)
                    self.failed.add(key)
                    return
                finally:
                    self.pending.discard(key)
                self.failed.discard(key)
                self.bytes_moved += self.expert_bytes
                done.add(key)
                on_held(key)

        await asyncio.gather(*(one(k) for k in todo))
        return done

    def drop(self, experts: Iterable[Expert]) -> None:
        for layer, expert in experts:
            self.local.drop(layer, expert)
