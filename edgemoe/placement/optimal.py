"""`optimal`: the exact minimum of `objective` as a MILP solved by HiGHS (scipy.optimize.milp).

Variables: x[s,l,e] in {0,1} (s holds (l,e)); w[s,l,e,d] in {0,1} (s routes (l,e) to d, only
for (s,l,e) that appear in s's samples); z[g] >= 0 per group g of identical samples (same
server, layer and set, weight summed); y[g,d] in [0,1] (g's set calls d). Constraints: every
expert held (sum_s x >= 1), capacity (sum_{l,e} x[s] <= slots[s]), route only to holders
(w[s,l,e,d] <= x[d,l,e]), a holder calls itself (w[s,l,e,s] >= x[s,l,e]), one route
(sum_d w = 1), z[g] >= sum_d cost[s,d] w[s,l,e,d] and y[g,d] >= w[s,l,e,d] for every e of the
group's set. Minimise sum_g weight_g (z[g] + sum_d fanout_cost[s,d] y[g,d]). The routes are
part of the solution (with fan-out the nearest holder is not always best: gathering a set on
one holder saves messages), so the optimum is over (holders, routes) and no heuristic's
placement, whatever its routing, can beat it. Small instances only: `max_vars` guards the
size; the time limit returns the incumbent (flagged in `status`).
"""

from __future__ import annotations

import time

import numpy as np

from edgemoe.placement.problem import (
    Placement,
    PlacementError,
    Problem,
    make_placement,
    nearest_routes,
)


