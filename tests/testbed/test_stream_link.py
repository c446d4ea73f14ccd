"""Shard streaming across a shaped link between two namespaces (`bench rpc --link-mbps`)."""

from __future__ import annotations

from pathlib import Path

from edgemoe.daemon.testbed import testbed_namespaces as namespaces_left
from edgemoe.daemon.testbed.stream import stream_over_link
from edgemoe.model.manifest import Manifest
from edgemoe.model.shard import shard_checkpoint
from edgemoe.model.tiny import write_tiny_model

from .conftest import root_state


def test_streaming_over_a_link_fetches_every_file_both_ways_and_leaves_nothing(
    testbed_ok: None, tmp_path: Path
) -> None:
    model = write_tiny_model("mixtral", tmp_path / "model", seed=0)
    manifest, _ = shard_checkpoint(model, tmp_path / "shards")
    before = root_state()
    figures = stream_over_link(tmp_path / "shards", tmp_path / "work", mbps=200, rounds=2)
    assert figures["files"] == len(manifest.files)
    assert figures["bytes"] == sum(int(i["bytes"]) for i in Manifest.load(tmp_path / "shards")
                                   .files.values())  # fmt: skip
    assert figures["edgemoe_mb_per_s"] > 0 and figures["plain_http_mb_per_s"] > 0
    assert len(figures["ratio_per_round"]) == 2
    assert figures["link"] == {"mbps": 200, "delay_ms": 0.0}
    assert namespaces_left() == []
    assert root_state() == before
