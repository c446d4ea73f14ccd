"""The cluster follows the workload by itself: when a node's requests start selecting other
experts, a new placement epoch (reason "drift") is decided without anyone running
`edgemoe migrate`, and holdings move; a steady workload starts none. The core's drift
hysteresis is checked in-process, the daemons as real processes on 127.0.0.1."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from edgemoe.cluster.config import ClusterConfig
from edgemoe.cluster.effects import Decided, FetchShard
from edgemoe.cluster.messages import PushPull, Versioned
from edgemoe.cluster.node import STATS, Node
from edgemoe.cluster.outbox import Outbox
from edgemoe.cluster.simnet import capacity_round_robin
from edgemoe.cluster.storage import MemoryStorage

from .conftest import Cluster, TinyModel, make_node, placed, wait_for
from .test_seeds_lifecycle import metrics

# ---- the core's drift trigger, in-process ---------------------------------------------------

MIN_INTERVAL = 10.0
TICK_S = 0.005


class OneNode:
    """A single-member core (its own quorum) driven on a simulated clock, with a drift
    measure whose value the test sets."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.level = 0.0
        self.asked: list[set[str]] = []
        cfg = replace(ClusterConfig.lan(), drift_threshold=threshold,
                      drift_min_interval=MIN_INTERVAL)  # fmt: skip
        self.node = Node("a", "a:1", 4000, storage=MemoryStorage(),
                         placement=capacity_round_robin(1, 4, 1000), genesis=["a"], config=cfg,
                         drift=self._drift)  # fmt: skip
        self.t = 0.0
        self.decided: list[tuple[float, str]] = []
        self._take(self.node.start(self.t))

    def _drift(self, current: Any, used: Any) -> float:
        self.asked.append(set(current))
        return self.level

    def _take(self, out: Outbox) -> None:
        for eff in out.effects:
            if isinstance(eff, Decided):
                self.decided.append((self.t, eff.value.reason))
            elif isinstance(eff, FetchShard):  # it holds the whole model: loaded at once
                self._take(self.node.shard_loaded(self.t, eff.layer, eff.expert))

    def run_until(self, end: float) -> None:
        while self.t < end:  # like the daemon's timer: at least TICK_S between ticks
            self.t = max(self.t + TICK_S, min(self.node.next_deadline(), end))
            self._take(self.node.tick(self.t))

    def publish(self) -> None:
        self._take(self.node.publish_stats(self.t, {"v": self.t}))


def test_core_drift_epochs_wait_the_min_interval_after_the_last_decision() -> None:
    one = OneNode()
    one.run_until(5.0)
    assert [r for _, r in one.decided] == ["genesis"]
    genesis_at = one.decided[0][0]
    one.level = 0.9
    one.publish()
    one.run_until(60.0)
    times = [t for t, r in one.decided if r == "drift"]
    assert len(times) >= 2, one.decided  # the measure stays high: it keeps asking, held back
    starts = [genesis_at, *times]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(g >= MIN_INTERVAL for g in gaps), gaps
    assert len(times) <= 60.0 / MIN_INTERVAL


def test_core_drift_at_or_below_the_threshold_starts_no_epoch() -> None:
    one = OneNode(threshold=0.5)
    one.run_until(5.0)
    one.level = 0.5
    one.publish()
    one.run_until(60.0)
    assert [r for _, r in one.decided] == ["genesis"]
    assert one.asked  # the measure was consulted


def test_core_drift_leaves_out_statistics_of_non_members() -> None:
    """A dead node's last snapshot stays in the statistics map; counted, it would look like
    full drift forever."""
    one = OneNode()
    one.run_until(5.0)
    one.publish()
    ghost = Versioned(STATS, "ghost", 1, {"v": 0})
    one._take(one.node.handle(one.t, PushPull("ghost", True, (), (ghost,), one.node.epoch)))
    assert "ghost" in one.node.stats_snapshots()
    assert one.asked and all(origins <= {"a"} for origins in one.asked)


# ---- real daemons -------------------------------------------------------------------------

THRESHOLD = 0.25  # the test's; a steady prompt drifts ~0, STEADY -> SHIFTED moves ~0.95
DRIFT_ENV = {"EDGEMOE_DRIFT_THRESHOLD": str(THRESHOLD), "EDGEMOE_DRIFT_MIN_INTERVAL": "3"}
STATS_INTERVAL_S = 3.0  # daemon's statistics publication period (cluster_driver)
# On the tests' tiny Mixtral (seed 3) these route to nearly disjoint experts: per layer,
# STEADY picks experts {1, 7} and {3, 6, 7}, SHIFTED {0, 2, 5} and {1, 2, 5}.
STEADY, SHIFTED = "aaaaaaaaaaaaaaaa", "zzzz zzzz zzzz"
NEW_TOKENS = 8
STEADY_PAUSE_S = 0.2


