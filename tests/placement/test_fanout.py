"""The objective charges every distinct remote destination; edgemoe never loses to `layers`."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.placement import Placement, Problem, get_strategy, objective
from edgemoe.placement.instances import random_problem
from edgemoe.placement.problem import nearest_routes


def _three_servers() -> Problem:
    """Server 0 samples one set {0, 1} of a 1-layer, 2-expert model; links 1 ms, 100 Mbit/s."""
    S = 3
    rtt = np.full((S, S), 1e-3)
    np.fill_diagonal(rtt, 0.0)
    return Problem(capacity_bytes=np.array([0.0, 2.0, 2.0]), compute_speed=np.ones(S),
                   rtt_s=rtt, bandwidth_bps=np.full((S, S), 1e8), num_layers=1,
                   num_experts=2, top_k=2, expert_bytes=1, hidden_size=500,
                   counts=np.zeros((S, 1, 2)), sample_server=np.array([0]),
                   sample_layer=np.array([0]), sample_sets=np.array([[0, 1]]),
                   request_rate=np.array([1.0, 0.0, 0.0]), expert_time_s=5e-5,
                   call_overhead_s=1e-4)


def _placement(p: Problem, holders: list[list[bool]]) -> Placement:
    h = np.array(holders, dtype=bool)[:, None, :]
    return Placement(holders=h, route=nearest_routes(p, h))


def test_a_set_split_over_two_holders_costs_one_more_message() -> None:
    p = _three_servers()
    # one message carries 500 * 2 bytes = 8000 bits: 80 us each way at 100 Mbit/s
    call = 1e-3 + 2 * 80e-6 + 5e-5
    message = 2 * 80e-6 + 1e-4
    gathered = objective(p, _placement(p, [[False, False], [True, True], [False, False]]))
    split = objective(p, _placement(p, [[False, False], [True, False], [False, True]]))
    assert gathered == pytest.approx(call + message)
    assert split == pytest.approx(call + 2 * message)


@pytest.mark.parametrize("seed", range(4))
def test_edgemoe_is_never_worse_than_layers_on_the_objective(seed: int) -> None:
    p = random_problem(seed, S=5, L=4, E=8, K=3, samples=200, hetero=seed % 2 == 0)
    edgemoe = objective(p, get_strategy("edgemoe").place(p))
    layers = objective(p, get_strategy("layers").place(p))
    assert edgemoe <= layers + 1e-12, (seed, edgemoe, layers)
