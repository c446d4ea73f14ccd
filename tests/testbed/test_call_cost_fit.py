"""The simulator's per-call and per-byte costs fitted from the testbed's CPU seconds per node."""

from __future__ import annotations

import pytest

from edgemoe.daemon.testbed.simulated import fit_call_costs
from edgemoe.sim.constants import SimConstants

BASE = SimConstants(message_s=1e-4, caller_message_s=1e-4, source="calibrate")
CALLS = [(100, 50, 3e6), (300, 120, 5e6), (80, 400, 9e6), (1800, 1500, 4e7), (150, 150, 1e6),
         (40, 90, 7e6)]  # fmt: skip


def test_the_fit_recovers_the_cost_of_a_call_made_served_and_of_each_byte() -> None:
    # CPU beyond compute = 0.5 s + 2 ms per call made + 1 ms per call served + 50 ns a byte
    rows = [(0.5 + 2e-3 * m + 1e-3 * s + 5e-8 * b, m, s, b) for m, s, b in CALLS]
    got = fit_call_costs(BASE, rows)
    assert got.caller_message_s == pytest.approx(2e-3)
    assert got.message_s == pytest.approx(1e-3)
    assert got.byte_s == pytest.approx(5e-8)
    assert got.dense_fixed_s == BASE.dense_fixed_s  # compute untouched
    assert "fit of 6 node CPU rows, with bytes" in got.source


def test_bytes_that_lower_the_cpu_are_left_out_and_the_calls_still_fitted() -> None:
    # the bytes column anti-correlated with the CPU: a negative cost per byte is refused
    rows = [(0.5 + 2e-3 * m + 1e-3 * s - 1e-8 * b, m, s, b) for m, s, b in CALLS]
    got = fit_call_costs(BASE, rows)
    assert got.byte_s == 0.0
    assert got.caller_message_s > 0 and got.message_s > 0
    assert got.source.endswith("fit of 6 node CPU rows")


def test_without_enough_distinct_rows_or_with_a_negative_cost_the_constants_stay() -> None:
    assert fit_call_costs(BASE, [(1.0, 10, 5, 1e5), (2.0, 20, 9, 2e5), (3.0, 30, 20, 4e5)]) is BASE
    same = [(0.1 * k, 10 * k, 10 * k, 1e5 * k) for k in range(1, 6)]  # not separable
    assert fit_call_costs(BASE, same) is BASE
    # more calls made, less CPU: a negative cost per call made is refused
    falling = [(1.0 - 1e-3 * m + 1e-3 * s, m, s, 1e5) for m, s in [(10, 5), (50, 9), (90, 60),
                                                                    (200, 30), (20, 80)]]
    assert fit_call_costs(BASE, falling) is BASE
