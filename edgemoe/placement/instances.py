"""Small random placement instances: the tests' fixtures and the optimal-gap benchmark."""

from __future__ import annotations

import numpy as np

from edgemoe.placement.problem import Problem


def random_problem(seed: int, S: int = 3, L: int = 2, E: int = 6, K: int = 2,
                   memory_ratio: float = 1.3, samples: int = 60,
                   hetero: bool = True) -> Problem:
    """A random but valid instance: skewed per-server taste, optional heterogeneous links."""
    rng = np.random.default_rng(seed)
    expert_bytes = 1000
    weights = rng.uniform(0.5, 2.0, S)
    slots = np.floor(weights / weights.sum() * memory_ratio * L * E).astype(np.int64)
    while slots.sum() < L * E:
        slots[int(rng.integers(S))] += 1
    taste = rng.dirichlet(np.full(E, 0.3), size=(S, L))  # [S, L, E]
    ss = rng.integers(0, S, samples)
    ls = rng.integers(0, L, samples)
    sets = np.stack([rng.choice(E, K, replace=False, p=taste[s, l]) for s, l in zip(ss, ls,
                                                                                      strict=True)])
    counts = np.zeros((S, L, E))
    np.add.at(counts, (ss[:, None], ls[:, None], sets), 1.0)
    rtt = rng.uniform(0.5e-3, 3e-3, (S, S)) if hetero else np.full((S, S), 1e-3)
    rtt = (rtt + rtt.T) / 2
    np.fill_diagonal(rtt, 0.0)
    bw = rng.uniform(1e8, 1e9, (S, S)) if hetero else np.full((S, S), 5e8)
    return Problem(capacity_bytes=slots * float(expert_bytes),
                   compute_speed=rng.uniform(0.5, 2.0, S) if hetero else np.ones(S),
                   rtt_s=rtt, bandwidth_bps=bw, num_layers=L, num_experts=E, top_k=K,
                   expert_bytes=expert_bytes, hidden_size=256, counts=counts,
                   sample_server=ss, sample_layer=ls, sample_sets=sets,
                   request_rate=rng.uniform(0.5, 2.0, S))
