"""Last-writer-per-origin map of opaque versioned snapshots (statistics, holdings).

Merging keeps, per origin, the highest version; it is commutative, associative and idempotent,
so the order in which gossip delivers snapshots does not matter.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from edgemoe.cluster.messages import Versioned


class VersionedMap:
    """origin -> (version, payload), newest version wins."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, tuple[int, Any]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def merge(self, origin: str, version: int, payload: Any) -> bool:
        """Keep (version, payload) if newer than what we hold; True when it changed the map."""
        cur = self._entries.get(origin)
        if cur is not None and cur[0] >= version:
            return False
        self._entries[origin] = (version, payload)
        return True

    def get(self, origin: str) -> tuple[int, Any] | None:
        return self._entries.get(origin)

    def version(self, origin: str) -> int:
        cur = self._entries.get(origin)
        return cur[0] if cur else -1

    def items(self) -> list[Versioned]:
        """Every entry as a wire item, sorted by origin."""
        return [Versioned(self.kind, o, v, p) for o, (v, p) in sorted(self._entries.items())]

    def versions(self) -> dict[str, int]:
        return {o: v for o, (v, _) in self._entries.items()}
