"""The chaos checker catches planted faults in recorded histories and real files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from edgemoe.daemon.chaos.checker import (
    Exit,
    Fault,
    History,
    Request,
    Resources,
    Snapshot,
    check,
    history_from_json,
    with_majority,
)
from edgemoe.daemon.chaos.disks import shard_hashes

REF = {"hello": [5, 6, 7, 8], "world": [9, 9, 1, 2]}
IDS = ["a", "b", "c"]


def _view(node: int, epoch: int, holders: dict[str, list[str]]) -> dict[str, Any]:
    me = IDS[node]
    return {"node_id": me, "model": {"num_layers": 1, "num_experts": 3},
            "placement": {"epoch": epoch, "holders": holders},
            "holdings": {me: sorted(k for k, hs in holders.items() if me in hs)}}  # fmt: skip


PLACED = {"0/0": ["a"], "0/1": ["b"], "0/2": ["c"]}


def _clean() -> History:
    """Three nodes, one partition of node 2 healed at 20 s, every answer right."""
    reqs = [Request(node=n, prompt=p, max_tokens=4, start=t, end=t + 1.0, deadline_s=10,
                    status="ok", token_ids=tuple(REF[p]))
            for n in range(3) for t in (1.0, 12.0, 25.0) for p in ("hello", "world")]  # fmt: skip
    return History(
        nodes=3, reference=REF, requests=reqs, end=30.0,
        faults=[Fault(step=0, kind="partition", start=10.0, end=20.0, cuts=((0, 2), (1, 2)))],
        snapshots=[Snapshot(t, n, _view(n, 1, PLACED)) for n in range(3) for t in (2.0, 15.0)],
        final=[Snapshot(29.0, n, _view(n, 1, PLACED)) for n in range(3)],
        exits=[Exit(node=1, t=5.0, code=-9, asked=True)],
        resources=[Resources(node=0, warm={"rss": 100, "fds": 20}, end={"rss": 140, "fds": 22})],
    )  # fmt: skip


def test_a_clean_history_has_no_violations_and_counts_everything() -> None:
    report = check(_clean())
    assert report["violations"] == []
    assert (report["requests"], report["succeeded"], report["wrong"], report["hung"]) == (
        18, 18, 0, 0)
    # node 2's request at 12 s ran inside the partition, the minority side
    assert report["with_majority"] == 16 and report["availability_with_majority"] == 1.0
    assert report["worst_heal_to_success_s"] == 6.0  # heal at 20 s, first success ends at 26 s
    assert report["epochs_decided"] == 1


def test_heal_time_counts_a_restarted_nodes_boot_and_is_also_given_without_it() -> None:
    """A kill of node 1 healed (restarted) at 20 s; it boots until 31 s and answers at 32.5 s."""
    h = _clean()
    h.faults = [Fault(step=0, kind="kill", start=10.0, end=20.0, nodes=(1,)),
                Fault(step=0, kind="boot", start=20.0, end=31.0, nodes=(1,))]  # fmt: skip
    h.requests = [r for r in h.requests if r.node != 1 or r.start < 10]
    h.requests.append(Request(node=1, prompt="hello", max_tokens=4, start=31.5, end=32.5,
                              deadline_s=10, status="ok", token_ids=tuple(REF["hello"])))
    report = check(h)
    assert report["worst_heal_to_success_s"] == 12.5
    assert report["worst_heal_to_success_after_boot_s"] == 6.0  # node 0 and 2: 25 + 1 - 20
    # a booting node is back (its port is up, peers answer for it): its clock runs from 20 s
    assert report["worst_heal_to_success_once_back_s"] == 12.5
    assert report["boots_s"] == [11.0]


def test_a_heal_while_another_fault_still_holds_the_node_counts_that_apart() -> None:
    """One step: node 1 paused until 24 s, node 0's link slowed until 20 s; node 1 answers at
    25 s: 5 s after the slow link's heal, of which 4 s it was still frozen."""
    h = _clean()
    h.faults = [Fault(step=0, kind="slow", start=10.0, end=20.0, nodes=(0,)),
                Fault(step=0, kind="pause", start=10.0, end=24.0, nodes=(1,))]  # fmt: skip
    h.requests = [r for r in h.requests if r.start < 10]
    for node in (0, 1, 2):
        h.requests.append(Request(node=node, prompt="hello", max_tokens=4, start=24.5,
                                  end=25.0, deadline_s=10, status="ok",
                                  token_ids=tuple(REF["hello"])))  # fmt: skip
    report = check(h)
    assert report["worst_heal_to_success_s"] == 5.0
    assert report["worst_heal_to_success_after_boot_s"] == 5.0  # node 0 after the slow link
    # from when each node was back: node 0 at 20 s (5 s), node 1 once its pause ended (1 s)
    assert report["worst_heal_to_success_once_back_s"] == 5.0
    slow_node1 = [r for r in report["heal_to_success"] if r["kind"] == "slow" and r["node"] == 1]
    assert slow_node1[0]["seconds"] == 5.0 and slow_node1[0]["boot_left_s"] == 4.0
    assert slow_node1[0]["out_left_s"] == 4.0


