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