class Optimal:
    """Exact solver for small instances."""

    name = "optimal"

    def __init__(self, time_limit_s: float = 30.0, max_vars: int = 200_000) -> None:
        self.time_limit_s = time_limit_s
        self.max_vars = max_vars
        self.status = ""

    def place(self, problem: Problem) -> Placement:
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import coo_matrix

        t0 = time.perf_counter()
        S, L, E = problem.num_servers, problem.num_layers, problem.num_experts
        cost = problem.call_cost()
        fan = problem.fanout_cost()
        w_sample = problem.sample_weights()
        sets = np.sort(problem.sample_sets, axis=1)
        key = np.concatenate([problem.sample_server[:, None], problem.sample_layer[:, None],
                              sets], axis=1)
        groups, inv = np.unique(key, axis=0, return_inverse=True)
        inv = inv.ravel()
        gw = np.bincount(inv, w_sample, minlength=len(groups))
        # route variables only for (s, l, e) some group needs
        need = np.unique(np.concatenate(
            [groups[:, [0, 1]].repeat(sets.shape[1], 0),
             groups[:, 2:].reshape(-1, 1)], axis=1), axis=0) if len(groups) else np.zeros(
            (0, 3), dtype=np.int64)
        nx = S * L * E
        nw = len(need) * S
        ng = len(groups)
        nvar = nx + nw + ng + ng * S
        if nvar > self.max_vars:
            raise PlacementError(f"instance too large for the exact solver ({nvar} variables "
                                 f"> {self.max_vars}); use a smaller instance")

        def xi(s: np.ndarray, l: np.ndarray, e: np.ndarray) -> np.ndarray:
            return (s * L + l) * E + e

        need_index = {tuple(r): i for i, r in enumerate(need.tolist())}
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        lo: list[np.ndarray] = []
        hi: list[np.ndarray] = []
        r0 = 0

        def add(r: np.ndarray, c: np.ndarray, v: np.ndarray, lb: np.ndarray,
                ub: np.ndarray) -> None:
            nonlocal r0
            rows.append(r + r0)
            cols.append(c)
            vals.append(v)
            lo.append(lb)
            hi.append(ub)
            r0 += len(lb)

        # coverage: sum_s x[s,l,e] >= 1
        le = np.arange(L * E)
        ss = np.repeat(np.arange(S), L * E)
        add(np.tile(le, S), ss * L * E + np.tile(le, S), np.ones(S * L * E),
            np.ones(L * E), np.full(L * E, np.inf))
        # capacity
        add(ss, np.arange(nx), np.ones(nx), np.full(S, -np.inf), problem.slots.astype(float))
        if len(need):
            ns, nl, ne = need[:, 0], need[:, 1], need[:, 2]
            k = np.arange(len(need))
            # one route: sum_d w = 1
            add(np.repeat(k, S), nx + np.arange(nw), np.ones(nw), np.ones(len(need)),
                np.ones(len(need)))
            # w[k, d] - x[d, l, e] <= 0
            d = np.tile(np.arange(S), len(need))
            kk = np.repeat(k, S)
            rr = np.arange(nw)
            add(np.concatenate([rr, rr]),
                np.concatenate([nx + rr, xi(d, nl[kk], ne[kk])]),
                np.concatenate([np.ones(nw), -np.ones(nw)]),
                np.full(nw, -np.inf), np.zeros(nw))
            # w[k, s] - x[s, l, e] >= 0: a holder calls itself
            add(np.concatenate([k, k]), np.concatenate([nx + k * S + ns, xi(ns, nl, ne)]),
                np.concatenate([np.ones(len(need)), -np.ones(len(need))]),
                np.zeros(len(need)), np.full(len(need), np.inf))
            # z[g] - sum_d cost[s,d] w[k(g,e), d] >= 0 for every e in g's set
            K = sets.shape[1]
            gs = np.repeat(np.arange(ng), K)
            ks = np.array([need_index[(int(groups[g, 0]), int(groups[g, 1]), int(e))]
                           for g, e in zip(gs, groups[:, 2:].ravel(), strict=True)],
                          dtype=np.int64)
            nrow = len(gs)
            rr = np.arange(nrow)
            rz = rr
            cz = nx + nw + gs
            rw = np.repeat(rr, S)
            cw = nx + np.repeat(ks, S) * S + np.tile(np.arange(S), nrow)
            vw = -cost[np.repeat(ns[ks], S), np.tile(np.arange(S), nrow)]
            add(np.concatenate([rz, rw]), np.concatenate([cz, cw]),
                np.concatenate([np.ones(nrow), vw]), np.zeros(nrow), np.full(nrow, np.inf))
            # y[g, d] - w[k(g,e), d] >= 0 for every e in g's set and every d
            ry = np.arange(nrow * S)
            cy = nx + nw + ng + np.repeat(gs, S) * S + np.tile(np.arange(S), nrow)
            add(np.concatenate([ry, ry]), np.concatenate([cy, cw]),
                np.concatenate([np.ones(nrow * S), -np.ones(nrow * S)]),
                np.zeros(nrow * S), np.full(nrow * S, np.inf))
        A = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                       shape=(r0, nvar)).tocsr()
        gfan = fan[groups[:, 0]] if ng else np.zeros((0, S))  # [g, d]
        c = np.concatenate([np.zeros(nx), np.zeros(nw), gw, (gw[:, None] * gfan).ravel()])
        c[:nx] += 1e-9  # among optima prefer fewer copies (fewer bytes to hold)
        integrality = np.concatenate([np.ones(nx + nw), np.zeros(ng + ng * S)])
        ub = np.concatenate([np.ones(nx + nw), np.full(ng, np.inf), np.ones(ng * S)])
        res = milp(c, constraints=LinearConstraint(A, np.concatenate(lo), np.concatenate(hi)),
                   integrality=integrality, bounds=Bounds(np.zeros(nvar), ub),
                   options={"time_limit": self.time_limit_s, "disp": False})
        if res.x is None:
            raise PlacementError(f"exact solver found no solution: {res.message}")
        self.status = "optimal" if res.status == 0 else f"time limit ({res.message})"
        holders = res.x[:nx].reshape(S, L, E) > 0.5
        route = nearest_routes(problem, holders)
        if len(need):  # the solver's routes where samples need them
            pick = res.x[nx:nx + nw].reshape(len(need), S).argmax(1)
            route[need[:, 0], need[:, 1], need[:, 2]] = pick
        return make_placement(problem, holders, self.name, time.perf_counter() - t0, route)
