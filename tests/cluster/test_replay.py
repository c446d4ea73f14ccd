"""A failing seed is reproducible: a scenario replays to the identical trace, and the checker
really catches a broken rule (so the property tests can fail)."""

from __future__ import annotations

import math

import pytest

from edgemoe.cluster.migration import RoutingTable
from edgemoe.cluster.simnet import Scenario, SimNet, replay

FAULTY = Scenario(
    nodes=8,
    seed=3,
    duration=40.0,
    loss=0.1,
    duplicate=0.1,
    drift=0.05,
    partitions=((5.0, 15.0, ((0, 1, 2), (3, 4, 5, 6, 7))),),
    crashes=((8.0, 2, 5.0), (12.0, 5, 3.0), (20.0, 6, math.inf)),
    trace_messages=True,
    wire=True,
)


def test_replaying_a_scenario_gives_the_identical_trace() -> None:
    a, b = SimNet(FAULTY), SimNet(FAULTY)
    ra, rb = a.run(), b.run()
    assert a.trace == b.trace
    assert ra.trace_digest == rb.trace_digest
    assert (ra.messages, ra.decided_epochs, ra.decisions_at) == (
        rb.messages,
        rb.decided_epochs,
        rb.decisions_at,
    )
    other = replay(Scenario(**{**FAULTY.__dict__, "seed": 4}))
    assert other.trace_digest != ra.trace_digest


def test_printed_scenario_rebuilds_the_same_run() -> None:
    text = FAULTY.describe()
    rebuilt = eval(text, {"Scenario": Scenario, "inf": math.inf})  # what a failure prints
    assert rebuilt == FAULTY
    assert replay(rebuilt).trace_digest == replay(FAULTY).trace_digest


def test_checker_catches_drops_on_stale_announcements(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the epoch stamp ignored (the bug the property tests found), nodes trust each
    other's stale holdings and drop last copies; the checker counts it, and the run is clean
    with the rule in place."""
    # a seed on which the reverted rule drops a last copy (seeds 5, 17, 30, 38 of 1..39 do;
    # the seed moves whenever the cores draw their randomness differently)
    sc = Scenario(
        nodes=8,
        seed=5,
        duration=40.0,
        loss=0.1,
        partitions=((5.0, 15.0, ((0, 1, 2), (3, 4, 5, 6, 7))),),
        crashes=((8.0, 2, 5.0), (12.0, 5, 3.0)),
    )
    assert replay(sc).violations["last_copy"] == 0
    monkeypatch.setattr(RoutingTable, "epoch_of", lambda self, node: math.inf)
    bad = replay(sc)
    assert bad.violations["last_copy"] > 0, bad.examples
    assert any("last live copy" in e for e in bad.examples)
