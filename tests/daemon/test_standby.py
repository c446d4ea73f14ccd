"""Standby copies (`daemon/standby.py`): after an epoch every expert's shard is on disk at
COPIES nodes besides its holders (never loaded nor announced), so killing an expert's only
holder does not stop a generation before any re-placement; and the rendezvous choice is
deterministic and spread."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgemoe.daemon.standby import COPIES, Epoch, Standby, ranked, standby_nodes

from .conftest import (
    MAX_NEW,
    PROMPTS,
    Cluster,
    Node,
    PeersWithoutClients,
    TinyModel,
    make_node,
    placed,
    wait_for,
)


def _store(node: Node) -> Path:
    return node.model_dir or node.state_dir / "model"


def _on_disk(node: Node, manifest: dict, key: str) -> bool:
    """The expert's shard is in the node's store with the manifest's sha256."""
    layer, expert = key.split("/")
    rel = f"experts/L{layer}/E{expert}.safetensors"
    path = _store(node) / rel
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == (
        manifest["files"][rel]["sha256"])  # fmt: skip


def _standby_done(cluster: Cluster) -> dict | None:
    """The placed view once every node that keeps standby copies has fetched them all for
    the epoch in force."""
    v = placed(cluster)
    if v is None:
        return None
    for node in cluster.nodes:
        sb = node.cluster()["standby"]
        if sb is not None and (sb["epoch"] != v["epoch"] or sb["pending"]):
            return None
    return v


