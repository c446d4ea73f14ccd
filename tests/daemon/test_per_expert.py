"""The per-expert transport (DanceMoE's calls): two real daemons found by mDNS, one calling
its peer once per (token, expert), the other once per peer and layer. Both must generate the
single-process reference tokens (as per-server nodes do in test_cluster3), and the per-expert
node's remote calls must equal the (token, expert) pairs it routed to its peer."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import MAX_NEW, PROMPTS, Cluster, Node, TinyModel, make_node, placed, wait_for


@pytest.fixture(scope="module")
def mixed_transports(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[Cluster]:  # fmt: skip
    """Node 'pe' (the shards, per-expert) and node 'ps' (fetches, per-server), 60% each.

    The `uniform` strategy places without the workload, so each node holds 60% of every
    layer's experts whatever the prompts routed: a workload-aware placement made every
    prompt's experts local to 'pe' in one CI run, and left this test nothing to count."""
    tmp = tmp_path_factory.mktemp("per-expert")
    cid = f"pe-{os.getpid()}"
    nodes = [
        make_node(tmp, "pe", shard_dir=tiny.shard_dir, cluster_id=cid, capacity="60%",
                  extra=["--transport", "per-expert", "--strategy", "uniform"]),
        make_node(tmp, "ps", shard_dir=None, cluster_id=cid, capacity="60%",
                  extra=["--strategy", "uniform"]),
    ]  # fmt: skip
    for node in nodes:
        node.start()
    cluster = Cluster(nodes, tmp, cid)
    try:
        for node in nodes:
            node.wait_ready(180)
        wait_for(lambda: placed(cluster), 120, "a placement in force on both nodes")
        yield cluster
    finally:
        cluster.stop()


def _calls(node: Node) -> float:
    status, text = node.request("GET", "/metrics")
    assert status == 200
    text = text.decode() if isinstance(text, bytes) else str(text)
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("edgemoe_remote_expert_calls_total"))  # fmt: skip


def _remote_pairs(node: Node) -> int:
    routed = node.cluster()["routed"]
    return int(routed["total"] - routed["local"])


def _generate(node: Node, prompt: str) -> list[int]:
    status, body = node.request("POST", "/v1/completions", {
        "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0})  # fmt: skip
    assert status == 200, body
    return body["choices"][0]["token_ids"]


def test_per_expert_and_per_server_nodes_generate_the_reference_tokens(
    mixed_transports: Cluster, tiny: TinyModel
) -> None:
    for node in mixed_transports.nodes:
        for prompt in PROMPTS:
            assert _generate(node, prompt) == tiny.reference[prompt], (node.name, prompt)


def test_per_expert_makes_one_call_per_remote_token_expert_pair(
    mixed_transports: Cluster,
) -> None:
    per_expert, per_server = mixed_transports.nodes
    counted = {}
    for node in (per_expert, per_server):
        calls, pairs = _calls(node), _remote_pairs(node)
        # every prompt: a re-placement may make one prompt's experts all local to a node
        for prompt in PROMPTS:
            _generate(node, prompt)
        counted[node.name] = (_calls(node) - calls, _remote_pairs(node) - pairs)
    calls, pairs = counted["pe"]
    assert pairs > 0, "the placement left the per-expert node nothing remote: no test"
    assert calls == pairs
    # per-server: one call per peer and layer of a step, fewer than its remote pairs whenever
    # a step sends a peer more than one (token, expert)
    calls, pairs = counted["ps"]
    assert 0 < calls <= pairs


def test_transport_comes_from_env_and_a_bad_one_is_refused_naming_the_key(tmp_path: Path) -> None:
    from edgemoe.daemon.config import ConfigError, load_config

    base = {"secret": "s" * 32, "state_dir": str(tmp_path)}
    assert load_config(None, base, env={}).transport == "per-server"
    assert load_config(None, base, env={"EDGEMOE_TRANSPORT": "per-expert"}).transport == (
        "per-expert")  # fmt: skip
    with pytest.raises(ConfigError, match=r"^transport: must be one of per-server, per-expert"):
        load_config(None, {**base, "transport": "per-token"}, env={})
