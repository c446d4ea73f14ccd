"""Three good daemons and one started with the wrong secret, all found by mDNS: the wrong one
is never a member and both sides say why; signed but malformed cluster messages are refused
and counted, and membership keeps working after them."""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Iterator

import pytest

from edgemoe.daemon.wire import keys_for, pack, request_headers

from .conftest import SECRET, Cluster, Node, TinyModel, make_node, placed, three_nodes, wait_for

SENDER = "feedfeedfeedfeed"  # signs with the right secret, never a member


@pytest.fixture(scope="module")
def mixed(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster,
                                                                                        Node]]:
    tmp = tmp_path_factory.mktemp("mixed")
    cid = f"mixed-{os.getpid()}"
    good = three_nodes(tmp, tiny, cid)
    own = tmp / "wrong-model"
    shutil.copytree(tiny.shard_dir, own)
    wrong = make_node(tmp, "wrong", shard_dir=own, cluster_id=cid, capacity="60%")
    wrong.args[wrong.args.index(SECRET)] = "a-different-secret-0123456789abcdef"
    for node in [*good, wrong]:
        node.start()
    cluster = Cluster(good, tmp, cid)
    try:
        for node in [*good, wrong]:
            node.wait_ready(300)  # four daemons loading at once on a busy machine
        yield cluster, wrong
    finally:
        wrong.stop()
        cluster.stop()


def test_a_node_with_the_wrong_secret_is_never_a_member(mixed: tuple[Cluster, Node]) -> None:
    cluster, wrong = mixed
    view = wait_for(lambda: placed(cluster), 240, "the three good nodes to place the model")
    good = {n.node_id for n in cluster.nodes}
    wait_for(lambda: all("refuses our signature" in n.log() for n in [wrong, *cluster.nodes]),
             60, "both sides to say the secret differs")  # fmt: skip
    for node in cluster.nodes:
        v = node.cluster()
        assert {m["node_id"] for m in v["members"]} == good, v["members"]
        assert {h for hs in v["placement"]["holders"].values() for h in hs} <= good
        assert wrong.node_id not in v["holdings"]
        log = node.log()
        assert "refusing peer requests from" in log and wrong.node_id in log
        assert f"peer {wrong.node_id} at" in log and "the cluster secret differs" in log
    assert view["epoch"] >= 1
    # said once (then with a doubling pause), not once per request
    said = re.findall("refuses our signature: the cluster secret differs",
                      wrong.log_path.read_text())  # fmt: skip
    assert 1 <= len(said) <= 3 * len(good), len(said)


def _signed_gossip(node: Node, message: dict) -> tuple[int, object]:
    body = pack(message)
    headers = request_headers(keys_for(SECRET.encode()), SENDER, node.node_id, "POST",
                              "/v1/gossip", body)  # fmt: skip
    return node.request("POST", "/v1/gossip", raw=body, token=None, headers=headers)


def test_malformed_signed_gossip_is_refused_and_membership_keeps_working(
    mixed: tuple[Cluster, Node],
) -> None:
    cluster, _ = mixed
    wait_for(lambda: placed(cluster), 240, "the three good nodes to place the model")
    seed, b, c = cluster.nodes
    bad = [
        {"__t": "Gossip", "sender": SENDER, "epoch": 0, "items": [
            {"__t": "Alive", "node": SENDER, "incarnation": "1", "addr": "http://x", "capacity": 1}
        ]},
        {"__t": "Ping", "sender": SENDER, "seq": 1, "target": seed.node_id, "epoch": "zzz"},
        {"__t": "Ack", "sender": SENDER, "seq": 1},  # fine: a control that is accepted
        {"__t": "Accept", "sender": SENDER, "epoch": 1, "ballot": [1]},
        {"__t": "Ping", "sender": SENDER, "seq": 1},  # no target
        {"__t": "Nope", "sender": SENDER},
        {"__t": "Gossip", "sender": "someone-else"},
    ]  # fmt: skip
    for node in (seed, b):
        statuses = [_signed_gossip(node, m)[0] for m in bad]
        assert statuses == [400, 400, 200, 400, 400, 400, 403], statuses
        status, text = node.request("GET", "/metrics")
        assert status == 200
        text = text.decode() if isinstance(text, bytes) else str(text)
        refused = dict(re.findall(r'edgemoe_peer_messages_refused_total\{reason="(\w+)"\} (\S+)',
                                  text))  # fmt: skip
        assert float(refused["type"]) >= 2 and float(refused["field"]) >= 1, refused
        assert node.request("GET", "/healthz", token=None)[1]["tasks"] == {"failed": {}}
    c.stop(signal.SIGKILL)

    def dead() -> bool:
        return all(
            any(m["node_id"] == c.node_id and m["state"] == "dead" for m in n.cluster()["members"])
            for n in (seed, b)
        )

    wait_for(dead, 60, "the killed node to be declared dead")
    for node in (seed, b):
        assert "Task exception was never retrieved" not in node.log_path.read_text()