def test_own_downtime_runs_through_a_leave_and_the_boot_that_follows_it() -> None:
    """One step: node 2 killed 10-14 s, node 1 leaving 10-20 s and booting 20-30 s; node 1's
    first success at 31 s is 17 s after the kill's heal, of which it was down 16 s."""
    h = _clean()
    h.faults = [Fault(step=0, kind="kill", start=10.0, end=14.0, nodes=(2,)),
                Fault(step=0, kind="boot", start=14.0, end=18.0, nodes=(2,)),
                Fault(step=0, kind="leave", start=10.0, end=20.0, nodes=(1,)),
                Fault(step=0, kind="boot", start=20.002, end=30.0, nodes=(1,))]  # fmt: skip
    h.requests = [r for r in h.requests if r.start < 10]
    for node, start in ((0, 15.0), (2, 19.0), (1, 30.5)):
        h.requests.append(Request(node=node, prompt="hello", max_tokens=4, start=start,
                                  end=start + 0.5, deadline_s=10, status="ok",
                                  token_ids=tuple(REF["hello"])))  # fmt: skip
    rows = {(r["kind"], r["node"]): r for r in check(h)["heal_to_success"]}
    assert rows[("kill", 1)]["seconds"] == 17.0 and rows[("kill", 1)]["boot_left_s"] == 16.0
    assert rows[("kill", 1)]["out_left_s"] == 6.0  # gone until 20 s; booting is being back
    assert rows[("leave", 1)]["boot_left_s"] == 10.0  # from the leave's heal: its boot
    assert rows[("kill", 0)]["boot_left_s"] == 0.0


def test_a_heal_cut_short_by_a_later_fault_on_the_node_is_a_lower_bound_apart() -> None:
    """Node 1 restarted at 20 s is cut off by a partition from 24 s to 34 s before its first
    success at 35 s: that success measures the partition's heal, not the restart's."""
    h = _clean()
    h.faults = [Fault(step=0, kind="kill", start=10.0, end=20.0, nodes=(1,)),
                Fault(step=0, kind="boot", start=20.0, end=23.0, nodes=(1,)),
                Fault(step=1, kind="partition", start=24.0, end=34.0, cuts=((0, 1), (1, 2)))]
    h.requests = [r for r in h.requests if r.start < 10]
    for node, start in ((0, 21.0), (2, 21.0), (0, 34.5), (1, 34.5), (2, 34.5)):
        h.requests.append(Request(node=node, prompt="hello", max_tokens=4, start=start,
                                  end=start + 0.5, deadline_s=10, status="ok",
                                  token_ids=tuple(REF["hello"])))  # fmt: skip
    report = check(h)
    rows = {(r["step"], r["node"]): r for r in report["heal_to_success"]}
    assert rows[(0, 1)]["cut_short"] and rows[(0, 1)]["seconds"] == 4.0  # 20 s to 24 s
    assert not rows[(0, 0)]["cut_short"] and rows[(0, 0)]["seconds"] == 1.5  # before 24 s
    assert rows[(1, 1)]["seconds"] == 1.0 and not rows[(1, 1)]["cut_short"]
    assert report["worst_heal_to_success_s"] == 1.5  # whole heals only
    assert (report["heals_cut_short"], report["worst_cut_short_lower_bound_s"]) == (1, 4.0)


def test_one_wrong_token_once_is_a_violation() -> None:
    h = _clean()
    r = h.requests[7]
    h.requests[7] = Request(**{**r.__dict__, "token_ids": (*r.token_ids[:-1], 0)})
    report = check(h)
    assert report["wrong"] == 1
    assert len(report["violations"]) == 1 and "wrong tokens" in report["violations"][0]


