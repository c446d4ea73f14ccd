"""Safety checker fed by the simulator: agreement, validity, log prefix, last copy, routing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from edgemoe.cluster.messages import Proposal, Shard, digest

INVARIANTS = ("agreement", "validity", "log_prefix", "last_copy", "routing")


class InvariantChecker:
    """Counts violations per invariant and keeps the first few descriptions."""

    def __init__(self) -> None:
        self.violations: Counter[str] = Counter({k: 0 for k in INVARIANTS})
        self.examples: list[str] = []
        self.decided: dict[int, str] = {}
        self.proposed: set[str] = set()

    def _fail(self, kind: str, what: str) -> None:
        self.violations[kind] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{kind}: {what}")

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())

    def proposed_value(self, value: Proposal) -> None:
        self.proposed.add(digest(value))

    def decided_value(self, node: str, value: Proposal) -> None:
        d = digest(value)
        known = self.decided.setdefault(value.epoch, d)
        if known != d:
            self._fail("agreement", f"{node} decided another value for epoch {value.epoch}")
        if d not in self.proposed:
            self._fail("validity", f"{node} decided an unproposed value for epoch {value.epoch}")

    def logs(self, logs: Mapping[str, list[Proposal]]) -> None:
        """Every log is a prefix of the longest one."""
        longest = max(logs.values(), key=len, default=[])
        ref = [digest(v) for v in longest]
        for node, log in logs.items():
            mine = [digest(v) for v in log]
            if mine != ref[: len(mine)]:
                self._fail("log_prefix", f"{node}'s log is not a prefix of the longest")

    def drop(
        self,
        node: str,
        shard: Shard,
        truth: Mapping[str, set[Shard]],
    ) -> None:
        """`node` drops `shard`: another running node must really hold it."""
        if not any(shard in held for n, held in truth.items() if n != node):
            self._fail("last_copy", f"{node} dropped {shard}, the last live copy")

    def routing(
        self,
        node: str,
        table: Mapping[Shard, Iterable[str]],
        announced: Mapping[str, frozenset[Shard]],
    ) -> None:
        """Every holder `node` routes to announced that shard in the version `node` knows."""
        for shard, holders in table.items():
            for h in holders:
                if shard not in announced.get(h, frozenset()):
                    self._fail("routing", f"{node} routes {shard} to {h}, which never announced it")

    def summary(self) -> dict[str, int]:
        return dict(self.violations)
