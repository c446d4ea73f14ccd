"""A shard damaged on a running node's disk (bit flipped, truncated, extended) is neither served
to peers nor kept: the node notices the file changed, checks it again, and fetches it anew."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import Cluster, Node, TinyModel, make_node, wait_for
from .test_bad_input import signed


@pytest.fixture(scope="module")
def pair(tiny: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """s has the shards; x fetches its share from s (so s can give a damaged one back)."""
    tmp = tmp_path_factory.mktemp("integrity")
    cid = f"integrity-{os.getpid()}"
    s = make_node(tmp, "s", shard_dir=tiny.shard_dir, cluster_id=cid, capacity="100%",
                  mdns=False)  # fmt: skip
    x = make_node(tmp, "x", shard_dir=None, cluster_id=cid, capacity="60%", mdns=False,
                  extra=["--seed-peer", f"127.0.0.1:{s.port}"])  # fmt: skip
    cluster = Cluster([s, x], tmp, cid)
    try:
        s.start()
        x.start()
        for node in (s, x):
            node.wait_ready(120)
        yield cluster
    finally:
        cluster.stop()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def damaged_count(node: Node) -> float:
    status, body = node.request("GET", "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith("edgemoe_damaged_shards_total "):
            return float(line.split()[1])
    raise AssertionError("edgemoe_damaged_shards_total missing")


def flip(data: bytes) -> bytes:
    return data[:100] + bytes([data[100] ^ 0x01]) + data[101:]


@pytest.mark.parametrize(
    "damage",
    [flip, lambda d: d[: len(d) // 2], lambda d: d + b"\0" * 64],
    ids=["bit-flip", "truncate", "extend"],
)
def test_a_shard_damaged_on_disk_is_not_served_and_is_fetched_again(
    pair: Cluster, damage: Callable[[bytes], bytes]
) -> None:
    x = pair.nodes[1]
    held = wait_for(lambda: x.cluster()["holdings"].get(x.node_id), 60, "x to hold experts")
    layer, expert = held[0].split("/")
    rel = f"experts/L{layer}/E{expert}.safetensors"
    store = x.state_dir / "model"
    manifest = json.loads((store / "manifest.json").read_text())
    want = manifest["files"][rel]["sha256"]
    path = store / rel
    wait_for(lambda: path.is_file() and sha(path) == want, 60, "x to have the shard")
    before = damaged_count(x)
    with path.open("r+b") as fh:  # in place: same inode, as a failing disk would
        data = damage(fh.read())
        fh.seek(0)
        fh.truncate()
        fh.write(data)
    status, body = signed(x, "GET", f"/v1/shards/{layer}/{expert}")
    # never the damaged bytes: refused, or (if x already mended it) the right ones
    assert status != 200 or hashlib.sha256(body).hexdigest() == want, (status, len(body))
    wait_for(lambda: sha(path) == want, 60, "x to fetch the shard again")
    assert damaged_count(x) >= before + 1
    status, body = signed(x, "GET", f"/v1/shards/{layer}/{expert}")
    assert status == 200 and hashlib.sha256(body).hexdigest() == want
