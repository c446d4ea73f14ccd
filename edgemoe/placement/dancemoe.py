"""`dancemoe`: the DanceMoE/Prism placement (arXiv 2508.12851) as published, and its migration rule.

Stage 1, per server: the server's slots are split across layers in proportion to the entropy
of its own activation distribution in each layer (a flat distribution needs more experts to
cover the same share of activations), and each layer's slots are filled with the server's most
activated experts. Stage 2, coverage: every expert held by nobody is swapped in for the least
used duplicate (an expert held elsewhere too), preferring the same layer so stage 1's
per-layer split is kept.

Migration: move to the new placement only if its expected cost over the horizon plus the time
to move the weights beats staying. The cost model is the paper's activation-frequency one:
expected remote expert activations per token times the cost of one remote call.
"""

from __future__ import annotations

import time

import numpy as np

from edgemoe.placement.base import layer_entropy, proportional_quotas
from edgemoe.placement.problem import Placement, Problem, make_placement


def remote_activation_cost(problem: Problem, holders: np.ndarray) -> float:
    """Seconds of remote calls per token under the frequency model (the paper's cost)."""
    S = problem.num_servers
    cost = problem.call_cost()
    remote_cost = np.array([cost[s][np.arange(S) != s].mean() if S > 1 else 0.0
                            for s in range(S)])
    rate = np.asarray(problem.request_rate, dtype=np.float64)
    share = rate / rate.sum() if rate.sum() > 0 else np.full(S, 1.0 / S)
    total = 0.0
    for s in range(S):
        c = problem.counts[s]
        n_tokens = c.sum() / max(problem.num_layers * problem.top_k, 1)
        if n_tokens <= 0:
            continue
        remote = (c * ~holders[s]).sum() / n_tokens
        total += share[s] * remote * remote_cost[s]
    return float(total)


class DanceMoE:
    """Entropy-proportional per-layer slots, most activated first, coverage by swap."""

    name = "dancemoe"

    def place(self, problem: Problem) -> Placement:
        t0 = time.perf_counter()
        S, L, E = problem.num_servers, problem.num_layers, problem.num_experts
        counts = problem.counts
        holders = np.zeros((S, L, E), dtype=bool)
        entropy = layer_entropy(counts) + 1e-6  # [S, L]
        for s in range(S):
            n = proportional_quotas(int(min(problem.slots[s], L * E)), entropy[s],
                                    np.full(L, E))
            for l in range(L):
                top = np.lexsort((np.arange(E), -counts[s, l]))[: n[l]]
                holders[s, l, top] = True
        usage = counts  # a holder's own use of an expert
        total_use = counts.sum(0)
        free = problem.slots - holders.reshape(S, -1).sum(1)  # kept up to date below
        copies = holders.sum(0)  # [L, E], kept up to date below
        for l in range(L):
            uncovered = np.nonzero(~holders[:, l].any(0))[0]
            uncovered = uncovered[np.lexsort((uncovered, -total_use[l, uncovered]))]
            for u in uncovered:
                if (free > 0).any():
                    s = int(np.argmax(free))
                    holders[s, l, u] = True
                    free[s] -= 1
                    copies[l, u] += 1
                    continue
                same = holders[:, l, :] & (copies[l] > 1)[None]
                if same.any():
                    cand = np.where(same, usage[:, l, :], np.inf)
                    s, e = np.unravel_index(int(np.argmin(cand)), cand.shape)
                    ll = l
                else:
                    dup = holders & (copies > 1)[None]
                    cand = np.where(dup, usage, np.inf)
                    s, ll, e = np.unravel_index(int(np.argmin(cand)), cand.shape)
                holders[s, ll, e] = False
                holders[s, l, u] = True
                copies[ll, e] -= 1
                copies[l, u] += 1
        return make_placement(problem, holders, self.name, time.perf_counter() - t0)

    def migrate(self, problem: Problem, current: Placement, horizon_s: float) -> Placement:
        """The paper's rule: new placement only if cost * horizon + move time beats staying."""
        target = self.place(problem)
        rate = float(np.sum(problem.request_rate))
        stay = remote_activation_cost(problem, current.holders) * rate * horizon_s
        go = remote_activation_cost(problem, target.holders) * rate * horizon_s
        go += migration_time_s(problem, current.holders, target.holders)
        return target if go < stay else current


def migration_time_s(problem: Problem, current: np.ndarray, target: np.ndarray) -> float:
    """Seconds to copy the new holdings: per receiving server, its bytes over its best link."""
    S = problem.num_servers
    new = target & ~current
    bw = np.asarray(problem.bandwidth_bps, dtype=np.float64).copy()
    np.fill_diagonal(bw, 0.0)
    worst = 0.0
    for s in range(S):
        n = int(new[s].sum())
        if n:
            worst = max(worst, n * problem.expert_bytes * 8.0 / max(bw[:, s].max(), 1.0))
    return worst
