"""Incremental evaluation of the placement objective, layer by layer, for local search.

The objective (`problem.objective`) is a sum over co-activation samples, and a sample only
depends on the routes of its own layer. A move (a server adds, drops or trades a few experts)
re-routes one or two layers; recomputing a layer's routes is cheap ([S, E], see
`layer_routes`), but re-costing all of its samples is what made each trial expensive
(8192 rows x top-8 per layer at 64 servers). `LayerCosts` keeps every layer's routes and
per-row costs and re-costs only the rows whose route changed, so a trial that touches one
expert costs a few rows instead of the whole layer.

Work is counted in units (rows re-costed, routes chosen among several holders, plus a fixed
charge per trial for the numpy calls) so that searches stop after a deterministic amount of
work: every node recomputing a proposal gets the same placement, which a wall clock would not
give.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edgemoe.placement.problem import Problem, layer_routes, set_costs

# work units one trial costs besides its rows: its ~20 numpy calls take about as long as
# re-costing 300 rows (~80 us against ~0.27 us a row, 64 servers, DeepSeek-V3 shape)
TRIAL_OVERHEAD = 300


@dataclass
class _Trial:
    layer: int
    holders_l: np.ndarray  # bool [S, E]
    route: np.ndarray  # int [S, E]
    rows: np.ndarray  # int [n]: indices into the layer's rows
    row_cost: np.ndarray  # float [n]
    value: float


class SampleIndex:
    """The co-activation sample split by layer, built once per problem and shared by every
    `LayerCosts` of it: rows, their (origin, expert) pairs and the reverse map."""

    def __init__(self, problem: Problem, weights: np.ndarray) -> None:
        S, L, E = problem.num_servers, problem.num_layers, problem.num_experts
        K = problem.sample_sets.shape[1]
        order = np.argsort(problem.sample_layer, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(problem.sample_layer,
                                                            minlength=L))])
        by_layer = [order[bounds[l]:bounds[l + 1]] for l in range(L)]
        self.origin = [problem.sample_server[i] for i in by_layer]
        # flat index of (origin, expert) into a layer's route [S, E], per row and top-k slot
        self.flat = [problem.sample_server[i, None] * E + problem.sample_sets[i]
                     for i in by_layer]
        self.weight = [weights[i] for i in by_layer]
        # and back: the rows that use each (origin, expert), CSR-style ([S*E + 1], [rows*K])
        self.uses: list[tuple[np.ndarray, np.ndarray]] = []
        for f in self.flat:
            pos = np.argsort(f.ravel(), kind="stable")
            ptr = np.concatenate([[0], np.cumsum(np.bincount(f.ravel(), minlength=S * E))])
            self.uses.append((ptr.astype(np.int64), (pos // K).astype(np.int32)))


class LayerCosts:
    """Routes and costs of one placement (holders bool [S, L, E]), updated move by move."""

    def __init__(self, problem: Problem, holders: np.ndarray, index: SampleIndex,
                 prefer: np.ndarray | None, base: np.ndarray | None = None,
                 copy_cost: float = 0.0) -> None:
        """`base` and `copy_cost`: every copy held that `base` (bool [S, L, E], e.g. the
        current placement) does not hold adds `copy_cost` to its layer's cost (migration)."""
        S, L, E = holders.shape
        self.holders = holders.copy()
        self._base = base
        self._copy_cost = copy_cost
        self._call = problem.call_cost()
        self._fan = problem.fanout_cost()
        self._prefer = prefer
        self._origin, self._flat, self._weight = index.origin, index.flat, index.weight
        self._uses = index.uses
        self.work = 0.0  # units spent so far (see the module docstring)
        self.route = np.empty((S, L, E), dtype=np.int64)
        self._row_cost: list[np.ndarray] = []
        self.cost = np.zeros(L)
        for l in range(L):
            self.route[:, l] = self._routes(l, self.holders[:, l])
            rows = self._cost_rows(l, np.arange(len(self._flat[l])), self.route[:, l])
            self._row_cost.append(rows)
            self.cost[l] = float(rows @ self._weight[l]) + self._copies(l, self.holders[:, l])

    def _copies(self, l: int, holders_l: np.ndarray) -> float:
        if self._base is None or not self._copy_cost:
            return 0.0
        return self._copy_cost * int((holders_l & ~self._base[:, l]).sum())

    @property
    def total(self) -> float:
        return float(self.cost.sum())

    def _routes(self, l: int, holders_l: np.ndarray, experts: np.ndarray | None = None
                ) -> np.ndarray:
        S = len(holders_l)
        h = holders_l if experts is None else holders_l[:, experts]
        self.work += S * int((h.sum(0) > 1).sum()) + TRIAL_OVERHEAD
        return layer_routes(self._call, holders_l,
                            None if self._prefer is None else self._prefer[:, l], experts)

    def _cost_rows(self, l: int, rows: np.ndarray, route_l: np.ndarray) -> np.ndarray:
        self.work += len(rows)
        if not len(rows):
            return np.zeros(0)
        d = route_l.ravel()[self._flat[l][rows]]
        return set_costs(self._call, self._fan, self._origin[l][rows], d)

    def _rows_using(self, l: int, pairs: np.ndarray) -> np.ndarray:
        """int [n]: the rows of layer l whose sets call one of `pairs` (flat origin*E+expert)."""
        ptr, rows = self._uses[l]
        lo, n = ptr[pairs], ptr[pairs + 1] - ptr[pairs]
        if not n.sum():
            return np.zeros(0, dtype=np.int64)
        # positions lo[i] .. lo[i] + n[i] - 1 for every pair, in one vector
        at = np.repeat(lo - np.concatenate([[0], np.cumsum(n)[:-1]]), n) + np.arange(n.sum())
        return np.unique(rows[at]).astype(np.int64)

    def trial(self, l: int, holders_l: np.ndarray) -> _Trial:
        """Layer l's cost if its holders were `holders_l` (bool [S, E]); nothing changes.

        Only experts held (before or after) by a server whose holdings change can be routed
        differently: their holder sets change, or (`prefer` ties) their holders' ranks do."""
        old = self.holders[:, l]
        moved = (holders_l != old).any(1)
        experts = np.flatnonzero((holders_l | old)[moved].any(0))
        route = self.route[:, l].copy()
        rows = np.zeros(0, dtype=np.int64)
        if len(experts):
            route[:, experts] = self._routes(l, holders_l, experts)
            cs, ce = np.nonzero(route[:, experts] != self.route[:, l][:, experts])
            rows = self._rows_using(l, cs * holders_l.shape[1] + experts[ce])
        row_cost = self._cost_rows(l, rows, route)
        delta = float((row_cost - self._row_cost[l][rows]) @ self._weight[l][rows])
        delta += self._copies(l, holders_l) - self._copies(l, old)
        return _Trial(l, holders_l, route, rows, row_cost, float(self.cost[l]) + delta)

    def improve(self, changes: Mapping[int, np.ndarray]) -> bool:
        """Adopt new holders for some layers ({layer: bool [S, E]}) if that lowers the total;
        True when adopted."""
        trials = [self.trial(int(l), h) for l, h in changes.items()]
        if not trials:
            return False
        if sum(t.value for t in trials) >= sum(float(self.cost[t.layer]) for t in trials) - 1e-15:
            return False
        self._adopt(trials)
        return True

    def _adopt(self, trials: list[_Trial]) -> None:
        for t in trials:
            self.holders[:, t.layer] = t.holders_l
            self.route[:, t.layer] = t.route
            self._row_cost[t.layer][t.rows] = t.row_cost
            self.cost[t.layer] = t.value
