"""The incremental evaluator the local search relies on agrees with the objective from scratch."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemoe.placement import objective
from edgemoe.placement.instances import random_problem
from edgemoe.placement.layer_costs import LayerCosts, SampleIndex
from edgemoe.placement.problem import Placement, nearest_routes


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), hetero=st.booleans(), moves=st.integers(1, 30))
def test_incremental_costs_equal_a_fresh_evaluation_after_any_moves(seed: int, hetero: bool,
                                                                     moves: int) -> None:
    p = random_problem(seed, S=4, L=3, E=8, K=3, samples=120, hetero=hetero)
    rng = np.random.default_rng(seed)
    S, L, E = p.num_servers, p.num_layers, p.num_experts
    holders = np.zeros((S, L, E), dtype=bool)
    holders[rng.integers(0, S, (L, E)), np.arange(L)[:, None], np.arange(E)[None]] = True
    prefer = p.counts
    index = SampleIndex(p, p.sample_weights())
    ev = LayerCosts(p, holders, index, prefer)
    adopted = 0
    for _ in range(moves):
        l = int(rng.integers(L))
        h = ev.holders[:, l].copy()
        h[rng.integers(S), rng.integers(E)] ^= True
        h[rng.integers(0, S, E), np.arange(E)] |= ~h.any(0)  # keep every expert held
        trial = ev.trial(l, h)
        fresh_holders = ev.holders.copy()
        fresh_holders[:, l] = h
        fresh = LayerCosts(p, fresh_holders, SampleIndex(p, p.sample_weights()), prefer)
        assert np.isclose(trial.value, fresh.cost[l], rtol=1e-9, atol=1e-15)
        assert np.array_equal(trial.route, fresh.route[:, l])
        adopted += ev.improve({l: h})
    # the kept state is the objective of its own holders with nearest-holder routes
    route = nearest_routes(p, ev.holders, prefer)
    assert np.array_equal(ev.route, route)
    assert np.isclose(ev.total, objective(p, Placement(holders=ev.holders, route=route)),
                      rtol=1e-9)
    assert adopted <= moves
