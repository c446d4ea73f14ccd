"""How much one server gains from holding a prefix of an expert order: value curves and the
knapsack over layers (edgemoe's per-server choice, see `latency`).

1. Value curves. For server s and layer l, order experts (first those s must keep because
   nobody else holds them, then by s's own activation count, or whole co-activated sets first:
   `set_rank`). A sample (token, layer) becomes fully local once s holds the first ``need``
   experts of that order, ``need`` = 1 + the highest rank among its top-k. A histogram of
   ``need`` weighted by the sample weight times s's remote call cost (heterogeneity: slow
   links and slow holders make locality worth more), cumulated, gives ``f[l, n]`` = value of
   holding the first n experts of layer l.
2. Per server, an exact dynamic programme over layers picks n_l (sum <= capacity) maximising
   sum_l f[l, n_l]: it concentrates memory on layers it can make fully local instead of
   spreading it thin (the knapsack over non-concave curves that a per-layer quota misses).
"""

from __future__ import annotations

import numpy as np


def count_rank(counts_sl: np.ndarray, required: np.ndarray) -> np.ndarray:
    """int [L, E]: position of every expert in s's order (required first, then by count)."""
    L, E = counts_sl.shape
    key = counts_sl + np.where(required, counts_sl.max() + 1.0, 0.0)
    order = np.lexsort((np.broadcast_to(np.arange(E), (L, E)), -key), axis=-1)
    rank = np.empty((L, E), dtype=np.int64)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(E), (L, E)), axis=-1)
    return rank


def set_rank(counts_sl: np.ndarray, required: np.ndarray, layers: np.ndarray,
              sets: np.ndarray, weights: np.ndarray,
              price: np.ndarray | None = None) -> np.ndarray:
    """int [L, E]: an order per layer in which whole top-k sets complete early (greedy).

    Set-union knapsack greedy, all layers in lockstep: after the required experts, repeatedly
    take in every layer the sample set with the most weight per expert still missing (identical
    sets pooled), appending its missing experts by count; experts no sample needs come last by
    count. Holding a prefix of this order makes far more (token, layer) pairs fully local than a
    prefix by per-expert count, which splits co-activated sets. `price` [L, E] (value units) is
    charged for every missing expert a set needs: sets worth less than their price wait.
    """
    L, E = counts_sl.shape
    pos = np.full((L, E), -1, dtype=np.int64)
    nxt = np.zeros(L, dtype=np.int64)
    held = required.copy()
    # required first, by count
    for l in np.flatnonzero(required.any(1)):
        req = np.flatnonzero(required[l])
        req = req[np.lexsort((req, -counts_sl[l, req]))]
        pos[l, req] = np.arange(len(req))
        nxt[l] = len(req)
    if len(layers):
        key = np.concatenate([layers[:, None], np.sort(sets, axis=1)], axis=1)
        groups, inv = np.unique(key, axis=0, return_inverse=True)
        gw = np.bincount(inv.ravel(), weights, minlength=len(groups))
        gl, gs = groups[:, 0], groups[:, 1:]
        pr = price if price is not None else np.zeros((L, E))
        while len(gl):
            missing = ~held[gl[:, None], gs]
            miss = missing.sum(1)
            keep = miss > 0  # drop sets already complete
            gl, gs, gw, missing, miss = gl[keep], gs[keep], gw[keep], missing[keep], miss[keep]
            net = gw - (pr[gl[:, None], gs] * missing).sum(1)
            score = np.where(net > 0, net / np.maximum(miss, 1), -1.0)
            best = np.full(L, -1.0)
            np.maximum.at(best, gl, score)
            # the first set reaching its layer's best score (deterministic)
            idx = np.flatnonzero((score == best[gl]) & (score > 0))
            if not len(idx):
                break
            active, first = np.unique(gl[idx], return_index=True)
            rows = idx[first]
            g, mg = gs[rows], missing[rows]  # [A, K]
            key = np.where(mg, -counts_sl[active[:, None], g], np.inf)
            order = np.lexsort((g, key), axis=-1)  # missing experts by count, then id
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, np.broadcast_to(np.arange(g.shape[1]), g.shape),
                              axis=-1)
            la = np.broadcast_to(active[:, None], g.shape)
            pos[la[mg], g[mg]] = (nxt[active][:, None] + rank)[mg]
            nxt[active] += mg.sum(1)
            held[la[mg], g[mg]] = True
    # the rest by count
    for l in range(L):
        rest = np.flatnonzero(pos[l] < 0)
        rest = rest[np.lexsort((rest, -counts_sl[l, rest]))]
        pos[l, rest] = nxt[l] + np.arange(len(rest))
    return pos


def value_curves(rank: np.ndarray, layers: np.ndarray, sets: np.ndarray,
                  weights: np.ndarray) -> np.ndarray:
    """float [L, E+1]: f[l, n] = weight of samples fully local when holding rank < n."""
    L, E = rank.shape
    need = rank[layers[:, None], sets].max(1) + 1
    f = np.zeros((L, E + 1))
    np.add.at(f, (layers, need), weights)
    return np.cumsum(f, axis=1)


def best_prefixes(f: np.ndarray, lo: np.ndarray, capacity: int,
        value: np.ndarray | None = None) -> np.ndarray:
    """int [L]: n_l in [lo_l, E] with sum <= capacity maximising sum f[l, n_l] (exact).

    Only values of n where f rises (and lo_l) are candidates: holding more for the same value is
    dominated, and the leftover capacity is filled afterwards. With few samples per layer this
    shrinks the inner dimension from E+1 to the number of distinct "need" values. `value`
    (default f) is what is maximised, e.g. f less the price of the experts held.
    """
    L, E1 = f.shape
    v = f if value is None else value
    lo = np.asarray(lo, dtype=np.int64)
    # the DP runs over capacity beyond the required minimum: n_l - lo_l (exact, and far smaller
    # when most of a server's slots hold experts only it has)
    C = int(min(capacity, L * (E1 - 1))) - int(lo.sum())
    if C < 0:
        raise ValueError("required experts exceed the server's capacity")
    neg = -np.inf
    best = np.full(C + 1, neg)
    best[0] = 0.0
    choice = np.zeros((L, C + 1), dtype=np.int64)
    cs = np.arange(C + 1)
    for l in range(L):
        rises = np.flatnonzero(np.diff(f[l]) > 0) + 1
        cand = np.unique(np.concatenate([[lo[l]], rises[(rises > lo[l]) & (rises <= lo[l] + C)]]))
        prev = cs[:, None] - (cand - lo[l])[None, :]  # [C+1, n_cand]
        tot = np.where(prev >= 0, best[np.maximum(prev, 0)], neg) + v[l, cand][None, :]
        j = np.argmax(tot, axis=1)
        best = tot[cs, j]
        choice[l] = cand[j]
    c = int(np.argmax(best))
    n = np.zeros(L, dtype=np.int64)
    for l in range(L - 1, -1, -1):
        n[l] = choice[l, c]
        c -= int(n[l] - lo[l])
    return n

