"""edgemoe's migration decision: where to go from the current placement when the statistics
change, every copy it would add priced by its transfer time, so only what pays for its bytes
moves."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
from threadpoolctl import threadpool_limits

from edgemoe.placement.layer_costs import LayerCosts
from edgemoe.placement.problem import Placement, Problem, make_placement

if TYPE_CHECKING:
    from edgemoe.placement.latency import LatencyAware


def migrate(strategy: LatencyAware, problem: Problem, current: Placement, horizon_s: float,
            bytes_weight: float = 1.0) -> Placement:
    """See `LatencyAware.migrate`: the search from `current` and a fresh placement, both
    priced by the copies they add over `current`; the cheaper wins."""
    t0 = time.perf_counter()
    S, L = problem.num_servers, problem.num_layers
    rate = float(np.sum(problem.request_rate))
    bw = np.asarray(problem.bandwidth_bps, dtype=np.float64)[~np.eye(S, dtype=bool)]
    bw_mean = float(bw.mean()) if len(bw) else 1.0
    copy_s = bytes_weight * problem.expert_bytes * 8.0 / bw_mean
    copy_cost = copy_s / max(L * rate * horizon_s, 1e-12)
    with threadpool_limits(limits=1, user_api="blas"):
        fresh = strategy._solve(problem).holders  # (which also prepares the shared state)

        def priced(holders: np.ndarray) -> LayerCosts:
            return LayerCosts(problem, holders, strategy._index, strategy._prefer,
                              base=current.holders, copy_cost=copy_cost)

        stay = priced(current.holders)
        strategy._work = float(strategy.sweep_work)
        strategy._sweep(problem, stay)
        strategy._work = float(strategy.search_work)
        strategy._local_search(problem, stay)
        go = priced(fresh)
        best = stay if stay.total <= go.total else go
    return make_placement(problem, best.holders, strategy.name, time.perf_counter() - t0,
                          best.route)
