"""Cluster benchmark on the simulator: what `edgemoe bench cluster` prints and writes.

`run_bench` runs one scenario built from the command's knobs (nodes, loss, a partition,
crashed nodes); `sweep` runs the issue's set: membership spread rounds and per-node message
rates for N = 8..1024, consensus cost and time to decide at 0/10/30% loss, and the time to
re-place after a crash. Everything is simulated time from seeded runs, so it replays exactly.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from typing import Any

from edgemoe.cluster.config import ClusterConfig
from edgemoe.cluster.simnet import RunResult, Scenario, SimNet

PARTITION_AT = 5.0
CONSENSUS = ("Prepare", "Promise", "Accept", "Accepted", "Nack", "Learn", "CatchUp")


def decide_times(net: SimNet) -> list[float]:
    """Per epoch after genesis: first Prepare for it to its first decision (simulated s)."""
    return [
        net.first_decided[e] - net.first_prepare[e]
        for e in sorted(net.first_decided)
        if e in net.first_prepare
    ]


def replace_time(net: SimNet, crashed: set[str], at: float) -> float | None:
    """Seconds from the crash at `at` until every live node has decided the first epoch after
    it whose members exclude `crashed` (None if none was)."""
    decided = [(t, rest[0], rest[1]) for t, kind, *rest in net.trace if kind == "decided"]
    before = max((e for t, _, e in decided if t < at), default=0)
    live = set(net.live())
    for epoch in sorted({e for t, _, e in decided if e > before}):
        value = next(v for n in net.ids for v in net.storage[n].decisions() if v.epoch == epoch)
        if crashed & set(value.member_ids()):
            continue
        times = {n: t for t, n, e in decided if e == epoch and n in live}
        return max(times.values()) - at if set(times) == live else None
    return None


def _summary(res: RunResult, net: SimNet) -> dict[str, Any]:
    gi = net.config.gossip_interval
    dt = decide_times(net)
    return {
        "membership_rounds": (
            (res.converged_at - net.last_start) / gi if res.converged_at is not None else None
        ),
        "epochs_decided": res.decided_epochs,
        "first_decision_s": res.first_decision_at,
        "decide_s_mean": statistics.fmean(dt) if dt else None,
        "decide_s_max": max(dt) if dt else None,
        "msgs_per_node_s": res.msgs_per_node_s,
        "messages": res.messages,
        "consensus_messages": res.consensus_messages,
        "consensus_msgs_per_epoch": (
            res.consensus_messages / res.decided_epochs if res.decided_epochs else None
        ),
        "violations": res.violations,
        "violations_total": sum(res.violations.values()),
        "violation_examples": res.examples,
        "lost_to_crash": res.lost_to_crash,
        "trace_digest": res.trace_digest,
    }


def bench_scenario(
    nodes: int, loss: float, partition_s: float, crash: int, seed: int, duration: float = 0.0
) -> Scenario:
    """The scenario of one `bench cluster` run: a majority/minority partition from
    PARTITION_AT for `partition_s`, then `crash` nodes (the last ones) down for good."""
    parts: tuple[tuple[float, float, tuple[tuple[int, ...], ...]], ...] = ()
    if partition_s > 0 and nodes > 1:
        minority = tuple(range(nodes - (nodes - 1) // 2 or 1, nodes))
        majority = tuple(i for i in range(nodes) if i not in minority)
        parts = ((PARTITION_AT, PARTITION_AT + partition_s, (majority, minority)),)
    crash_at = PARTITION_AT + partition_s + 3.0
    # victims from the majority side (index 0 is everyone's join seed, so start at 1)
    crashes = tuple((crash_at, 1 + i, math.inf) for i in range(min(crash, nodes - 1)))
    dur = duration or max(30.0, crash_at + 40.0 if crash else PARTITION_AT + partition_s + 25.0)
    return Scenario(
        nodes=nodes,
        seed=seed,
        duration=dur,
        loss=loss,
        duplicate=0.05 if loss else 0.0,
        partitions=parts,
        crashes=crashes,
        check_every=min(0.5, ClusterConfig.fast().gossip_interval),
    )


def run_bench(
    nodes: int = 8,
    loss: float = 0.0,
    partition_s: float = 0.0,
    crash: int = 0,
    seed: int = 0,
    duration: float = 0.0,
) -> dict[str, Any]:
    """One run: the summary plus the scenario (which replays it exactly)."""
    sc = bench_scenario(nodes, loss, partition_s, crash, seed, duration)
    net = SimNet(sc)
    res = net.run()
    out = _summary(res, net)
    if sc.crashes:
        gone = {net.ids[i] for _, i, _ in sc.crashes}
        out["replace_s"] = replace_time(net, gone, sc.crashes[0][0])
    out["scenario"] = asdict(sc)
    return out


def spread(nodes: int, seed: int, crash_at: float = 6.0, duration: float = 0.0) -> dict[str, Any]:
    """A converged cluster of `nodes` (static member list) loses one node: time to the first
    death verdict, gossip rounds until every live node holds it, steady msgs/node/s."""
    cfg = ClusterConfig.fast()
    hi = cfg.suspicion_bounds(nodes)[1]
    dur = duration or crash_at + cfg.probe_interval * 4 + hi + 10.0
    sc = Scenario(
        nodes=nodes,
        seed=seed,
        duration=dur,
        preload=True,
        genesis=min(nodes, 8),
        layers=2,
        experts=4,
        crashes=((crash_at, nodes - 1, math.inf),),
        check_every=dur,
    )
    net = SimNet(sc)
    net.run(crash_at / 2)
    sent = net.messages
    net.sc = sc
    net.run(crash_at)
    steady = (net.messages - sent) / nodes / (crash_at / 2)  # after start-up chatter
    net.sc = sc
    victim = net.ids[-1]
    live = set(net.ids) - {victim}
    seen: dict[str, float] = {}
    done = 0
    while len(seen) < len(live) and net.step():  # stop once every live node knows
        for t, obs, subj in net.deaths[done:]:
            if subj == victim:
                seen.setdefault(obs, t)
        done = len(net.deaths)
    first = min(seen.values()) if seen else None
    rounds = None
    if first is not None and live <= set(seen):
        rounds = (max(seen[n] for n in live) - first) / cfg.gossip_interval
    return {
        "nodes": nodes,
        "seed": seed,
        "detect_s": first - crash_at if first is not None else None,
        "spread_rounds": rounds,
        "aware": len(live & set(seen)),
        "live": len(live),
        "msgs_per_node_s": steady,
        "log2_n": math.log2(nodes),
    }


def join(nodes: int, seed: int) -> dict[str, Any]:
    """All `nodes` join through seeds within 1 s: gossip rounds from the last start until every
    node sees every other alive; messages per node until then, and how many of them were
    full-state push-pulls (join sync and its replies, periodic anti-entropy)."""
    sc = Scenario(nodes=nodes, seed=seed, duration=60.0, layers=2, experts=4, check_every=0.1)
    net = SimNet(sc)
    while net.converged_at is None and net.step():
        pass
    gi = net.config.gossip_interval
    conv = net.converged_at
    return {
        "nodes": nodes,
        "seed": seed,
        "join_rounds": (conv - net.last_start) / gi if conv is not None else None,
        "msgs_per_node_s": net.messages / nodes / max(net.now, 1e-9),
        "msgs_per_node": net.messages / nodes,
        "push_pulls_per_node": net.sent_by_type.get("PushPull", 0) / nodes,
    }


def sweep(
    seed: int = 0,
    sizes: tuple[int, ...] = (8, 64, 256, 1024),
    join_sizes: tuple[int, ...] = (8, 64, 256),
    losses: tuple[float, ...] = (0.0, 0.1, 0.3),
    seeds: int = 3,
) -> dict[str, Any]:
    """The issue's simulated set; each row is a mean over `seeds` seeds where noted."""
    membership = [spread(n, seed) for n in sizes]
    joins = [join(n, seed) for n in join_sizes]
    consensus = []
    for loss in losses:
        runs = [run_bench(nodes=8, loss=loss, crash=1, seed=seed + k) for k in range(seeds)]
        dts = [r["decide_s_mean"] for r in runs if r["decide_s_mean"] is not None]
        per = [r["consensus_msgs_per_epoch"] for r in runs if r["consensus_msgs_per_epoch"]]
        rep = [r["replace_s"] for r in runs if r.get("replace_s") is not None]
        consensus.append(
            {
                "loss": loss,
                "seeds": seeds,
                "decide_s_mean": statistics.fmean(dts) if dts else None,
                "decide_s_max": max((r["decide_s_max"] or 0.0) for r in runs),
                "consensus_msgs_per_epoch": statistics.fmean(per) if per else None,
                "replace_s_mean": statistics.fmean(rep) if rep else None,
                "replaced": len(rep),
                "violations_total": sum(r["violations_total"] for r in runs),
            }
        )
    return {"membership": membership, "join": joins, "consensus": consensus}