def test_one_epoch_decided_twice_differently_is_a_violation() -> None:
    """As when two nodes' state dirs are swapped: both report epoch 1, different holders."""
    h = _clean()
    swapped = {"0/0": ["b"], "0/1": ["a"], "0/2": ["c"]}
    h.snapshots.append(Snapshot(16.0, 1, _view(1, 1, swapped)))
    report = check(h)
    assert [v for v in report["violations"] if "two placements for epoch 1" in v]


def test_a_corrupted_shard_on_disk_is_a_violation(tmp_path: Path) -> None:
    files = {}
    for rel, data in (("dense.safetensors", b"dense" * 100), ("experts/L0/E1.safetensors",
                                                             b"expert" * 50)):  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
        files[rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (tmp_path / "manifest.json").write_text(json.dumps({"files": files}))
    h = _clean()
    h.shards = shard_hashes(0, tmp_path)
    assert check(h)["violations"] == []
    raw = bytearray((tmp_path / "experts/L0/E1.safetensors").read_bytes())
    raw[10] ^= 0xFF
    (tmp_path / "experts/L0/E1.safetensors").write_bytes(bytes(raw))
    h.shards = shard_hashes(0, tmp_path)
    violations = check(h)["violations"]
    assert len(violations) == 1 and "experts/L0/E1.safetensors on node 0" in violations[0]


def test_a_hung_request_counts_unless_its_own_daemon_was_frozen() -> None:
    h = _clean()
    h.requests.append(Request(node=0, prompt="hello", max_tokens=4, start=26.0,
                              deadline_s=2.0, status="timeout", end=29.0))  # fmt: skip
    assert check(h)["hung"] == 1
    h.faults.append(Fault(step=1, kind="pause", start=25.0, end=28.0, nodes=(0,)))
    assert check(h)["hung"] == 0


def test_internal_errors_are_listed_apart_from_clear_ones() -> None:
    h = _clean()
    for t, err in ((26.0, "HTTP 503: still loading"), (27.0, "HTTP 500: internal error: x")):
        h.requests.append(Request(node=1, prompt="hello", max_tokens=4, start=t, end=t + 0.1,
                                  deadline_s=10, status="error", error=err))  # fmt: skip
    report = check(h)
    assert report["failed_clearly"] == 2 and report["violations"] == []
    assert report["internal_errors"] == ["node 1 at 27.0s: HTTP 500: internal error: x"]


def test_unasked_deaths_unconverged_ends_and_growth_are_violations() -> None:
    h = _clean()
    h.exits.append(Exit(node=2, t=12.0, code=1, asked=False))
    h.final = [Snapshot(29.0, 0, _view(0, 2, PLACED)), Snapshot(29.0, 1, _view(1, 1, PLACED))]
    h.resources = [Resources(node=1, warm={"rss": 100, "threads": 10},
                             end={"rss": 151, "threads": 40})]  # fmt: skip
    text = "\n".join(check(h)["violations"])
    assert "node 2 died unasked" in text
    assert "not converged" in text and "have no live holder" in text  # node c is gone
    assert "rss grew" in text and "threads grew" in text


def test_majority_follows_cuts_and_downed_nodes() -> None:
    bridge = [Fault(0, "partition", 0.0, 10.0, cuts=((0, 2), (0, 3), (1, 2), (1, 3)))]
    # 5 nodes: {0,1} | {2,3}, node 4 the bridge that sees both sides
    assert with_majority(4, 1.0, 2.0, bridge, 5)
    assert with_majority(0, 1.0, 2.0, bridge, 5)  # 0, 1 and the bridge: 3 of 5
    two_down = [Fault(0, "kill", 0.0, 10.0, nodes=(3,)), Fault(1, "pause", 5.0, 8.0, nodes=(4,))]
    assert with_majority(0, 1.0, 4.0, two_down, 5)
    assert with_majority(0, 1.0, 6.0, two_down, 5)  # 0, 1, 2 of 5
    assert not with_majority(3, 1.0, 2.0, two_down, 5)


def test_a_history_survives_its_json_round_trip() -> None:
    h = _clean()
    data = json.loads(json.dumps({
        "nodes": h.nodes, "reference": h.reference, "end": h.end,
        "requests": [r.__dict__ for r in h.requests], "faults": [f.__dict__ for f in h.faults],
        "snapshots": [s.__dict__ for s in h.snapshots], "final": [s.__dict__ for s in h.final],
        "shards": [], "exits": [e.__dict__ for e in h.exits],
        "resources": [r.__dict__ for r in h.resources]}))  # fmt: skip
    assert check(history_from_json(data)) == check(h)
