"""The simulator's per-call costs fitted from the testbed's CPU seconds per node."""

from __future__ import annotations

import pytest

from edgemoe.daemon.testbed.simulated import fit_call_costs
from edgemoe.sim.constants import SimConstants

BASE = SimConstants(message_s=1e-4, caller_message_s=1e-4, source="calibrate")


def test_the_fit_recovers_the_cost_of_a_call_made_and_of_a_call_served() -> None:
    # CPU beyond compute = 0.5 s + 2 ms per call made + 1 ms per call served
    calls = [(100, 50), (300, 120), (80, 400), (1800, 1500), (150, 150), (40, 90)]
    rows = [(0.5 + 2e-3 * made + 1e-3 * served, made, served) for made, served in calls]
    got = fit_call_costs(BASE, rows)
    assert got.caller_message_s == pytest.approx(2e-3)
    assert got.message_s == pytest.approx(1e-3)
    assert got.dense_fixed_s == BASE.dense_fixed_s  # compute untouched
    assert "fit of 6 node CPU rows" in got.source


def test_without_enough_distinct_rows_or_with_a_negative_cost_the_constants_stay() -> None:
    assert fit_call_costs(BASE, [(1.0, 10, 5), (2.0, 20, 9), (3.0, 30, 20)]) is BASE
    same = [(0.1 * k, 10 * k, 10 * k) for k in range(1, 6)]  # made == served: not separable
    assert fit_call_costs(BASE, same) is BASE
    # more calls made, less CPU: a negative cost per call made is refused
    falling = [(1.0 - 1e-3 * m + 1e-3 * s, m, s) for m, s in [(10, 5), (50, 9), (90, 60),
                                                               (200, 30), (20, 80)]]
    assert fit_call_costs(BASE, falling) is BASE
