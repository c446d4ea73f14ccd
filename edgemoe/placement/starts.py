"""edgemoe's start placements, each a different guess the sweeps and local search refine.

(a) Coverage prices (clusters up to `priced_max_servers`): every expert must be held once, so
only sum(slots) - L*E copies can be duplicates, and that scarce budget is what couples
servers. Each server picks its own sets with the order of `set_rank` (whole co-activated sets
first); a copy another server also wants costs a price lambda; the smallest lambda whose
wants leave room for every orphan (expert nobody wants) is found by bisection. Orphans go to
the server with room that uses them most. (b) Small instances: a sequential pass (servers in
ascending capacity choose freely; one takes uncovered experts when the servers after it
cannot hold them all; the last covers the rest). (c) The `layers` placement (`latency`), so
the result is never worse than `layers` on the objective. (d) Whole layers: each layer on
the one server its callers reach most cheaply, so a remote (token, layer) sends one message;
on the DeepSeek-V3 shape at 64 servers this start alone is 0.81x `layers` on the objective.
The priced start costs ~7 s at 16 servers and lost to (d) there, hence the default limit of 8.
"""

from __future__ import annotations

import itertools

import numpy as np

from edgemoe.placement.layer_costs import LayerCosts, SampleIndex
from edgemoe.placement.problem import Problem
from edgemoe.placement.value_curves import best_prefixes, count_rank, set_rank, value_curves


class Starts:
    """Start placements of `LatencyAware` (a mixin: it reads the strategy's settings and the
    per-problem state `LatencyAware._prepare` sets)."""

    set_order: bool
    want_samples: int
    sweeps: int
    bisect_steps: int
    homes_max: int
    _weights: np.ndarray
    _remote_cost: np.ndarray
    _cost: np.ndarray
    _fan: np.ndarray
    _index: SampleIndex
    _prefer: np.ndarray | None

    def _costs(self, problem: Problem, holders: np.ndarray) -> LayerCosts:
        return LayerCosts(problem, holders, self._index, self._prefer)

    def _server_holdings(self, problem: Problem, s: int, required: np.ndarray,
                         capacity: int) -> np.ndarray:
        counts = problem.counts[s]
        m = problem.sample_server == s
        w = self._weights[m] * self._remote_cost[s]
        if self.set_order:
            rank = set_rank(counts, required, problem.sample_layer[m], problem.sample_sets[m], w)
        else:
            rank = count_rank(counts, required)
        f = value_curves(rank, problem.sample_layer[m], problem.sample_sets[m], w)
        n = best_prefixes(f, required.sum(1), capacity)
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
        rank = set_rank(counts, np.zeros((L, E), dtype=bool), layers, sets, w, price)
        f = value_curves(rank, layers, sets, w)
        in_order = np.take_along_axis(price, np.argsort(rank, axis=1), axis=1)
        g = f - np.concatenate([np.zeros((L, 1)), np.cumsum(in_order, axis=1)], axis=1)
        n = best_prefixes(f, np.zeros(L, dtype=np.int64), capacity, g)
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

    def _whole_layers(self, problem: Problem, homes: tuple[int, ...] | None = None
                      ) -> np.ndarray:
        """Each layer whole on one server wherever one has room, so a remote (token, layer)
        sends one message; the layer goes to the server the others reach most cheaply (most
        free slots on ties, which spreads layers evenly), or to `homes[l]` when given. A layer
        that does not fit whole puts its callers' most used experts on its home (or the
        freest server) and spills the rest to the freest. Spare slots are left to the sweep.
        """
        S, L, E = problem.num_servers, problem.num_layers, problem.num_experts
        w = np.bincount(problem.sample_server, self._weights, minlength=S)
        reach = w @ (self._cost + self._fan)  # [S]: what one layer held there costs callers
        free = problem.slots.copy()
        holders = np.zeros((S, L, E), dtype=bool)
        for l in range(L):
            room = np.flatnonzero(free >= E)
            if homes is None and len(room):
                s = int(room[np.lexsort((room, -free[room], np.round(reach[room] * 1e9)))[0]])
                holders[s, l] = True
                free[s] -= E
                continue
            order = np.lexsort((np.arange(E), -problem.counts[:, l].sum(0)))
            e = 0
            while e < E:
                s = homes[l] if homes is not None and e == 0 and free[homes[l]] > 0 \
                    else int(np.argmax(free))
                n = int(min(free[s], E - e))
                holders[s, l, order[e:e + n]] = True
                free[s] -= n
                e += n
        return holders

    def _best_homes(self, problem: Problem) -> np.ndarray:
        """Small instances: `_whole_layers` for every assignment of layers to home servers
        (at most `homes_max` of them), the best on the objective."""
        S, L = problem.num_servers, problem.num_layers
        best, value = None, np.inf
        for homes in itertools.islice(itertools.product(range(S), repeat=L), self.homes_max):
            h = self._whole_layers(problem, homes)
            v = self._costs(problem, h).total
            if v < value - 1e-15:
                best, value = h, v
        assert best is not None
        return best

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

