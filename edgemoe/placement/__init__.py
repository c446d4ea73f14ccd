"""The placement problem, cost model, strategies, exact solver and migration planner.

Entry points: `Problem`, `Placement`, `get_strategy(name).place(problem)`, `objective`,
`validate_placement`, `plan_migration`.
"""

from __future__ import annotations

from edgemoe.placement.base import Strategy
from edgemoe.placement.dancemoe import DanceMoE
from edgemoe.placement.eplb import Eplb
from edgemoe.placement.latency import LatencyAware
from edgemoe.placement.layers import Layers
from edgemoe.placement.migration import MigrationPlan, Move, plan_migration
from edgemoe.placement.optimal import Optimal
from edgemoe.placement.problem import (
    Placement,
    PlacementError,
    Problem,
    local_share,
    objective,
    validate_placement,
)
from edgemoe.placement.uniform import Uniform

STRATEGIES: dict[str, type] = {
    "uniform": Uniform,
    "layers": Layers,
    "eplb": Eplb,
    "dancemoe": DanceMoE,
    "edgemoe": LatencyAware,
    "optimal": Optimal,
}


def get_strategy(name: str) -> Strategy:
    """A fresh strategy object by name (uniform, layers, eplb, dancemoe, edgemoe, optimal)."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise PlacementError(
            f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None


__all__ = [
    "STRATEGIES",
    "MigrationPlan",
    "Move",
    "Placement",
    "PlacementError",
    "Problem",
    "Strategy",
    "get_strategy",
    "local_share",
    "objective",
    "plan_migration",
    "validate_placement",
]
