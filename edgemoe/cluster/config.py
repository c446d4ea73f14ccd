"""Tunables of the cluster cores, in one place, with LAN defaults in the spirit of memberlist.

Every time is in seconds of the node's own clock. `ClusterConfig.lan()` mirrors memberlist's
DefaultLANConfig; `ClusterConfig.fast()` scales it for the simulator and tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ClusterConfig:
    """Protocol tunables; see each field's comment for what it trades."""

    # How often a node probes one peer (SWIM protocol period). Lower finds failures sooner
    # at the cost of more traffic.
    probe_interval: float = 1.0
    # How long to wait for a direct ack before asking `indirect_checks` peers to probe.
    probe_timeout: float = 0.5
    # Peers asked to probe indirectly when a direct probe times out.
    indirect_checks: int = 3
    # Suspicion timeout = suspicion_mult * log10(max(N, 1)) * probe_interval (Lifeguard's
    # minimum); with no confirmations it starts at suspicion_max_timeout_mult times that and
    # shrinks as independent suspicions arrive.
    suspicion_mult: float = 4.0
    suspicion_max_timeout_mult: float = 6.0
    # Lifeguard local health: a node that misses acks scales its probe interval and timeout by
    # (awareness + 1), up to awareness_max - 1.
    awareness_max: int = 8
    # Piggybacked broadcasts are retransmitted retransmit_mult * ceil(log10(N + 1)) times.
    retransmit_mult: int = 4
    # How often a node pushes pending broadcasts to `gossip_nodes` random peers.
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    # Most piggybacked updates in one message (memberlist bounds by UDP packet size).
    max_piggyback: int = 24
    # Full-state anti-entropy with one random peer (also the path by which partitions re-merge).
    push_pull_interval: float = 30.0
    # Join sync: once its view has grown after start, a node sends its member table to a random
    # live peer every join_sync_interval (the peer answers with its full state), so views merge
    # and knowledge doubles per interval when many nodes join at once (piggybacking alone
    # moves max_piggyback items per message). Lower converges a mass join in fewer seconds at
    # the cost of more full-state messages while it lasts.
    join_sync_interval: float = 0.2
    # Each check that finds the view unchanged doubles the interval; after this many such
    # checks in a row the phase ends (the periodic push-pull takes over). Each one costs a node
    # one full-state exchange after its view settled; fewer risk leaving a node that missed a
    # few members waiting for gossip or the periodic push-pull.
    join_sync_backoffs: int = 3
    # Dead members are still gossiped to for this long (lets a wrongly-declared node refute).
    gossip_to_dead: float = 30.0
    # Consensus: a proposer that has not heard a quorum within this time retries with a
    # higher ballot after a random backoff in [0, consensus_backoff] * attempt (capped).
    consensus_timeout: float = 1.0
    consensus_backoff: float = 0.5
    # Within a phase, Prepare/Accept are resent to acceptors that have not answered this often
    # (acceptors answer duplicates idempotently); without it one lost message costs a round.
    consensus_resend: float = 0.25
    # A trigger (membership change, drift) waits this long, plus rank * propose_stagger for
    # the node's rank among live acceptors, so that usually one node proposes.
    propose_delay: float = 2.0
    propose_stagger: float = 0.5
    # Statistics drift above this (injected measure) starts a new epoch; inf disables.
    drift_threshold: float = math.inf
    # Hysteresis of drift: a drift trigger fires no sooner than this long after the node
    # learned the last decided epoch (of any reason: a fresh epoch was placed on fresh
    # statistics and its migration is still under way). Bounds drift epochs to one per
    # interval however noisy the workload, at the cost of following a real shift this much
    # later; membership triggers never wait for it (lost experts must be re-placed at once).
    drift_min_interval: float = 30.0
    # Catch-up requests to a peer whose decision log is longer: at most one per this interval.
    catchup_interval: float = 1.0
    # Migration: a fetch not confirmed within this time is reissued (maybe from another source).
    fetch_timeout: float = 30.0

    @classmethod
    def lan(cls) -> ClusterConfig:
        """memberlist's DefaultLANConfig timings."""
        return cls()

    @classmethod
    def fast(cls) -> ClusterConfig:
        """Timings for the simulator: same ratios as LAN, push-pull and timeouts shortened."""
        return replace(
            cls(),
            push_pull_interval=5.0,
            gossip_to_dead=10.0,
            propose_delay=1.0,
            propose_stagger=0.25,
            fetch_timeout=5.0,
        )

    def retransmit_limit(self, n: int) -> int:
        """How many times one broadcast is piggybacked (memberlist's retransmitLimit)."""
        return self.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))

    def push_pull_every(self, n: int) -> float:
        """Push-pull interval for n members: memberlist's pushPullScale doubles-ish it per
        doubling above 32 members, so full-state traffic stays O(N) cluster-wide."""
        extra = math.ceil(math.log2(n) - math.log2(32)) if n > 32 else 0
        return self.push_pull_interval * (extra + 1)

    def suspicion_bounds(self, n: int) -> tuple[float, float]:
        """(min, max) suspicion timeout for a cluster of n members (memberlist's formula)."""
        scale = max(1.0, math.log10(max(n, 1)))
        lo = self.suspicion_mult * scale * self.probe_interval
        return lo, lo * self.suspicion_max_timeout_mult
