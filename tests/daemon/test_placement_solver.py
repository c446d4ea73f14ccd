"""The placement is computed off the event loop: a timer on the loop keeps ticking on time while
a slow placement (EPLB at DeepSeek-V3's shape, about a second) runs on the solver's worker, and
the answer is the one the placement function gives when called directly."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from edgemoe.cluster.consensus import PlacementPending
from edgemoe.daemon.placement_fn import ModelShape, PlacementSolver, Solving, place
from edgemoe.stats.snapshot import ActivationSnapshot

SHAPE = ModelShape(num_layers=58, num_experts=256, top_k=8, expert_bytes=1000, hidden_size=7168)
TICK_S = 0.02


def _inputs(seed: int) -> tuple[dict[str, int], dict[str, ActivationSnapshot]]:
    rng = np.random.default_rng(seed)
    names = [f"{i:016x}" for i in range(4)]
    caps = {n: 1000 * (SHAPE.num_layers * SHAPE.num_experts * 3 // 8) for n in names}
    snaps = {}
    for n in names:
        sets = np.stack([rng.choice(SHAPE.num_experts, SHAPE.top_k, replace=False)
                         for _ in range(500)])  # fmt: skip
        counts = rng.gamma(0.5, size=(SHAPE.num_layers, SHAPE.num_experts))
        snaps[n] = ActivationSnapshot(n, 1, counts, rng.integers(0, SHAPE.num_layers, 500), sets,
                                      1.0)  # fmt: skip
    return caps, snaps


def _eplb(seed: int) -> object:
    caps, snaps = _inputs(seed)
    return place("eplb", SHAPE, caps, snaps)


def _slow_eplb(seed: int) -> object:
    """The same placement computed 4 times: one took 0.25 s on a quiet CI box, too short for
    the timer to show anything (about a second on a loaded one)."""
    for _ in range(3):
        _eplb(seed)
    return _eplb(seed)


async def test_a_timer_keeps_ticking_while_a_slow_placement_runs() -> None:
    ready = asyncio.Event()
    solver: PlacementSolver[int, object] = PlacementSolver(_slow_eplb, lambda seed: seed,
                                                           on_ready=ready.set)  # fmt: skip
    late: list[float] = []
    try:
        with pytest.raises(Solving) as pending:
            solver.lookup(7)
        started = time.monotonic()
        while not ready.is_set():  # the membership timer's loop, in miniature
            due = time.monotonic() + TICK_S
            await asyncio.sleep(TICK_S)
            late.append(time.monotonic() - due)
        took = time.monotonic() - started
        assert pending.value.ready.done()
        assert took > 0.3, f"the placement took only {took:.2f} s: too fast to show anything"
        worst = max(late)
        assert worst < min(0.3, took / 2), f"a tick came {worst:.3f} s late ({took:.2f} s run)"
        assert len(late) >= took / TICK_S / 3  # ticked all along, not once at the end
        assert solver.lookup(7) == _eplb(7)  # the same deterministic answer as a direct call
        assert solver.computed == 1  # asked twice, computed once
    finally:
        solver.close()


def _fails(seed: int) -> object:
    raise ValueError(f"no placement for {seed}")


async def test_a_failed_placement_is_raised_again_to_each_caller() -> None:
    solver: PlacementSolver[int, object] = PlacementSolver(_fails, lambda seed: seed)
    try:
        with pytest.raises(PlacementPending):  # the core's type: it keeps its trigger armed
            solver.lookup(3)
        with pytest.raises(ValueError, match="no placement for 3"):
            await solver.solve(3)
        with pytest.raises(ValueError, match="no placement for 3"):
            solver.lookup(3)  # remembered: not computed again
        assert solver.computed == 1
    finally:
        solver.close()


class _Gated:
    """A placement that waits for `release` when asked for "slow", recording what it ran."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.ran: list[str] = []

    def __call__(self, name: str) -> str:
        if name == "slow":
            assert self.release.wait(10)
        self.ran.append(name)
        return name.upper()


async def _queued_behind_slow(stale_s: float) -> tuple[PlacementSolver[str, str], _Gated]:
    gated = _Gated()
    solver: PlacementSolver[str, str] = PlacementSolver(gated, lambda n: n, stale_s=stale_s)
    with pytest.raises(Solving):
        solver.lookup("slow")  # now running on the worker
    return solver, gated


async def test_queued_placements_run_newest_first() -> None:
    solver, gated = await _queued_behind_slow(stale_s=60.0)
    try:
        for name in ("old", "new"):
            with pytest.raises(Solving):
                solver.lookup(name)
        gated.release.set()
        assert await solver.solve("old") == "OLD"
        assert gated.ran == ["slow", "new", "old"]  # inputs asked for last are the likeliest wanted
    finally:
        solver.close()


async def test_a_queued_placement_nobody_asks_for_again_is_dropped_unstarted() -> None:
    solver, gated = await _queued_behind_slow(stale_s=0.05)
    try:
        with pytest.raises(Solving) as stale:
            solver.lookup("stale")  # e.g. statistics republished since: never asked again
        await asyncio.sleep(0.2)
        waited = asyncio.ensure_future(solver.solve("awaited"))  # an acceptor checking a value
        await asyncio.sleep(0.2)  # asked once, then only awaited: longer ago than stale_s
        gated.release.set()
        assert await waited == "AWAITED"
        assert await stale.value.ready is None  # its asker is told to ask again
        assert gated.ran == ["slow", "awaited"] and solver.dropped == 1
        assert await solver.solve("stale") == "STALE"  # asked again: computed after all
    finally:
        solver.close()
