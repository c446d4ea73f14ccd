"""`manifest.json` of a shard directory: what the shards are and how to check them."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgemoe.model.errors import ModelError

MANIFEST_NAME = "manifest.json"
DENSE_NAME = "dense.safetensors"
_CHUNK = 1 << 20
FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Manifest:
    """Description of a sharded MoE checkpoint (the shard-directory contract)."""

    architecture: str
    config: dict[str, Any]
    dtype: str
    moe_layers: list[int]
    num_experts: int
    top_k: int
    hidden_size: int
    expert_bytes: int
    files: dict[str, dict[str, Any]]
    fingerprint: str
    expert_params: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    # "mxfp4" | "fp8": expert shards hold the quantized tensors and scales of the library's
    # quantized experts module (config["quantization_config"] has the details); None: plain.
    quantization: str | None = None
    format_version: int = FORMAT_VERSION

    @property
    def num_layers(self) -> int:
        """Number of MoE layers (the `layer` index space of experts)."""
        return len(self.moe_layers)

    @staticmethod
    def expert_path(layer: int, expert: int) -> str:
        """Relative path of one expert's shard file."""
        return f"experts/L{layer}/E{expert}.safetensors"

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelError(f"{path}: no manifest (not a shard directory?)") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path}: unreadable manifest: {exc}") from None
        try:
            return cls(**data)
        except TypeError as exc:
            raise ModelError(f"{path}: malformed manifest: {exc}") from None

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write atomically (temp file + rename), so a crash never leaves half a manifest."""
        write_text_atomic(Path(directory) / MANIFEST_NAME, json.dumps(asdict(self), indent=1))


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