@pytest.fixture(scope="module")
def trio(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """s has the shards; x and y join through it (static seeds, no multicast); each has room
    for 40% of the experts, so most experts are placed on one node only."""
    tmp = tmp_path_factory.mktemp("standby")
    cid = f"standby-{os.getpid()}"
    s = make_node(tmp, "s", shard_dir=tiny.shard_dir, cluster_id=cid, capacity="40%", mdns=False)
    seed = ["--seed-peer", f"127.0.0.1:{s.port}"]
    x = make_node(tmp, "x", shard_dir=None, cluster_id=cid, capacity="40%", mdns=False,
                  extra=seed)  # fmt: skip
    y = make_node(tmp, "y", shard_dir=None, cluster_id=cid, capacity="40%", mdns=False,
                  extra=seed)  # fmt: skip
    cluster = Cluster([s, x, y], tmp, cid)
    try:
        for node in cluster.nodes:
            node.start()
        for node in cluster.nodes:
            node.wait_ready(120)
        wait_for(lambda: _standby_done(cluster), 90, "placement in force, standby fetched")
        yield cluster
    finally:
        for node in cluster.nodes:
            node.stop()


def test_every_expert_is_on_disk_at_standby_nodes_and_never_announced(
    trio: Cluster, tiny: TinyModel
) -> None:
    v = _standby_done(trio)
    assert v is not None
    manifest = json.loads((tiny.shard_dir / "manifest.json").read_text())
    ids = {n.node_id: n for n in trio.nodes}
    for key, holders in v["placement"]["holders"].items():
        others = [n for i, n in ids.items() if i not in holders]
        copies = [n.name for n in others if _on_disk(n, manifest, key)]
        assert len(copies) >= min(COPIES, len(others)), (key, holders, copies)
    for node in trio.nodes:
        view = node.cluster()
        for i in ids:  # announced holdings are exactly the placement: no standby copy in them
            assigned = {k for k, hs in view["placement"]["holders"].items() if i in hs}
            assert set(view["holdings"][i]) == assigned
    x, y = trio.nodes[1].cluster()["standby"], trio.nodes[2].cluster()["standby"]
    assert x["experts"] > 0 and y["experts"] > 0
    assert trio.nodes[0].cluster()["standby"] is None  # the seed's model dir has every file


def test_killing_the_only_holder_does_not_stop_a_generation(
    trio: Cluster, tiny: TinyModel
) -> None:
    """kill -9 a node that alone holds some experts, then generate at once on another
    (before membership declares it dead, before any re-placement): the request is computed
    with the standby copies and gives the reference tokens."""
    v = placed(trio)
    assert v is not None
    holders = v["placement"]["holders"]
    sole = Counter(hs[0] for hs in holders.values() if len(hs) == 1)
    # a fresh node (not the seed) as victim, the other fresh one asks: it computes from
    # standby copies it fetched, not from a full model dir
    _, x, y = trio.nodes
    victim, asker = (x, y) if sole[x.node_id] >= sole[y.node_id] else (y, x)
    assert sole[victim.node_id] > 0, holders
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    for prompt in PROMPTS:
        status, body = asker.request("POST", "/v1/completions", {
            "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0}, timeout=60)  # fmt: skip
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == tiny.reference[prompt], prompt
        if prompt == PROMPTS[0]:
            assert asker.cluster()["epoch"] == v["epoch"], "re-placed first: nothing tested"


def test_rendezvous_is_deterministic_spread_and_moves_little() -> None:
    members = [f"node-{i}" for i in range(5)]
    experts = [(layer, e) for layer in range(8) for e in range(16)]
    picks = {k: standby_nodes(members, *k, holders=[members[k[1] % 5]]) for k in experts}
    # the same on every node, whatever order it lists the members in
    assert picks == {k: standby_nodes(members[::-1], *k, holders=[members[k[1] % 5]])
                     for k in experts}  # fmt: skip
    for k, nodes in picks.items():
        assert len(nodes) == COPIES and members[k[1] % 5] not in nodes
    load = Counter(n for nodes in picks.values() for n in nodes)
    assert set(load) == set(members)
    share = len(experts) * COPIES / len(members)
    assert all(0.6 * share <= c <= 1.4 * share for c in load.values()), load
    # a member gone moves only its own duties: the others keep theirs
    gone = members[1]
    rest = [m for m in members if m != gone]
    for k, nodes in picks.items():
        kept = [n for n in nodes if n != gone]
        assert ranked(rest, *k, exclude=[members[k[1] % 5]])[: len(kept)] == kept


def test_a_node_stands_by_only_for_others_experts_and_skips_dead_ranks() -> None:
    members = ("a", "b", "c", "d")
    experts = [(0, e) for e in range(32)]
    holders = {k: frozenset({members[k[1] % 4]}) for k in experts}
    ep = Epoch(3, members, holders)

    async def fetch(layer: int, expert: int) -> None:
        raise AssertionError("mine() fetches nothing")

    def node(me: str, dead: frozenset[str] = frozenset()) -> Standby:
        store: Any = None  # mine() reads no file
        return Standby(me, store, experts, lambda: ep, lambda n: n not in dead, fetch)

    duties = {m: node(m).mine(ep) for m in members}
    for m, mine in duties.items():
        assert all(m not in holders[k] for k in mine)
    # every expert has COPIES standby nodes, all told
    assert Counter(k for mine in duties.values() for k in mine) == dict.fromkeys(experts, COPIES)
    # with d dead, its duties go to the next alive node in rank
    after = {m: node(m, frozenset({"d"})).mine(ep) for m in "abc"}
    for k in experts:
        if "d" in holders[k]:
            continue
        assert sum(k in after[m] for m in "abc") == COPIES


def test_an_expert_whose_live_holders_all_failed_lately_is_computed_here(tiny: TinyModel) -> None:
    """Its holder still counts as alive but failed a call within SHUN_S: the expert is
    computed here from its shard rather than waiting on that holder again."""
    import asyncio

    import torch

    from edgemoe.daemon.metrics import DaemonMetrics
    from edgemoe.daemon.remote import Router
    from edgemoe.model.local import LocalExperts
    from edgemoe.model.manifest import Manifest

    manifest = Manifest.load(tiny.shard_dir)
    local = LocalExperts(tiny.shard_dir)
    full = LocalExperts(tiny.shard_dir).load_all()
    hidden = torch.randn(3, manifest.hidden_size, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[0, 1], [1, 2], [2, 0]])
    weights = torch.rand(3, 2, generator=torch.Generator().manual_seed(3))
    loaded: list[tuple[int, int]] = []

    async def fetch_and_load(layer: int, expert: int) -> None:
        loaded.append((layer, expert))
        await asyncio.to_thread(local.load, layer, expert)

    async def run() -> torch.Tensor:
        peers = PeersWithoutClients(alive=True)
        router = Router("me", local, peers, asyncio.get_running_loop(), DaemonMetrics(),
                        fetch_and_load)  # fmt: skip
        router.set_holdings({(0, e): ("peer",) for e in range(manifest.num_experts)})
        assert router.pick(0, 1) == "peer"
        router._failed("peer", "test")  # a call to it just failed
        assert router.pick(0, 1) is None
        return await router.compute(0, hidden, ids, weights, None)

    out = asyncio.run(run())
    assert sorted(loaded) == [(0, 0), (0, 1), (0, 2)]
    assert torch.allclose(out, full.forward(0, hidden, ids, weights), atol=1e-6)
