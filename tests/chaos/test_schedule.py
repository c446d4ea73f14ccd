"""The nemesis' schedule is replayable from its seed and covers every kind of fault."""

from __future__ import annotations

import itertools
import subprocess
import sys

from edgemoe.daemon.chaos.schedule import KINDS, PAUSE_S, make_schedule


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another() -> None:
    a = [s.to_dict() for s in make_schedule(11, 5, 120)]
    assert a == [s.to_dict() for s in make_schedule(11, 5, 120)]
    assert a != [s.to_dict() for s in make_schedule(12, 5, 120)]


def test_steps_follow_each_other_with_heals_between_and_one_join() -> None:
    kinds: set[str] = set()
    for seed in range(30):
        steps = make_schedule(seed, 5, 120)
        assert [s.kind for s in steps].count("join") == 1
        join = next(s for s in steps if s.kind == "join")
        assert join.nodes == (5,) and join.at >= 60  # the spare namespace, past half the run
        for prev, nxt in itertools.pairwise(steps):
            assert nxt.at > prev.at + prev.hold  # healed before the next one starts
        for s in steps:
            kinds.add(s.kind)
            assert s.at < 120
            if s.kind == "pause":
                assert PAUSE_S[0] <= s.hold <= PAUSE_S[1]
            if s.kind in ("partition", "bridge", "isolate"):
                assert s.cuts and all(a < b < 5 for a, b in s.cuts)
    assert kinds == {*KINDS, "join"}


def test_a_minority_partition_leaves_a_majority_and_a_bridge_sees_both_sides() -> None:
    for seed in range(40):
        for s in make_schedule(seed, 5, 120):
            cut_nodes = {n for pair in s.cuts for n in pair}
            if s.kind == "partition":
                assert len(cut_nodes) == 5 and len(s.cuts) == 2 * 3  # {2} x {3}
            if s.kind == "bridge":
                assert s.nodes[0] not in cut_nodes and len(s.cuts) == 2 * 2


def test_bench_chaos_refuses_a_bad_size_before_building_anything() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edgemoe.cli", "bench", "chaos", "--nodes", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "--nodes must be >= 1" in done.stderr
