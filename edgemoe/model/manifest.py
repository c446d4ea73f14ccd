"""`manifest.json` of a shard directory: what the shards are and how to check them."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import blake3

from edgemoe.model.errors import ModelError

MANIFEST_NAME = "manifest.json"
DENSE_NAME = "dense.safetensors"
_CHUNK = 1 << 20
FORMAT_VERSION = 1


def hash_into(digest: Any, path: Path) -> Any:
    """Feed `path`'s bytes to `digest` (any hashlib-style hasher); returns it."""
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest


def sha256_file(path: Path) -> str:
    return str(hash_into(hashlib.sha256(), path).hexdigest())


class EntryDigests:
    """The digests of a manifest file entry, fed as the bytes go by: sha256 (the file's
    identity, in the model fingerprint) and BLAKE3 (its check, `FileCheck`)."""

    def __init__(self) -> None:
        self.sha256, self.blake3 = hashlib.sha256(), blake3.blake3()

    def update(self, data: Any) -> None:
        self.sha256.update(data)
        self.blake3.update(data)

    def entry(self, size: int) -> dict[str, Any]:
        return {"bytes": size, "sha256": self.sha256.hexdigest(),
                "blake3": self.blake3.hexdigest()}  # fmt: skip


def describe_file(path: Path) -> dict[str, Any]:
    """A manifest file entry: size, sha256 and BLAKE3 (see `EntryDigests`)."""
    return hash_into(EntryDigests(), path).entry(path.stat().st_size)


@dataclass(frozen=True)
class FileCheck:
    """How a file's bytes are checked against its manifest entry: BLAKE3 where the entry has
    it (`edgemoe shard` writes both), else sha256 (manifests written before). On one core of
    the development box BLAKE3 hashes 6.8 GB/s against sha256's 1.6: a verified transfer or a
    start that hashes every shard spends a quarter of the CPU on it. Both are cryptographic
    hashes of a manifest that arrives signed, so a file that matches is the file."""

    name: str  # "blake3" or "sha256"
    expected: str  # hex digest

    @classmethod
    def of(cls, info: Mapping[str, Any]) -> FileCheck:
        if "blake3" in info:
            return cls("blake3", str(info["blake3"]))
        return cls("sha256", str(info["sha256"]))

    def hasher(self) -> Any:
        return blake3.blake3() if self.name == "blake3" else hashlib.sha256()

    def matches(self, hexdigest: str) -> bool:
        return hexdigest == self.expected

    def file_matches(self, path: Path) -> bool:
        return self.matches(hash_into(self.hasher(), path).hexdigest())


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
