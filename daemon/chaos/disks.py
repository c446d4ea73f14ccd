"""Read a node's shard store off its disk for the checker: each shard file present, its
sha256 against the manifest's (a partial transfer's side files are not shards)."""

from __future__ import annotations

import json
from pathlib import Path

from edgemoe.daemon.chaos.checker import ShardHash
from edgemoe.model.manifest import sha256_file


def shard_hashes(node: int, root: Path) -> list[ShardHash]:
    """Every manifest file present under `root` (a daemon's store: its model dir or
    state_dir/model), hashed; [] when the node has no manifest yet."""
    manifest = root / "manifest.json"
    if not manifest.is_file():
        return []
    files = json.loads(manifest.read_text())["files"]
    return [ShardHash(node, rel, info["sha256"], sha256_file(root / rel))
            for rel, info in sorted(files.items()) if (root / rel).is_file()]  # fmt: skip
