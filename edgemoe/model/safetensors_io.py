"""Streaming safetensors writer: header first, then each tensor as it is read.

`safetensors.torch.save_file` needs every tensor in memory at once (and serialises into one
buffer); the dense part of a big model is written here tensor by tensor instead, hashing as
it goes, so the sharder holds at most one tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from edgemoe.model.manifest import EntryDigests

_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class PendingTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def in_memory(tensors: dict[str, torch.Tensor]) -> list[PendingTensor]:
    """Tensors already loaded, as pending entries for write_streaming."""
    return [
        PendingTensor(name, t.dtype, tuple(t.shape), lambda t=t: t) for name, t in tensors.items()
    ]


def write_streaming(path: Path, tensors: Sequence[PendingTensor]) -> dict[str, int | str]:
    """Write a safetensors file loading one tensor at a time; returns its manifest entry
    ({bytes, sha256, blake3}: `manifest.EntryDigests`)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    ordered = sorted(tensors, key=lambda t: t.name)
    for t in ordered:
        header[t.name] = {
            "dtype": _NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    digests = EntryDigests()
    with path.open("wb") as fh:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            fh.write(chunk)
            digests.update(chunk)
        for t in ordered:
            tensor = t.load().contiguous()
            if tensor.dtype != t.dtype or tuple(tensor.shape) != t.shape:
                raise ValueError(f"{path}: tensor {t.name} changed while writing")
            if tensor.numel():
                data = tensor.reshape(-1).view(torch.uint8).numpy()  # a view: no copy
                fh.write(data)
                digests.update(data)
                del data
            del tensor
        fh.flush()
        os.fsync(fh.fileno())
    return digests.entry(path.stat().st_size)
