"""A compute-balanced candidate for `edgemoe`'s judged choice (not a strategy of its own).

Why: where compute, not the network, is what a step waits for (a fast network, or slow
servers), a layer's experts concentrated on one holder make it the bottleneck, and a slow
server holding as many experts as its memory allows slows every token that calls it. Here
each layer's experts are spread over all servers in proportion to capacity (every server
computes part of a token's experts in parallel), the most used ones going to the server
whose expected expert work, divided by its speed, is lowest; spare slots then take each
server's own most used experts (fewer calls where memory allows).
"""

from __future__ import annotations

import time

import numpy as np

from edgemoe.placement.base import proportional_quotas
from edgemoe.placement.problem import Placement, Problem, make_placement


def balanced(problem: Problem) -> Placement:
    t0 = time.perf_counter()
    S, L, E = problem.num_servers, problem.num_layers, problem.num_experts
    slots = problem.slots.astype(np.int64)
    speed = np.asarray(problem.compute_speed, dtype=np.float64)
    rate = np.asarray(problem.request_rate, dtype=np.float64)
    per = problem.counts.sum(axis=(1, 2))
    w = np.divide(rate, per, out=np.zeros(S), where=per > 0)  # each server's counts per second
    use = np.einsum("s,sle->le", w, problem.counts)  # [L, E] expected calls per second
    holders = np.zeros((S, L, E), dtype=bool)
    free = slots.copy()
    work = np.zeros(S)
    for l in range(L):
        quota = proportional_quotas(E, slots.astype(np.float64), np.minimum(free, E))
        for e in np.lexsort((np.arange(E), -use[l])):
            room = np.flatnonzero(quota > 0)
            s = int(room[np.argmin((work[room] + use[l, e]) / speed[room])])
            holders[s, l, e] = True
            quota[s] -= 1
            free[s] -= 1
            work[s] += use[l, e]
    for s in range(S):  # spare slots: the server's own most used experts it lacks
        if free[s] > 0:
            score = np.where(holders[s], -np.inf, problem.counts[s] + 1e-9).ravel()
            take = np.argsort(-score, kind="stable")[: free[s]]
            holders[s].ravel()[take[np.isfinite(score[take])]] = True
    return make_placement(problem, holders, "balanced", time.perf_counter() - t0)