@pytest.fixture(scope="module")
def pair(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """a has the shards and room for 40% of the experts, so what it holds follows its own
    requests; b (room for all) joins through a as a static seed."""
    tmp = tmp_path_factory.mktemp("drift")
    cid = f"drift-{os.getpid()}"
    a = make_node(tmp, "a", shard_dir=tiny.shard_dir, cluster_id=cid, capacity="40%", mdns=False)
    b = make_node(tmp, "b", shard_dir=None, cluster_id=cid, capacity="100%", mdns=False,
                  extra=["--seed-peer", f"127.0.0.1:{a.port}"])  # fmt: skip
    cluster = Cluster([a, b], tmp, cid)
    for node in cluster.nodes:
        node.env.update(DRIFT_ENV)
        node.start()
    try:
        for node in cluster.nodes:
            node.wait_ready(120)
        yield cluster
    finally:
        cluster.stop()


class Workload:
    """One client thread sending `prompt` to a node, `pause` s apart, until stopped."""

    def __init__(self, send: Callable[[str], None], prompt: str, pause: float = 0.0) -> None:
        self.prompt = prompt
        self.pause = pause
        self.sent = 0
        self.errors: list[str] = []
        self._send = send
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._send(self.prompt)
                self.sent += 1
            except AssertionError as exc:
                self.errors.append(str(exc))
                return
            self._stop.wait(self.pause)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def local_share(view: dict[str, Any], node_id: str) -> float:
    """Share of the node's own (decayed) expert selections that its holdings serve."""
    counts = view["stats"][node_id]["counts"]
    held = {tuple(int(x) for x in k.split("/")) for k in view["holdings"][node_id]}
    total = sum(sum(row) for row in counts)
    mine = sum(c for l, row in enumerate(counts) for e, c in enumerate(row) if (l, e) in held)
    return mine / total


def test_a_workload_shift_moves_experts_without_an_operator(pair: Cluster) -> None:
    a, b = pair.nodes

    def send(prompt: str) -> None:
        status, body = a.request("POST", "/v1/completions", {
            "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}, timeout=60)  # fmt: skip
        assert status == 200, body

    first = wait_for(lambda: placed(pair), 90, "the first placement")
    assert first["placement"]["reason"] in ("genesis", "membership")
    # paced: the fewer steady selections pile up, the sooner the shifted ones outweigh them
    load = Workload(send, STEADY, pause=STEADY_PAUSE_S)
    try:
        # a's first statistics are full drift from the placement made before any request
        settled = wait_for(
            lambda: (v := placed(pair)) and v["placement"]["reason"] == "drift"
            and v["drift"]["value"] < THRESHOLD and v,
            60, "a drift epoch placed on the steady workload",
        )  # fmt: skip
        epoch = settled["epoch"]
        # steady: fresh statistics keep coming for longer than min interval + propose delay,
        # and no epoch follows
        version = settled["stats"][a.node_id]["version"]
        seen: list[float] = []

        def steady_for_a_while() -> bool:
            v = a.cluster()
            seen.append(v["drift"]["value"])
            assert v["epoch"] == epoch, f"epoch {v['epoch']} ({v['placement']['reason']})"
            return v["stats"][a.node_id]["version"] >= version + 3

        wait_for(steady_for_a_while, 4 * STATS_INTERVAL_S + 10, "three fresh statistics")
        assert b.cluster()["epoch"] == epoch
        assert max(seen) < THRESHOLD, seen
        assert load.sent > 0 and not load.errors, load.errors

        before = a.cluster()
        load.stop()
        shift_at = time.monotonic()
        load = Workload(send, SHIFTED)
        rising: list[float] = []

        def next_epoch() -> dict[str, Any] | None:
            v = a.cluster()
            if v["epoch"] > epoch:
                return v
            rising.append(v["drift"]["value"])
            return None

        moved = wait_for(next_epoch, 60, "an epoch after the shift")
        seconds = time.monotonic() - shift_at
        load.stop()  # more shifted requests could drift past the new epoch too
        assert moved["placement"]["reason"] == "drift", moved["placement"]
        after = wait_for(lambda: placed(pair), 60, "the new placement in force")
    finally:
        load.stop()
    assert not load.errors, load.errors
    old = {**after, "holdings": before["holdings"]}
    print(f"drift while steady <= {max(seen):.3f}, after the shift up to {max(rising):.3f}; "
          f"epoch {moved['epoch']} decided {seconds:.1f} s after the shift "
          f"({load.sent} shifted requests); a held {sorted(before['holdings'][a.node_id])}, "
          f"then {sorted(after['holdings'][a.node_id])}: serving {local_share(old, a.node_id):.2f}"
          f" -> {local_share(after, a.node_id):.2f} of its own selections")  # fmt: skip
    assert max(rising) > THRESHOLD
    assert set(after["holdings"][a.node_id]) != set(before["holdings"][a.node_id])
    # the new holdings serve more of a's current workload than the old ones would
    assert local_share(after, a.node_id) > local_share(old, a.node_id)
    m = metrics(a)
    assert m[("edgemoe_placement_epochs_by_reason_total", (("reason", "drift"),))] >= 2
    assert ("edgemoe_statistics_drift", ()) in m
