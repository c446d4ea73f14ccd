"""Drift in the benchmark: strategies see the recorder's decayed statistics, not an oracle."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edgemoe.bench.placement import _decayed_counts, preset, run
from edgemoe.stats.traces import default_trace_path

TRACE = default_trace_path()


def test_decayed_counts_weigh_each_request_by_its_age_in_half_lives() -> None:
    a = np.array([[[0, 1]]])  # one token, one layer, experts 0 and 1
    b = np.array([[[1, 2]], [[1, 2]]])  # two tokens on experts 1 and 2
    got = _decayed_counts([(0.0, a), (10.0, b), (30.0, b)], t=20.0, half_life_s=10.0, E=4)
    # at t=20: a is two half-lives old (x 1/4), b one (x 1/2); the request at 30 is unseen
    assert got.tolist() == [[0.25, 0.25 + 1.0, 1.0, 0.0]]


@pytest.mark.skipif(not TRACE.is_file(), reason=f"{TRACE} not present")
def test_the_drift_scenario_re_places_when_the_decayed_counts_cross_the_drift_threshold() -> None:
    sc = replace(preset("drift"), trace=str(TRACE), strategies=["dancemoe", "edgemoe"],
                 max_requests=4, max_tokens=24, max_samples=3000, load=0.4, judge=False,
                 half_life_s=200.0)
    doc = run(sc)
    when = doc["scenario"]["replaced_at_s"]
    # the drift measure crosses the daemon's threshold only once new-task requests have been
    # counted (a request's tokens count from its arrival): never before the switch
    assert when is not None and when >= doc["scenario"]["switch_s"] > 0
    for name in ("dancemoe", "edgemoe"):
        row = doc["strategies"][name]
        assert row["latency_mean_s"] > 0
    assert doc["strategies"]["dancemoe"]["migration_bytes"] > 0
