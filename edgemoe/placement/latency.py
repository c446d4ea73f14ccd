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
3. Coverage prices (clusters up to `priced_max_servers`). Every expert must be held once, so
   only sum(slots) - L*E copies can be duplicates: that scarce budget is what couples servers.
   Each server picks its own sets with the order of `_set_rank` (whole co-activated sets
   first); a copy another server also wants costs a price lambda; the smallest lambda whose
   wants leave room for every orphan (expert nobody wants) is found by bisection. Orphans go
   to the server with room that uses them most, spare slots to each server's most used.
4. Otherwise (and as a second start on small instances) a sequential pass: servers in
   ascending capacity choose freely; a server takes uncovered experts when the servers after
   it cannot hold them all; the last covers the rest.
5. Coordinate descent sweeps: each server re-solves its DP given the others (its "must keep"
   set = experts nobody else holds), kept only if the total objective improves. Small
   instances also try pair moves (two servers choose again in both orders) and polish the
   baselines' placements; then a local search (replace, relocate, exchange) on the exact
   objective. All search is bounded by a count of evaluated sample rows, not by wall-clock
   time, so every node computes the same placement.
6. Routing: nearest holder; a tie goes to the holder with most of the caller's activations
   in that layer (`layer_routes` with `prefer`), so a token's remote experts gather on few
   servers: the objective charges every distinct destination (fan-out, see `problem`).
7. The `layers` placement (whole layers per server: few destinations) is one more start, so
   the result is never worse than `layers` on the objective.

Migration (`migrate`): the objective decomposes by layer, so each layer's new holdings can be
adopted separately; layers are taken in order of gain per byte while the gain over the horizon
outweighs the link time the copy costs and capacities hold.
"""

from __future__ import annotations

import time

import numpy as np

from edgemoe.placement.layers import Layers
from edgemoe.placement.problem import (
    Placement,
    Problem,
    layer_routes,
    make_placement,
    nearest_routes,
    sample_costs,
    set_costs,
)


def _rank(counts_sl: np.ndarray, required: np.ndarray) -> np.ndarray:
    """int [L, E]: position of every expert in s's order (required first, then by count)."""
    L, E = counts_sl.shape
    key = counts_sl + np.where(required, counts_sl.max() + 1.0, 0.0)
    order = np.lexsort((np.broadcast_to(np.arange(E), (L, E)), -key), axis=-1)
    rank = np.empty((L, E), dtype=np.int64)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(E), (L, E)), axis=-1)
    return rank


