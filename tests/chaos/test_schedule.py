"""The nemesis' schedule is replayable from its seed and covers every kind of fault."""

from __future__ import annotations

import itertools
import subprocess
import sys

from edgemoe.daemon.chaos.schedule import KINDS, MIGRATION_WAIT_S, PAUSE_S, make_schedule


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another() -> None:
    a = [s.to_dict() for s in make_schedule(11, 5, 120)]
    assert a == [s.to_dict() for s in make_schedule(11, 5, 120)]
    assert a != [s.to_dict() for s in make_schedule(12, 5, 120)]


def test_steps_follow_each_other_with_heals_between_and_one_join() -> None:
    kinds: set[str] = set()
    for seed in range(30):
        steps = make_schedule(seed, 5, 120)
        assert [s.kind for s in steps].count("join") == 1
        i = next(i for i, s in enumerate(steps) if s.kind == "join")
        join, after = steps[i], steps[i + 1]
        assert join.nodes == (5,) and join.at >= 60  # the spare namespace, past half the run
        # the joining node's link degrades while it pulls its experts
        assert after.during == "migration" and after.nodes == (5,)
        assert after.kind in ("slow", "lossy")
        for prev, nxt in itertools.pairwise(steps):
            # healed before the next one starts (a migration-timed step waits up to its limit)
            end = prev.at + max(p.hold for p in prev.parts())
            assert nxt.at > end + (MIGRATION_WAIT_S if prev.during else 0)
        for s in steps:
            for part in s.parts():
                kinds.add(part.kind)
                assert part.at < 120
                if part.kind == "pause":
                    assert PAUSE_S[0] <= part.hold <= PAUSE_S[1]
                if part.kind in ("partition", "bridge", "isolate"):
                    assert part.cuts and all(a < b < 5 for a, b in part.cuts)
    assert kinds == {*KINDS, "join"}


def test_several_faults_at_once_hit_other_nodes_and_leave_a_majority_up() -> None:
    seen = 0
    for seed in range(60):
        for s in make_schedule(seed, 5, 120):
            if not s.also:
                continue
            seen += 1
            touched = [set(p.nodes) | {n for pair in p.cuts for n in pair} for p in s.parts()]
            assert not touched[0] & touched[1]  # each fault its own node(s)
            assert len(s.down()) <= 2  # 3 of 5 stay up: a majority
        assert all(not s.also for s in make_schedule(seed, 3, 60))  # 3 nodes: one at a time
    assert seen >= 30


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
