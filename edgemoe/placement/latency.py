"""`edgemoe`: our latency-aware placement.

Why not frequency: a decode step of a layer waits for its slowest remote call, so holding 5 of a
token's 6 experts locally saves (almost) nothing; what matters is how often a (token, layer)
needs *any* remote call. With the co-activation sample we can count exactly that.

Algorithm (all vectorised with numpy):

1. Value curves. For server s and layer l, order experts (first those s must keep because
   nobody else holds them, then by s's own activation count). A sample (token, layer) becomes
   fully local once s holds the first ``need`` experts of that order, ``need`` = 1 + the highest
   rank among its top-k. A histogram of ``need`` weighted by the sample weight times s's remote
   call cost (heterogeneity: slow links and slow holders make locality worth more), cumulated,
   gives ``f[l, n]`` = value of holding the first n experts of layer l.
2. Per server, an exact dynamic programme over layers picks n_l (sum <= capacity) maximising
   sum_l f[l, n_l]: it concentrates memory on layers it can make fully local instead of
   spreading it thin (the knapsack over non-concave curves that a per-layer quota misses).
3. First pass: servers in ascending capacity choose freely; a server must additionally take
   uncovered experts when the servers after it cannot hold them all; the last covers the rest.
4. Coordinate descent sweeps: each server re-solves its DP given the others (its "must keep"
   set = experts nobody else holds), kept only if the true objective improves.
5. Routing: nearest holder, ties spread by expert (see `nearest_routes`).

Migration (`migrate`): the objective decomposes by layer, so each layer's new holdings can be
adopted separately; layers are taken in order of gain per byte while the gain over the horizon
outweighs the link time the copy costs and capacities hold.
"""

from __future__ import annotations

import time

import numpy as np

from edgemoe.placement.problem import (
    Placement,
    Problem,
    make_placement,
    sample_costs,
)


def _rank(counts_sl: np.ndarray, required: np.ndarray) -> np.ndarray:
    """int [L, E]: position of every expert in s's order (required first, then by count)."""
    L, E = counts_sl.shape
    key = counts_sl + np.where(required, counts_sl.max() + 1.0, 0.0)
    order = np.lexsort((np.broadcast_to(np.arange(E), (L, E)), -key), axis=-1)
    rank = np.empty((L, E), dtype=np.int64)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(E), (L, E)), axis=-1)
    return rank


def _value_curves(rank: np.ndarray, layers: np.ndarray, sets: np.ndarray,
                  weights: np.ndarray) -> np.ndarray:
    """float [L, E+1]: f[l, n] = weight of samples fully local when holding rank < n."""
    L, E = rank.shape
    need = rank[layers[:, None], sets].max(1) + 1
    f = np.zeros((L, E + 1))
    np.add.at(f, (layers, need), weights)
    return np.cumsum(f, axis=1)


def _dp(f: np.ndarray, lo: np.ndarray, capacity: int) -> np.ndarray:
    """int [L]: n_l in [lo_l, E] with sum <= capacity maximising sum f[l, n_l] (exact).

    Only values of n where f rises (and lo_l) are candidates: holding more for the same value is
    dominated, and the leftover capacity is filled afterwards. With few samples per layer this
    shrinks the inner dimension from E+1 to the number of distinct "need" values.
    """
    L, E1 = f.shape
    C = int(min(capacity, L * (E1 - 1)))
    neg = -np.inf
    best = np.full(C + 1, neg)
    best[0] = 0.0
    choice = np.zeros((L, C + 1), dtype=np.int64)
    cs = np.arange(C + 1)
    for l in range(L):
        rises = np.flatnonzero(np.diff(f[l]) > 0) + 1
        cand = np.unique(np.concatenate([[lo[l]], rises[rises > lo[l]]]))
        prev = cs[:, None] - cand[None, :]  # [C+1, n_cand]
        tot = np.where(prev >= 0, best[np.maximum(prev, 0)], neg) + f[l, cand][None, :]
        j = np.argmax(tot, axis=1)
        best = tot[cs, j]
        choice[l] = cand[j]
    c = int(np.argmax(best))
    if best[c] == neg:
        raise ValueError("required experts exceed the server's capacity")
    n = np.zeros(L, dtype=np.int64)
    for l in range(L - 1, -1, -1):
        n[l] = choice[l, c]
        c -= int(n[l])
    return n