def _set_rank(counts_sl: np.ndarray, required: np.ndarray, layers: np.ndarray,
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


def _value_curves(rank: np.ndarray, layers: np.ndarray, sets: np.ndarray,
                  weights: np.ndarray) -> np.ndarray:
    """float [L, E+1]: f[l, n] = weight of samples fully local when holding rank < n."""
    L, E = rank.shape
    need = rank[layers[:, None], sets].max(1) + 1
    f = np.zeros((L, E + 1))
    np.add.at(f, (layers, need), weights)
    return np.cumsum(f, axis=1)


def _dp(f: np.ndarray, lo: np.ndarray, capacity: int,
        value: np.ndarray | None = None) -> np.ndarray:
    """int [L]: n_l in [lo_l, E] with sum <= capacity maximising sum f[l, n_l] (exact).

    Only values of n where f rises (and lo_l) are candidates: holding more for the same value is
    dominated, and the leftover capacity is filled afterwards. With few samples per layer this
    shrinks the inner dimension from E+1 to the number of distinct "need" values. `value`
    (default f) is what is maximised, e.g. f less the price of the experts held.
    """
    L, E1 = f.shape
    v = f if value is None else value
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
        tot = np.where(prev >= 0, best[np.maximum(prev, 0)], neg) + v[l, cand][None, :]
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

    def __init__(self, sweeps: int = 2, search_work: float = 4e6, sweep_work: float = 3e7,
                 multistart_max: int = 2048, set_order: bool = False, priced: bool = True,
                 bisect_steps: int = 6, want_samples: int = 2000,
                 priced_max_servers: int = 16, gather_routes: bool = True) -> None:
        self.gather_routes = gather_routes
        self.priced_max_servers = priced_max_servers
        self.want_samples = want_samples
        self.set_order = set_order
        self.priced = priced
        self.bisect_steps = bisect_steps
        self.sweeps = sweeps
        self.search_work = search_work
        self.sweep_work = sweep_work
        self.multistart_max = multistart_max

    def _server_holdings(self, problem: Problem, s: int, required: np.ndarray,
                         capacity: int) -> np.ndarray:
        counts = problem.counts[s]
        m = problem.sample_server == s
        w = self._weights[m] * self._remote_cost[s]
        if self.set_order:
            rank = _set_rank(counts, required, problem.sample_layer[m], problem.sample_sets[m], w)
        else:
            rank = _rank(counts, required)
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

    def _subsample(self, problem: Problem, s: int) -> np.ndarray:
        """Indices of s's samples that shape its choice: evenly spaced, at most `want_samples`.

        The order and value curves only steer the choice; the sweeps and the local search
        accept changes on the full sample, so a subsample costs little and bounds solve time.
        """
        m = np.flatnonzero(problem.sample_server == s)
        if len(m) > self.want_samples:
            m = m[np.linspace(0, len(m) - 1, self.want_samples).astype(np.int64)]
        return m

    def _wants(self, problem: Problem, s: int, price: np.ndarray, capacity: int) -> np.ndarray:
        """bool [L, E]: what s holds for its own samples when each expert costs `price` more."""
        counts = problem.counts[s]
        L, E = counts.shape
        m = self._subsample(problem, s)
        layers, sets = problem.sample_layer[m], problem.sample_sets[m]
        w = self._weights[m] * self._remote_cost[s]
        rank = _set_rank(counts, np.zeros((L, E), dtype=bool), layers, sets, w, price)
        f = _value_curves(rank, layers, sets, w)
        in_order = np.take_along_axis(price, np.argsort(rank, axis=1), axis=1)
        g = f - np.concatenate([np.zeros((L, 1)), np.cumsum(in_order, axis=1)], axis=1)
        n = _dp(f, np.zeros(L, dtype=np.int64), capacity, g)
        return rank < n[:, None]

    def _priced(self, problem: Problem, lam: float) -> tuple[np.ndarray, bool]:
        """Every server's wants when a copy someone else also wants costs `lam`; feasible?

        Feasible means the experts nobody wants (orphans) fit in the slots left over.
        """
        S, L, E = problem.num_servers, problem.num_layers, problem.num_experts
        slots = problem.slots
        wants = np.zeros((S, L, E), dtype=bool)
        held = np.zeros((L, E), dtype=np.int64)
        for _ in range(self.sweeps + 1):
            changed = False
            for s in range(S):
                others = (held - wants[s]) > 0
                new = self._wants(problem, s, lam * others, int(slots[s]))
                if not np.array_equal(new, wants[s]):
                    held += new.astype(np.int64) - wants[s]
                    wants[s], changed = new, True
            if not changed:
                break
        free = int((slots - wants.reshape(S, -1).sum(1)).sum())
        return wants, free >= int((held == 0).sum())

    def _solve_priced(self, problem: Problem) -> np.ndarray:
        """Wants priced by a duplicate price found by bisection, then orphans and spare slots.

        Coverage is what couples servers: with every expert held once, only sum(slots) - L*E
        copies can be duplicates. Instead of forcing orphans on whoever comes last, servers
        choose their own sets and a copy that another server also wants carries a price; the
        smallest price whose wants leave room for every orphan is found by bisection.
        """
        S = problem.num_servers
        slots = problem.slots
        wants, ok = self._priced(problem, 0.0)
        if not ok:
            hi = float(self._weights.sum() * max(self._remote_cost.max(), 1e-12))
            lo = hi * 1e-6
            best = None
            for _ in range(self.bisect_steps):
                mid = float(np.sqrt(lo * hi))
                w_mid, ok = self._priced(problem, mid)
                if ok:
                    hi, best = mid, w_mid
                else:
                    lo = mid
            if best is None:
                best, ok = self._priced(problem, hi)
                if not ok:  # a price above any sample's value: no duplicate is wanted
                    best, _ = self._priced(problem, hi * 1e6)
            wants = best
        holders = wants.copy()
        # orphans to the server with room that uses them most
        free = slots - holders.reshape(S, -1).sum(1)
        orphans = np.argwhere(~holders.any(0))
        use = problem.counts[:, orphans[:, 0], orphans[:, 1]]  # [S, n]
        for j in np.lexsort((np.arange(len(orphans)), -use.sum(0))):
            l, e = orphans[j]
            s = int(np.argmax(np.where(free > 0, use[:, j] + 1e-9 * free, -np.inf)))
            holders[s, l, e] = True
            free[s] -= 1
        for s in range(S):  # spare slots: the most used experts not yet held
            if free[s] > 0:
                score = np.where(holders[s], -np.inf, problem.counts[s] + 1e-9).ravel()
                take = np.argsort(-score, kind="stable")[: free[s]]
                holders[s].ravel()[take[np.isfinite(score[take])]] = True
        return holders

    def place(self, problem: Problem) -> Placement:
        t0 = time.perf_counter()
        holders = self._solve(problem)
        return make_placement(problem, holders, self.name, time.perf_counter() - t0,
                              self._routes(problem, holders))

    def _routes(self, problem: Problem, holders: np.ndarray) -> np.ndarray:
        return nearest_routes(problem, holders, problem.counts if self.gather_routes else None)

    def _solve(self, problem: Problem) -> np.ndarray:
        S, L, E = problem.num_servers, problem.num_layers, problem.num_experts
        cost = self._cost = problem.call_cost()
        self._fan = problem.fanout_cost()
        self._prefer = problem.counts if self.gather_routes else None
        # what a fully local (token, layer) saves at least: one call and its message
        self._remote_cost = np.array(
            [(cost + self._fan)[s][np.arange(S) != s].min() if S > 1 else 0.0
             for s in range(S)])
        self._weights = problem.sample_weights()
        self._by_layer = [np.flatnonzero(problem.sample_layer == l) for l in range(L)]
        small = self.multistart_max >= S * L * E
        starts = []
        if self.priced and self.priced_max_servers >= S:
            starts.append(self._sweep(problem, self._solve_priced(problem)))
        if small or not starts:
            starts.append(self._sweep(problem, self._sequential(problem)))
        # whole layers per server: few destinations; its sweep fills the spare slots
        starts.append(self._sweep(problem, Layers().place(problem).holders))
        # one work budget (sample rows evaluated) for all polishing below: deterministic,
        # unlike a wall-clock limit
        self._work = float(self.search_work)
        if small and self._work > 0:
            starts = [self._pairs(problem, h) for h in starts]
        if self._work > 0:
            starts = [self._local_search(problem, h) for h in starts]
            if small:  # small instances: also polish the baselines' placements
                from edgemoe.placement.dancemoe import DanceMoE
                from edgemoe.placement.eplb import Eplb

                starts += [self._local_search(problem, other.place(problem).holders)
                           for other in (DanceMoE(), Eplb())]
        if len(starts) == 1:
            return starts[0]
        values = [self._total(problem, h) for h in starts]
        return starts[int(np.argmin(values))]  # first of the best: deterministic

    def _sequential(self, problem: Problem, order: np.ndarray | None = None,
                    fixed: np.ndarray | None = None) -> np.ndarray:
        """Servers of `order` (default: all, ascending capacity) choose in turn, the others'
        holdings `fixed`; one takes uncovered experts only when the servers after it could not
        hold them all; the last covers the rest."""
        S, L, E = problem.num_servers, problem.num_layers, problem.num_experts
        slots = problem.slots
        if order is None:
            order = np.lexsort((np.arange(S), slots))
        holders = np.zeros((S, L, E), dtype=bool) if fixed is None else fixed.copy()
        holders[order] = False
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
                # keep the uncovered experts this server uses most
                cand = np.flatnonzero(uncovered & ~required)
                use = problem.counts[s].ravel()[cand]
                take = cand[np.lexsort((cand, -use))][:deficit]
                required.ravel()[take] = True
            holders[s] = h
        return holders

    def _pairs(self, problem: Problem, holders: np.ndarray) -> np.ndarray:
        """Large-neighbourhood moves: two servers drop everything and choose again in both
        orders, the others fixed (they can swap whole responsibilities, which single-server
        moves cannot); kept when the total objective improves."""
        S = problem.num_servers
        current = self._total(problem, holders)
        for _ in range(self.sweeps + 1):
            improved = False
            for s in range(S):
                for t in range(s + 1, S):
                    for pair in ((s, t), (t, s)):
                        if self._work <= 0:
                            return holders
                        trial = self._sequential(problem, np.array(pair), holders)
                        v = self._total(problem, trial)
                        if v < current - 1e-15:
                            holders, current, improved = trial, v, True
            if not improved:
                break
        return holders

    def _sweep(self, problem: Problem, holders: np.ndarray) -> np.ndarray:
        """Coordinate descent: each server re-solves given the others (keeping the experts only
        it holds), kept when the total objective improves. Each start's sweeps get a work
        budget of their own (`sweep_work` sample rows evaluated)."""
        S = problem.num_servers
        slots = problem.slots
        self._work = float(self.sweep_work)
        if self._eval_work(problem) > self._work:  # not even one evaluation fits the budget
            return holders
        L = problem.num_layers
        layer_cost = np.array([self._layer_cost(problem, holders[:, l], l) for l in range(L)])
        for _ in range(self.sweeps):
            improved = False
            for s in np.lexsort((np.arange(S), slots)):
                if self._work <= 0:  # large instances: the budget ends the sweeps
                    return holders
                others = np.delete(holders, s, axis=0).any(0)
                new = self._server_holdings(problem, s, ~others, int(slots[s]))
                changed = np.flatnonzero((new != holders[s]).any(1))  # only these layers move
                trial = holders.copy()
                trial[s] = new
                v = np.array([self._layer_cost(problem, trial[:, l], l) for l in changed])
                if len(changed) and v.sum() < layer_cost[changed].sum() - 1e-15:
                    holders, improved = trial, True
                    layer_cost[changed] = v
            if not improved:
                break
        return holders

    def _eval_work(self, problem: Problem) -> float:
        """Work units `_layer_cost` charges for evaluating every layer once."""
        S, L, E = problem.num_servers, problem.num_layers, problem.num_experts
        return float(len(problem.sample_server) + L * (S * S * E + 2000))

    def _total(self, problem: Problem, holders: np.ndarray) -> float:
        return sum(self._layer_cost(problem, holders[:, l], l) for l in range(holders.shape[1]))

    def _layer_cost(self, problem: Problem, holders_l: np.ndarray, l: int) -> float:
        """Weighted sample cost of layer l given its holders bool [S, E] (nearest holder)."""
        idx = self._by_layer[l]
        self._work -= len(idx) + holders_l.size * len(holders_l) + 2000  # ~ numpy call overhead
        if len(idx) == 0:
            return 0.0
        route = layer_routes(self._cost, holders_l,
                             None if self._prefer is None else self._prefer[:, l])
        s = problem.sample_server[idx]
        per = set_costs(self._cost, self._fan, s, route[s[:, None], problem.sample_sets[idx]])
        return float((per * self._weights[idx]).sum())

    def _local_search(self, problem: Problem, holders: np.ndarray) -> np.ndarray:
        """Replace and exchange moves on the exact objective, first improvement, bounded.

        replace: server s drops a copy that someone else also holds and takes an expert it
        lacks; exchange: servers s and t trade one expert each (moves sole copies).
        """
        S, L, E = holders.shape
        if self._eval_work(problem) > self._work:  # not even one evaluation fits the budget
            return holders
        layer_cost = np.array([self._layer_cost(problem, holders[:, l], l) for l in range(L)])
        improved = True
        while improved and self._work > 0:
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
                        if self._work <= 0:
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
        # sample weights sum to 1 over all (token, layer) pairs, so L * gains[l] is the seconds
        # layer l saves per token; over the horizon vs the link time the copies occupy
        value = gains * L * rate * horizon_s - bytes_weight * new_bytes * 8.0 / bw_mean
        holders = current.holders.copy()
        order = np.argsort(-(gains / np.maximum(new_bytes, 1)), kind="stable")
        for l in order:
            if value[l] <= 0:
                continue
            trial = holders.copy()
            trial[:, l] = target.holders[:, l]
            if np.all(trial.reshape(S, -1).sum(1) <= problem.slots):
                holders = trial
        return make_placement(problem, holders, self.name, target.solve_s,
                              self._routes(problem, holders))
