"""The `spread` candidate: co-activated experts on different servers, shares by speed."""

from __future__ import annotations

import numpy as np

from edgemoe.placement.instances import random_problem
from edgemoe.placement.problem import Problem, validate_placement
from edgemoe.placement.spread import speed_shares, spread


def _pairs_problem(speed: list[float]) -> Problem:
    """2 servers, 1 layer of 4 experts, top-2: tokens always pick {0, 2} or {1, 3}."""
    sets = np.array([[0, 2], [1, 3]] * 10)
    counts = np.zeros((2, 1, 4))
    np.add.at(counts, (np.zeros(20, dtype=int)[:, None], 0, sets), 1.0)
    return Problem(capacity_bytes=np.array([3.0, 3.0]), compute_speed=np.array(speed),
                   rtt_s=np.zeros((2, 2)), bandwidth_bps=np.full((2, 2), 1e9), num_layers=1,
                   num_experts=4, top_k=2, expert_bytes=1, hidden_size=8, counts=counts,
                   sample_server=np.zeros(20, dtype=int), sample_layer=np.zeros(20, dtype=int),
                   sample_sets=sets, request_rate=np.array([1.0, 1.0]))


def test_spread_splits_each_coactivated_pair_over_the_two_servers() -> None:
    p = _pairs_problem([1.0, 1.0])
    lean = spread(p, spares=False)
    validate_placement(p, lean)
    h = lean.holders[:, 0]  # [S, E]
    # dealing by id or by count (all counts tie) puts 0 and 2 on one server: every token then
    # waits for two expert runs there instead of one on each server
    assert h[:, 0].tolist() != h[:, 2].tolist() and h[:, 1].tolist() != h[:, 3].tolist()
    assert h.sum() == 4  # lean: one copy each, spare slots left empty
    full = spread(p)
    assert full.holders.sum() == 6  # spares: each server's own most used experts added


def test_speed_shares_follow_speed_up_to_each_servers_memory() -> None:
    # hand-computed: speeds 2:1:1 ask for 1/2, 1/4, 1/4 of a layer; server 0's memory holds
    # only 30% of all experts, so it gets 0.3 and the other two split the rest by speed
    got = speed_shares(np.array([2.0, 1.0, 1.0]), np.array([30.0, 50.0, 50.0]), 100)
    assert np.allclose(got, [0.3, 0.35, 0.35])
    assert np.allclose(speed_shares(np.ones(3), np.array([50.0, 50.0, 50.0]), 100), 1 / 3)


def test_spread_places_validly_on_random_instances() -> None:
    for seed in range(6):
        p = random_problem(seed, S=3 + seed % 2, L=2, E=6, K=2, samples=80)
        for spares in (True, False):
            validate_placement(p, spread(p, spares=spares))
