"""`layers`: a contiguous, memory-proportional split of the (layer, expert) sequence.

This is what exo-style pipeline partitioning does: a server holds whole consecutive layers.
"""

from __future__ import annotations

import time

import numpy as np

from edgemoe.placement.base import proportional_quotas
from edgemoe.placement.problem import Placement, Problem, make_placement


class Layers:
    """Server s holds the next `quota[s]` experts in (layer, expert) order."""

    name = "layers"

    def place(self, problem: Problem) -> Placement:
        t0 = time.perf_counter()
        S, L, E = problem.num_servers, problem.num_layers, problem.num_experts
        slots = problem.slots
        quota = proportional_quotas(L * E, slots.astype(np.float64), slots)
        holders = np.zeros((S, L * E), dtype=bool)
        start = 0
        for s in range(S):
            holders[s, start : start + quota[s]] = True
            start += int(quota[s])
        return make_placement(problem, holders.reshape(S, L, E), self.name,
                              time.perf_counter() - t0)
