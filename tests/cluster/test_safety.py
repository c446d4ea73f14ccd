"""Safety of the cluster cores under random fault schedules (hypothesis over the simulator).

Each example is a whole seeded `Scenario`: loss up to 30%, duplication, reordering (jittered
delays), clock drift, partitions set and healed, crash-restarts with durable storage kept, and
permanent crashes. The invariant checker must find no violation of agreement, validity, log
prefix, last live copy or routing. A failure prints the scenario, which replays exactly.
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgemoe.cluster.simnet import Scenario, replay


@st.composite
def schedules(draw: st.DrawFn) -> Scenario:
    n = draw(st.integers(3, 8))
    parts = []
    t = draw(st.floats(1.0, 8.0))
    for _ in range(draw(st.integers(0, 2))):
        order = draw(st.permutations(range(n)))
        k = draw(st.integers(1, n - 1))
        d = draw(st.floats(0.5, 10.0))
        parts.append((t, t + d, (tuple(order[:k]), tuple(order[k:]))))
        t += d + draw(st.floats(0.0, 5.0))
    down = st.one_of(st.floats(0.3, 8.0), st.just(math.inf))
    crashes = draw(
        st.lists(st.tuples(st.floats(0.5, 25.0), st.integers(0, n - 1), down), max_size=3)
    )
    return Scenario(
        nodes=n,
        seed=draw(st.integers(0, 2**32 - 1)),
        duration=35.0,
        loss=draw(st.sampled_from([0.0, 0.05, 0.1, 0.3])),
        duplicate=draw(st.sampled_from([0.0, 0.1, 0.3])),
        jitter=draw(st.sampled_from([0.5, 1.0, 4.0])),
        drift=draw(st.sampled_from([0.0, 0.05])),
        partitions=tuple(parts),
        crashes=tuple(crashes),
        genesis=draw(st.sampled_from([0, 3])),
        replicas=draw(st.sampled_from([1, 2])),
        stats_every=draw(st.sampled_from([0.0, 2.0])),
        wire=draw(st.booleans()),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules())
def test_no_safety_violation_under_any_fault_schedule(sc: Scenario) -> None:
    res = replay(sc)
    assert res.decided_epochs >= 1 or sc.loss > 0 or sc.partitions or sc.crashes, sc.describe()
    assert not any(res.violations.values()), (
        f"{res.violations} {res.examples[:5]}\nreplay: replay({sc.describe()})"
    )
