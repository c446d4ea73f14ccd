"""A co-activation spreading candidate for `edgemoe`'s judged choice (not a strategy of its own).

Why: where compute, not the network, is what a step waits for, a (token, layer) waits for the
server that computes most of its top-k experts: with the per-server transport each holder runs
its part of a token's experts in parallel, so the step takes about the largest part divided by
that holder's speed. `balanced` evens the expected work per server but may still put a token's
co-activated experts on one holder; here each layer's experts are assigned (most used first,
within quotas) to the server that least raises the sample's weighted largest part, computed on
the co-activation sample itself. Quotas follow compute speed (to the power `tilt`) as far as
memory allows (`speed_shares`): a slow server holding its memory's share of every layer slows
each token that calls it, and under load a busy slow holder's queue is what a token waits for
(`tilt` 2 leaves it less); `tilt` None splits by memory, as `uniform` does. `spares` then
fills each server's spare slots with its own most used experts (fewer calls), or leaves them
empty (more work stays parallel on the holders).
"""

from __future__ import annotations

import time

import numpy as np

from edgemoe.placement.base import proportional_quotas
from edgemoe.placement.problem import Placement, Problem, make_placement


def speed_shares(speed: np.ndarray, slots: np.ndarray, total: int) -> np.ndarray:
    """float [S], summing to 1: each server's share of a layer, proportional to its speed but
    at most its memory's share of all `total` experts (water-filling: what a full server
    cannot take goes to the others by speed)."""
    cap = slots / total
    share = np.zeros(len(speed))
    free = np.ones(len(speed), dtype=bool)
    for _ in range(len(speed)):
        left = 1.0 - share[~free].sum()
        share[free] = left * speed[free] / speed[free].sum()
        over = free & (share > cap)
        if not over.any():
            break
        share[over] = cap[over]
        free &= ~over
    return share / share.sum()


def spread(problem: Problem, spares: bool = True, tilt: float | None = 1.0) -> Placement:
    t0 = time.perf_counter()
    S, L, E, K = problem.num_servers, problem.num_layers, problem.num_experts, problem.top_k
    slots = problem.slots.astype(np.int64)
    inv = 1.0 / np.asarray(problem.compute_speed, dtype=np.float64)
    weights = problem.sample_weights()
    speed = np.asarray(problem.compute_speed, dtype=np.float64)
    share = (slots / slots.sum() if tilt is None
             else speed_shares(speed ** tilt, slots.astype(np.float64), L * E))
    holders = np.zeros((S, L, E), dtype=bool)
    free = slots.copy()
    work = np.zeros(S)  # expected rows per server over all layers, for ties
    for l in range(L):
        quota = proportional_quotas(E, share, np.minimum(free, E))
        m = problem.sample_layer == l
        sets, w = problem.sample_sets[m], weights[m]
        use = np.bincount(sets.ravel(), np.repeat(w, K), minlength=E)[:E]
        part = np.zeros((len(sets), S))  # seconds-per-row units each server computes
        rows_of = [np.flatnonzero((sets == e).any(1)) for e in range(E)]
        for e in np.lexsort((np.arange(E), -use)):
            room = np.flatnonzero(quota > 0)
            r = rows_of[e]
            cur = part[r].max(1) if len(r) else np.zeros(0)
            new = np.maximum(cur[:, None], part[np.ix_(r, room)] + inv[room][None, :])
            rise = (w[r, None] * (new - cur[:, None])).sum(0)
            score = rise + 1e-9 * (work[room] + use[e]) * inv[room]
            s = int(room[np.argmin(score)])
            holders[s, l, e] = True
            part[r, s] += inv[s]
            quota[s] -= 1
            free[s] -= 1
            work[s] += use[e]
    if spares:
        for s in range(S):  # spare slots: the server's own most used experts it lacks
            if free[s] > 0:
                score = np.where(holders[s], -np.inf, problem.counts[s] + 1e-9).ravel()
                take = np.argsort(-score, kind="stable")[: free[s]]
                holders[s].ravel()[take[np.isfinite(score[take])]] = True
    name = "spread" if spares else "spread-lean"
    return make_placement(problem, holders, name, time.perf_counter() - t0)
