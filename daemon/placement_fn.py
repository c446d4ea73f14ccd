"""The daemon's placement function: members' capacities and activation snapshots -> which node
holds which experts, computed by an `edgemoe.placement` strategy. Deterministic for the same
inputs (members sorted by id), so any acceptor can recompute a proposal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edgemoe.stats.snapshot import ActivationSnapshot

Assignment = dict[str, set[tuple[int, int]]]
LAN_RTT_S = 2e-4
LAN_BANDWIDTH_BPS = 1e9


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_experts: int
    top_k: int
    expert_bytes: int
    hidden_size: int
    activation_bytes: int = 4


def build_problem(
    shape: ModelShape,
    capacities: Mapping[str, int],
    snapshots: Mapping[str, ActivationSnapshot],
):  # type: ignore[no-untyped-def]
    """An `edgemoe.placement.Problem` for these members (sorted by node id)."""
    from edgemoe.placement.problem import Problem

    names = tuple(sorted(capacities))
    S, L, E, K = len(names), shape.num_layers, shape.num_experts, shape.top_k
    counts = np.zeros((S, L, E))
    servers, layers, sets, rate = [], [], [], np.zeros(S)
    for i, name in enumerate(names):
        snap = snapshots.get(name)
        if snap is None or snap.counts.shape != (L, E):
            continue
        counts[i] = np.maximum(snap.counts, 0.0)
        rate[i] = max(0.0, float(snap.request_rate))
        ok = (snap.coact_sets.shape[1] == K) if snap.coact_sets.ndim == 2 else False
        if ok and len(snap.coact_layers):
            valid = (snap.coact_sets >= 0).all(1) & (snap.coact_sets < E).all(1)
            valid &= (snap.coact_layers >= 0) & (snap.coact_layers < L)
            layers.append(snap.coact_layers[valid])
            sets.append(snap.coact_sets[valid])
            servers.append(np.full(int(valid.sum()), i))
    if rate.sum() <= 0:
        rate[:] = 1.0
    rtt = np.full((S, S), LAN_RTT_S)
    np.fill_diagonal(rtt, 0.0)
    return Problem(
        capacity_bytes=np.array([float(capacities[n]) for n in names]),
        compute_speed=np.ones(S),
        rtt_s=rtt,
        bandwidth_bps=np.full((S, S), LAN_BANDWIDTH_BPS),
        num_layers=L,
        num_experts=E,
        top_k=K,
        expert_bytes=shape.expert_bytes,
        hidden_size=shape.hidden_size,
        counts=counts,
        sample_server=np.concatenate(servers) if servers else np.zeros(0, dtype=np.int64),
        sample_layer=np.concatenate(layers) if layers else np.zeros(0, dtype=np.int64),
        sample_sets=np.concatenate(sets) if sets else np.zeros((0, K), dtype=np.int64),
        request_rate=rate,
        activation_bytes=shape.activation_bytes,
        server_names=names,
    )


def feasible_capacities(shape: ModelShape, capacities: Mapping[str, int]) -> dict[str, int]:
    """Capacities scaled up (deterministically) until every expert fits once: a cluster too
    small for the model still serves, its members over-committed, rather than not at all."""
    need = shape.num_layers * shape.num_experts
    caps = {n: max(0, int(c)) for n, c in capacities.items()}
    slots = sum(c // shape.expert_bytes for c in caps.values())
    if slots >= need or not caps:
        return caps
    total = sum(caps.values())
    share = {n: (c / total if total > 0 else 1 / len(caps)) for n, c in caps.items()}
    grown = {n: int(np.ceil(need * share[n]) + 1) * shape.expert_bytes for n in caps}
    return {n: max(caps[n], grown[n]) for n in caps}


def place(
    strategy: str,
    shape: ModelShape,
    capacities: Mapping[str, int],
    snapshots: Mapping[str, ActivationSnapshot],
) -> tuple[Assignment, dict[str, dict[tuple[int, int], str]]]:
    """(node -> held experts, node -> {expert: node it calls}) from the named strategy."""
    from edgemoe.placement import get_strategy

    problem = build_problem(shape, feasible_capacities(shape, capacities), snapshots)
    # Every acceptor recomputes a proposal and must get the same answer: the strategies'
    # searches are bounded by counts of work, never by wall-clock time.
    result = get_strategy(strategy).place(problem)
    names = problem.server_names
    assignment = {name: result.held_by(i) for i, name in enumerate(names)}
    routes: dict[str, dict[tuple[int, int], str]] = {}
    for i, name in enumerate(names):
        ls, es = np.nonzero(~result.holders[i])
        routes[name] = {
            (int(l), int(e)): names[int(result.route[i, l, e])] for l, e in zip(ls, es, strict=True)
        }
    return assignment, routes
