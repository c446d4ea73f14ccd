"""`uniform`: each layer's experts dealt round-robin to servers in proportion to capacity."""

from __future__ import annotations

import time

import numpy as np

from edgemoe.placement.base import proportional_quotas
from edgemoe.placement.problem import Placement, Problem, make_placement


class Uniform:
    """One copy of every expert; a server gets experts in proportion to its capacity."""

    name = "uniform"

    def place(self, problem: Problem) -> Placement:
        t0 = time.perf_counter()
        S, L, E = problem.num_servers, problem.num_layers, problem.num_experts
        slots = problem.slots
        quota = proportional_quotas(L * E, slots.astype(np.float64), slots)
        holders = np.zeros((S, L, E), dtype=bool)
        # smooth weighted round robin over quotas: every server gets exactly its quota and the
        # picks are interleaved, so each layer is spread over all servers
        credit = np.zeros(S)
        for i in range(L * E):
            credit += quota
            s = int(np.argmax(credit))
            credit[s] -= L * E
            holders[s, i // E, i % E] = True
        return make_placement(problem, holders, self.name, time.perf_counter() - t0)