class LatencyAware:
    """Latency-aware, co-activation aware, heterogeneity aware placement (see module doc)."""

    name = "edgemoe"

    def __init__(self, sweeps: int = 2, search_s: float = 0.5,
                 multistart_max: int = 2048) -> None:
        self.sweeps = sweeps
        self.search_s = search_s
        self.multistart_max = multistart_max

    def _server_holdings(self, problem: Problem, s: int, required: np.ndarray,
                         capacity: int) -> np.ndarray:
        counts = problem.counts[s]
        rank = _rank(counts, required)
        m = problem.sample_server == s
        w = self._weights[m] * self._remote_cost[s]
        f = _value_curves(rank, problem.sample_layer[m], problem.sample_sets[m], w)
        n = _dp(f, required.sum(1), capacity)
        held = rank < n[:, None]
        left = capacity - int(held.sum())
        if left > 0:  # spare slots: the most used experts not yet held (fewer remote bytes)
            score = np.where(held, -np.inf, counts + 1e-9).ravel()
            take = np.argsort(-score, kind="stable")[:left]
            take = take[np.isfinite(score[take])]
            held.ravel()[take] = True
        return held

    def _own_cost(self, problem: Problem, s: int, holders: np.ndarray) -> float:
        """Server s's weighted sample cost with nearest holders (the part s's choice drives)."""
        m = problem.sample_server == s
        if not m.any():
            return 0.0
        c = np.where(holders, self._cost[s][:, None, None], np.inf).min(0)  # [L, E]
        per = c[problem.sample_layer[m][:, None], problem.sample_sets[m]].max(1)
        return float((per * self._weights[m]).sum())

    def place(self, problem: Problem) -> Placement:
        t0 = time.perf_counter()
        holders = self._solve(problem)
        return make_placement(problem, holders, self.name, time.perf_counter() - t0)

    def _solve(self, problem: Problem) -> np.ndarray:
        S, L, E = problem.num_servers, problem.num_layers, problem.num_experts
        slots = problem.slots
        cost = self._cost = problem.call_cost()
        self._remote_cost = np.array(
            [cost[s][np.arange(S) != s].min() if S > 1 else 0.0 for s in range(S)])
        self._weights = problem.sample_weights()
        holders = np.zeros((S, L, E), dtype=bool)
        order = np.lexsort((np.arange(S), slots))  # ascending capacity
        for i, s in enumerate(order):
            rest = int(slots[order[i + 1:]].sum())
            required = np.zeros((L, E), dtype=bool)
            if i == len(order) - 1:
                required = ~holders.any(0)
            for _ in range(L * E):
                h = self._server_holdings(problem, s, required, int(slots[s]))
                uncovered = ~(holders.any(0) | h)
                deficit = int(uncovered.sum()) - rest
                if deficit <= 0:
                    break
                # the servers after this one cannot cover the rest: keep the uncovered experts
                # this server uses most
                cand = np.flatnonzero(uncovered & ~required)
                use = problem.counts[s].ravel()[cand]
                take = cand[np.lexsort((cand, -use))][:deficit]
                required.ravel()[take] = True
            holders[s] = h
        for _ in range(self.sweeps):
            improved = False
            for s in order:
                others = np.delete(holders, s, axis=0).any(0)
                trial = holders.copy()
                trial[s] = self._server_holdings(problem, s, ~others, int(slots[s]))
                if self._own_cost(problem, s, trial) < self._own_cost(problem, s, holders) - 1e-15:
                    holders, improved = trial, True
            if not improved:
                break
        if self.search_s > 0:
            holders = self._local_search(problem, holders)
            if self.multistart_max >= S * L * E:
                # small instances: also polish the baselines' placements, keep the best
                from edgemoe.placement.dancemoe import DanceMoE
                from edgemoe.placement.eplb import Eplb
                from edgemoe.placement.layers import Layers

                best = self._total(problem, holders)
                for other in (DanceMoE(), Eplb(), Layers()):
                    h = self._local_search(problem, other.place(problem).holders)
                    v = self._total(problem, h)
                    if v < best - 1e-15:
                        holders, best = h, v
        return holders

    def _total(self, problem: Problem, holders: np.ndarray) -> float:
        return sum(self._layer_cost(problem, holders[:, l], l) for l in range(holders.shape[1]))

    def _layer_cost(self, problem: Problem, holders_l: np.ndarray, l: int) -> float:
        """Weighted sample cost of layer l given its holders bool [S, E] (nearest holder)."""
        idx = self._by_layer[l]
        if len(idx) == 0:
            return 0.0
        c = np.where(holders_l[None, :, :], self._cost[:, :, None], np.inf).min(1)  # [S, E]
        per = c[problem.sample_server[idx][:, None], problem.sample_sets[idx]].max(1)
        return float((per * self._weights[idx]).sum())

    def _local_search(self, problem: Problem, holders: np.ndarray) -> np.ndarray:
        """Replace and exchange moves on the exact objective, first improvement, bounded.

        replace: server s drops a copy that someone else also holds and takes an expert it
        lacks; exchange: servers s and t trade one expert each (moves sole copies).
        """
        S, L, E = holders.shape
        self._by_layer = [np.flatnonzero(problem.sample_layer == l) for l in range(L)]
        layer_cost = np.array([self._layer_cost(problem, holders[:, l], l) for l in range(L)])
        deadline = time.perf_counter() + self.search_s
        improved = True
        while improved and time.perf_counter() < deadline:
            improved = False
            for s in range(S):
                held = np.argwhere(holders[s])
                lacks = np.argwhere(~holders[s])
                # most promising first: drop least used, add most used by s
                held = held[np.argsort(problem.counts[s][held[:, 0], held[:, 1]], kind="stable")]
                lacks = lacks[np.argsort(-problem.counts[s][lacks[:, 0], lacks[:, 1]],
                                         kind="stable")][: 4 * E]
                if holders[s].sum() < problem.slots[s]:  # a free slot: plain additions
                    for li, ei in lacks:
                        trial = holders.copy()
                        trial[s, li, ei] = True
                        v = self._layer_cost(problem, trial[:, li], li)
                        if v < layer_cost[li] - 1e-15:
                            holders, layer_cost[li], improved = trial, v, True
                            break
                    if improved:
                        break
                for lo, eo in held[: 4 * E]:
                    sole = holders[:, lo, eo].sum() == 1
                    free_t = [int(t) for t in np.flatnonzero(
                        holders.reshape(S, -1).sum(1) < problem.slots) if t != s]
                    if sole and free_t:  # relocate the sole copy to a server with room
                        for t in free_t:
                            trial = holders.copy()
                            trial[s, lo, eo] = False
                            trial[t, lo, eo] = True
                            v = self._layer_cost(problem, trial[:, lo], lo)
                            if v < layer_cost[lo] - 1e-15:
                                holders, layer_cost[lo], improved = trial, v, True
                                break
                        if improved:
                            break
                    for li, ei in lacks:
                        if time.perf_counter() > deadline:
                            return holders
                        movable = holders[:, li, ei] & ~holders[:, lo, eo]
                        partners = [None] if not sole else [int(t) for t in np.flatnonzero(movable)]
                        for t in partners:
                            trial = holders.copy()
                            trial[s, lo, eo] = False
                            trial[s, li, ei] = True
                            if t is not None:  # exchange: t gives (li, ei), takes (lo, eo)
                                trial[t, li, ei] = False
                                trial[t, lo, eo] = True
                                if not trial[:, li, ei].any():
                                    continue
                            layers = {int(lo), int(li)}
                            new = {l: self._layer_cost(problem, trial[:, l], l) for l in layers}
                            if sum(new.values()) < sum(layer_cost[l] for l in layers) - 1e-15:
                                holders = trial
                                for l, v in new.items():
                                    layer_cost[l] = v
                                improved = True
                                break
                        if improved:
                            break
                    if improved:
                        break
                if improved:
                    break
        return holders

    def migrate(self, problem: Problem, current: Placement, horizon_s: float,
                bytes_weight: float = 1.0) -> Placement:
        """Adopt the target layer by layer where gain over the horizon beats the copy time."""
        target = self.place(problem)
        S, L = problem.num_servers, problem.num_layers
        rate = float(np.sum(problem.request_rate))
        bw = np.asarray(problem.bandwidth_bps, dtype=np.float64)[~np.eye(S, dtype=bool)]
        bw_mean = float(bw.mean()) if len(bw) else 1.0
        w = problem.sample_weights()
        cur_cost = sample_costs(problem, current.route) * w
        tgt_cost = sample_costs(problem, target.route) * w
        gains = np.bincount(problem.sample_layer, cur_cost - tgt_cost, minlength=L)
        new_bytes = (target.holders & ~current.holders).sum((0, 2)) * problem.expert_bytes
        # gain in seconds saved over the horizon (per (token, layer) cost x tokens) vs seconds
        # of link time the copies occupy
        value = gains * rate * horizon_s - bytes_weight * new_bytes * 8.0 / bw_mean
        holders = current.holders.copy()
        order = np.argsort(-(gains / np.maximum(new_bytes, 1)), kind="stable")
        for l in order:
            if value[l] <= 0:
                continue
            trial = holders.copy()
            trial[:, l] = target.holders[:, l]
            if np.all(trial.reshape(S, -1).sum(1) <= problem.slots):
                holders = trial
        return make_placement(problem, holders, self.name, target.solve_s)
