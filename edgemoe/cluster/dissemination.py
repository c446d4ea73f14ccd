"""Piggybacked broadcast queue (memberlist's TransmitLimitedQueue).

Each item has a key; queuing a newer item under the same key replaces the old one (a newer
incarnation or version supersedes it). Items with the fewest transmissions go first, and an
item is retired after `limit` transmissions. Buckets by transmit count keep this O(items sent).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from edgemoe.cluster.messages import Item


class BroadcastQueue:
    """Items waiting to be piggybacked, retired after a retransmit limit."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._buckets: list[dict[Hashable, Item]] = [{}]
        self._where: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self._where)

    def push(self, key: Hashable, item: Item) -> None:
        """Queue `item`, replacing any queued item under the same key (transmits reset)."""
        old = self._where.pop(key, None)
        if old is not None:
            self._buckets[old].pop(key, None)
        self._buckets[0][key] = item
        self._where[key] = 0

    def take(self, n: int) -> list[Item]:
        """Up to `n` items, least transmitted first; each counts one transmission."""
        out: list[Item] = []
        limit = self._limit()
        moves: list[tuple[Hashable, Item, int]] = []
        for count, bucket in enumerate(self._buckets):
            for key, item in bucket.items():
                if len(out) >= n:
                    break
                out.append(item)
                moves.append((key, item, count))
            if len(out) >= n:
                break
        for key, item, count in moves:
            del self._buckets[count][key]
            if count + 1 >= limit:
                del self._where[key]
                continue
            while len(self._buckets) <= count + 1:
                self._buckets.append({})
            self._buckets[count + 1][key] = item
            self._where[key] = count + 1
        return out
