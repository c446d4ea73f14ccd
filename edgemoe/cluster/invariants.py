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
        self.lost_to_crash = 0

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

    def drop(self, node: str, shard: Shard, truth: Mapping[str, set[Shard]], unseen: bool) -> None:
        """`node` drops `shard`: another running node must really hold it.

        `unseen`: a holder `node` relied on crashed after making the announcement `node` acted
        on, too recently for anyone to know. No protocol can rule that out (the crash may come
        a microsecond after the check), and the shard is still on that node's disk, so it is
        counted apart (`lost_to_crash`), not as a violation.
        """
        if any(shard in held for n, held in truth.items() if n != node):
            return
        if unseen:
            self.lost_to_crash += 1
        else:
            self._fail("last_copy", f"{node} dropped {shard}, the last live copy")

    def routing(
        self,
        node: str,
        table: Mapping[Shard, Iterable[str]],
        known: Mapping[str, tuple[int, frozenset[Shard]]],
        announced: Mapping[str, Mapping[tuple[int, frozenset[Shard]], int]],
    ) -> None:
        """Every holder `node` routes to really announced, in the version `node` knows of it,
        a set containing that shard (`known`: holder -> (version, shards) as `node` has it;
        `announced`: holder -> every (version, shards) it announced)."""
        for shard, holders in table.items():
            for h in holders:
                version, shards = known.get(h, (-1, frozenset()))
                if shard not in shards or (version, shards) not in announced.get(h, {}):
                    self._fail("routing", f"{node} routes {shard} to {h}, which never announced it")

    def summary(self) -> dict[str, int]:
        return dict(self.violations)
