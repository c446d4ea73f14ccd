"""What an operator must hear about a node that cannot serve, or a cluster too small for its
model: one-line warnings computed from the node's state (pure functions over `NodeFacts`), shown
in `/v1/cluster`'s ``warnings`` and logged with backoff by `log_warnings`.

The facts are read from the daemon in one place (`facts_of`), so the rules stay testable
without a daemon and the daemon's own modules need one line each to use them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Seconds after start before "nobody has the model" is said: mDNS answers within a second or
# two and a seed is contacted within SEED_WAIT_S (3 s), so a node still alone after this is
# not merely starting.
NO_MODEL_GRACE_S = 10.0
# A warning still true is logged again after this, doubling each time up to the cap: the log
# says it early, then stays readable.
REPEAT_FIRST_S = 30.0
REPEAT_MAX_S = 600.0
CHECK_EVERY_S = 2.0  # how often the log task looks at the node

NO_MODEL = (
    "no peer found and no model here: nobody has the model "
    "(give --model-dir or a --seed-peer / check the interface)"
)


@dataclass(frozen=True)
class NodeFacts:
    """The parts of a node's state the warnings depend on."""

    uptime_s: float
    has_model: bool  # a manifest is installed
    peers: int  # peers that proved the cluster secret (found by mDNS, seeds or gossip)
    capacities: tuple[int, ...]  # expert bytes each member (alive or suspect) may hold
    model_expert_bytes: int  # all experts of the model together; 0 while unknown
    expert_bytes: int  # one expert; 0 while unknown


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def capacity_warning(facts: NodeFacts) -> str | None:
    """The members' expert memory together below the model's experts: some expert has no
    holder within capacity."""
    if not facts.model_expert_bytes or not facts.capacities or not facts.expert_bytes:
        return None
    total = sum(facts.capacities)
    if total >= facts.model_expert_bytes:
        return None
    over = math.ceil((facts.model_expert_bytes - total) / facts.expert_bytes)
    return (
        f"cluster memory {human_bytes(total)} below the model's experts "
        f"{human_bytes(facts.model_expert_bytes)}: {over} experts over capacity"
    )


def warnings(facts: NodeFacts) -> list[str]:
    """Every warning that holds now, one line each, most severe first."""
    out: list[str] = []
    if not facts.has_model and facts.peers == 0 and facts.uptime_s >= NO_MODEL_GRACE_S:
        out.append(NO_MODEL)
    if (cap := capacity_warning(facts)) is not None:
        out.append(cap)
    return out


def facts_of(daemon: Any, view: dict[str, Any] | None = None) -> NodeFacts:
    """Read a running `Daemon`'s state: its cluster view (``view``, when the caller has just
    built it) once the cluster driver runs."""
    manifest = daemon.store.manifest
    capacities: tuple[int, ...] = ()  # unknown (no warning) until the node runs its cluster
    if daemon.cluster is not None:
        members = (view if view is not None else daemon.cluster.view()).get("members", [])
        capacities = tuple(
            int(m.get("capacity_bytes", 0))
            for m in members
            if m.get("state") in ("alive", "suspect")  # a suspect may be only slow
        )
    return NodeFacts(
        uptime_s=time.time() - daemon.started,
        has_model=manifest is not None,
        peers=sum(1 for p in daemon.peers.values() if p.trusted),  # answered signed
        capacities=capacities,
        model_expert_bytes=daemon.model_expert_bytes,
        expert_bytes=manifest.expert_bytes if manifest is not None else 0,
    )


def node_warnings(daemon: Any, view: dict[str, Any] | None = None) -> list[str]:
    return warnings(facts_of(daemon, view))


class WarningLog:
    """Which warnings to log now: a new one at once, one still true again after a backoff that
    doubles (REPEAT_FIRST_S .. REPEAT_MAX_S); one that cleared and comes back is new again."""

    def __init__(self) -> None:
        self._next: dict[str, tuple[float, float]] = {}  # warning -> (due, interval)

    def due(self, now: float, current: list[str]) -> list[str]:
        for gone in set(self._next) - set(current):
            del self._next[gone]
        out: list[str] = []
        for text in current:
            due, interval = self._next.get(text, (now, REPEAT_FIRST_S / 2))
            if now >= due:
                out.append(text)
                interval = min(interval * 2, REPEAT_MAX_S)
                self._next[text] = (now + interval, interval)
        return out


async def log_warnings(daemon: Any) -> None:
    """The daemon's periodic task: log each warning as `WarningLog` says."""
    book = WarningLog()
    while True:
        await asyncio.sleep(CHECK_EVERY_S)
        for text in book.due(time.monotonic(), node_warnings(daemon)):
            log.warning("%s", text)
