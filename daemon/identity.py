"""The node's identity: a random id created once and kept in the state directory."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

_ID_FILE = "node_id"
_ID_RE = re.compile(r"[0-9a-f]{16}")


def load_or_create_node_id(state_dir: Path) -> str:
    """Read ``state_dir/node_id``; create it (atomically, synced) on first start."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / _ID_FILE
    if path.exists():
        text = path.read_text().strip()
        if not _ID_RE.fullmatch(text):
            raise ValueError(f"{path}: not a node id (16 hex digits); remove it to get a new one")
        return text
    node_id = secrets.token_hex(8)
    tmp = path.with_name(f".{_ID_FILE}.tmp")
    with tmp.open("w") as fh:
        fh.write(node_id + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return node_id
