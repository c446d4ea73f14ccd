"""A cluster joined through static seeds with multicast off, in order:
the third node fetches the dense part from two peers at once; `/metrics` reports the traffic;
SIGTERM hands a node's experts over before it leaves and exits 0; after quorum loss the
operator's `edgemoe migrate --members` is adopted by the survivor, which keeps serving.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import (
    MAX_NEW,
    PROMPTS,
    TOKEN,
    Cluster,
    Node,
    TinyModel,
    make_node,
    placed,
    wait_for,
)

ALL_EXPERTS = 16


def metrics(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of the node's /metrics."""
    status, body = node.request("GET", "/metrics")
    assert status == 200
    text = body.decode() if isinstance(body, bytes) else json.dumps(body)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def complete(node: Node, prompt: str) -> list[int]:
    status, body = node.request("POST", "/v1/completions", {
        "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0}, timeout=120)  # fmt: skip
    assert status == 200, body
    return list(body["choices"][0]["token_ids"])


@pytest.fixture(scope="module")
def seeded(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """s has the shards; x joins through s; y (started once x has the dense part) through s
    and x."""
    tmp = tmp_path_factory.mktemp("seeded")
    cid = f"seeds-{os.getpid()}"
    s = make_node(tmp, "s", shard_dir=tiny.shard_dir, cluster_id=cid, capacity="60%", mdns=False)
    x = make_node(tmp, "x", shard_dir=None, cluster_id=cid, capacity="60%", mdns=False,
                  extra=["--seed-peer", f"127.0.0.1:{s.port}"])  # fmt: skip
    y = make_node(tmp, "y", shard_dir=None, cluster_id=cid, capacity="60%", mdns=False,
                  extra=["--seed-peer", f"127.0.0.1:{s.port}",
                         "--seed-peer", f"127.0.0.1:{x.port}"])  # fmt: skip
    cluster = Cluster([s, x, y], tmp, cid)
    try:
        s.start()
        x.start()
        wait_for(lambda: (x.state_dir / "model" / "dense.safetensors").is_file(), 120,
                 "x to install the dense part")  # fmt: skip
        y.start()
        for node in (s, x, y):
            node.wait_ready(120)
        yield cluster
    finally:
        cluster.stop()


def test_static_seeds_without_multicast_place_and_serve(seeded: Cluster, tiny: TinyModel) -> None:
    s, x, y = seeded.nodes
    assert all("--interface" not in n.args for n in seeded.nodes)  # multicast off
    view = wait_for(lambda: placed(seeded), 90, "a placement over the three seeded nodes")
    assert set(view["holdings"]) == {s.node_id, x.node_id, y.node_id}
    assert complete(y, PROMPTS[0]) == tiny.reference[PROMPTS[0]]
    # y's dense part came in segments from both nodes that had it
    dense = ("edgemoe_shard_bytes_served_total", (("kind", "dense"),))
    served = {n.name: metrics(n).get(dense, 0.0) for n in (s, x)}
    assert served["s"] > 0 and served["x"] > 0, served
    assert (y.state_dir / "model" / "dense.safetensors").is_file()


def test_metrics_report_requests_tokens_peers_gossip_and_migration(seeded: Cluster) -> None:
    s, x, y = seeded.nodes
    wait_for(lambda: placed(seeded), 90, "a settled placement")
    complete(y, PROMPTS[1])
    m = metrics(y)
    assert m[("edgemoe_http_requests_total", (("endpoint", "completions"), ("status", "200")))] >= 1
    assert m[("edgemoe_generated_tokens_total", ())] >= MAX_NEW
    assert m[("edgemoe_tokens_per_second", ())] > 0
    called = {dict(labels)["peer"] for (name, labels), v in m.items()
              if name == "edgemoe_remote_expert_calls_total" and v > 0}  # fmt: skip
    assert called and called <= {s.node_id, x.node_id}, called  # per-peer expert RPC calls...
    for peer in called:  # ...and bytes each way
        assert m[("edgemoe_remote_bytes_total", (("direction", "sent"), ("peer", peer)))] > 0
        assert m[("edgemoe_remote_bytes_total", (("direction", "received"), ("peer", peer)))] > 0
    # each call the model's thread made was timed, asking to answer
    made = sum(v for (name, _), v in m.items() if name == "edgemoe_remote_expert_calls_total")
    assert m[("edgemoe_expert_call_seconds_count", ())] == made
    assert 0 < m[("edgemoe_expert_call_seconds_sum", ())] < 30 * made
    assert 0.0 < m[("edgemoe_local_share", ())] < 1.0
    assert m[("edgemoe_gossip_messages_total", (("direction", "in"),))] > 0
    assert m[("edgemoe_gossip_messages_total", (("direction", "out"),))] > 0
    assert m[("edgemoe_placement_epoch", ())] >= 1
    assert m[("edgemoe_placement_epochs_decided_total", ())] >= 1
    assert m[("edgemoe_members_alive", ())] == 3
    assert m[("edgemoe_migration_bytes_total", ())] > 0  # y streamed its shards in
    assert y.request("GET", "/metrics", token=None)[0] == 401


def test_sigterm_hands_experts_over_and_exits_0(seeded: Cluster, tiny: TinyModel) -> None:
    s, x, _ = seeded.nodes
    before = wait_for(lambda: placed(seeded), 90, "a settled placement")
    assert before["holdings"][x.node_id], "x must hold experts for the handover to mean anything"
    assert x.stop(signal.SIGTERM, timeout=30) == 0
    assert "signal received: leaving the cluster" in x.log()
    assert "handover done" in x.log()  # it waited for the others to announce its experts
    # At once, without waiting for failure detection: x is known to have left, and the epoch
    # decided before it exited gives its experts to the others, who already hold them all.
    view = s.cluster()
    state = {m["node_id"]: m["state"] for m in view["members"]}
    assert state[x.node_id] == "left"
    assert view["epoch"] > before["epoch"]
    assert all(x.node_id not in h for h in view["placement"]["holders"].values())
    held = {k for n, ks in view["holdings"].items() if n != x.node_id for k in ks}
    assert len(held) == ALL_EXPERTS
    assert complete(s, PROMPTS[0]) == tiny.reference[PROMPTS[0]]


def test_operator_member_set_after_quorum_loss(seeded: Cluster, tiny: TinyModel) -> None:
    s, x, y = seeded.nodes
    assert x.proc is not None and x.proc.poll() is not None, "runs after the SIGTERM test"
    epoch = s.cluster()["epoch"]
    y.stop(signal.SIGKILL)
    wait_for(
        lambda: {m["node_id"]: m["state"] for m in s.cluster()["members"]}[y.node_id] == "dead",
        60,
        "s to declare y dead",
    )
    # one of two acceptors left: no quorum, s keeps serving with the last placement
    assert s.cluster()["epoch"] == epoch
    assert complete(s, PROMPTS[1]) == tiny.reference[PROMPTS[1]]
    out = subprocess.run(
        [sys.executable, "-m", "edgemoe.cli", "migrate", "--node", s.url, "--api-token", TOKEN,
         "--members", s.node_id, "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["decided"] and result["epoch"] == epoch + 1
    view = wait_for(
        lambda: (v := s.cluster())["migration"]["pending"] == 0 and v,
        60,
        "s to load the experts the operator's epoch gives it",
    )
    assert [m for m, h in view["placement"]["holders"].items() if h != [s.node_id]] == []
    assert len(view["holdings"][s.node_id]) == ALL_EXPERTS
    assert complete(s, PROMPTS[0]) == tiny.reference[PROMPTS[0]]
