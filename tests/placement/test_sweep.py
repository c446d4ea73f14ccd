"""edgemoe against the best baseline on a reduced grid of the fair simulator; layering."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import edgemoe.placement
from edgemoe.bench.sweep import METRICS, Grid, run_cell
from edgemoe.sim.constants import SimConstants
from edgemoe.stats.traces import default_trace_path

TRACE = default_trace_path()

# a slow and a fast network, equal and unequal speeds: small budgets so it runs in CI
REDUCED = Grid(networks=((20.0, 20.0), (10000.0, 0.1)), memory=(1.2,), capacities=("1:1:2",),
               speeds=("equal", "hetero"), loads=(0.8,), seeds=(0,), max_requests=2,
               max_tokens=24, max_samples=3000)


@pytest.mark.skipif(not TRACE.is_file(), reason=f"{TRACE} not present")
@pytest.mark.xfail(
    strict=True,
    reason="issue 13 open: with equal speeds edgemoe picks spread-lean (mean 0.98x / 0.97x "
    "uniform at 20 Mbit/s / 10 Gbit/s) but its p99 is 1.018x / 1.017x uniform's on the test "
    "window (the profile window ranked it first on p99 too)",
)
def test_edgemoe_is_never_worse_than_the_best_baseline_on_a_reduced_grid() -> None:
    for cell in REDUCED.cells():
        row = run_cell(cell, REDUCED, SimConstants(), str(TRACE))
        for m in ("latency_mean_s", "latency_p99_s"):
            r = row["ratios"][m]
            assert r["ratio"] <= 1.0 + 1e-9, (cell, m, r, row["chosen"])
        print(cell, {m: round(row["ratios"][m]["ratio"], 3) for m in METRICS}, row["chosen"])


def test_placement_never_imports_the_simulator_or_the_benchmark() -> None:
    root = Path(edgemoe.placement.__file__).parent
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for n in names:
                assert not n.startswith(("edgemoe.sim", "edgemoe.bench")), (path.name, n)


def test_an_injected_judge_picks_the_lowest_score_and_ties_keep_ours() -> None:
    from edgemoe.placement.balanced import balanced
    from edgemoe.placement.instances import random_problem
    from edgemoe.placement.latency import LatencyAware

    p = random_problem(0, S=3, L=2, E=6, K=2, samples=80)
    own = LatencyAware().place(p)
    seen: list[int] = []

    def prefers_balanced(cands: list) -> list[float]:
        seen.append(len(cands))
        return [1.0, 0.5, *[1.0] * (len(cands) - 2)]

    strat = LatencyAware(judge=prefers_balanced)
    got = strat.place(p)
    assert strat.chosen == "balanced" and len(seen) == 1 and seen[0] >= 6
    assert (got.holders == balanced(p).holders).all() and got.strategy == "edgemoe"
    tie = LatencyAware(judge=lambda cands: [1.0] * len(cands))
    assert (tie.place(p).holders == own.holders).all() and tie.chosen == "edgemoe"
