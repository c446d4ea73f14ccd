"""`ActivationSnapshot`: one node's published activation statistics (numpy only, no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

WIRE_VERSION = 1


def _pack(array: np.ndarray) -> dict[str, Any]:
    data = np.ascontiguousarray(array)
    return {"dtype": data.dtype.str, "shape": list(data.shape), "data": data.tobytes()}


def _unpack(d: dict[str, Any], dtype: str) -> np.ndarray:
    if np.dtype(d["dtype"]) != np.dtype(dtype):
        raise ValueError(f"array dtype {d['dtype']} where {dtype} was expected")
    shape = tuple(int(x) for x in d["shape"])
    array = np.frombuffer(bytes(d["data"]), dtype=np.dtype(dtype))
    if array.size != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"array of {array.size} values does not fit shape {shape}")
    return array.reshape(shape).copy()


@dataclass(frozen=True)
class ActivationSnapshot:
    """Decayed per-(layer, expert) counts, a co-activation reservoir and the request rate."""

    origin: str
    version: int
    counts: np.ndarray  # float64 [L, E]
    coact_layers: np.ndarray  # int64 [R]
    coact_sets: np.ndarray  # int64 [R, K]
    request_rate: float

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-able dict (arrays as little-endian bytes with dtype and shape)."""
        return {
            "wire": WIRE_VERSION,
            "origin": self.origin,
            "version": int(self.version),
            "counts": _pack(self.counts.astype("<f8")),
            "coact_layers": _pack(self.coact_layers.astype("<i8")),
            "coact_sets": _pack(self.coact_sets.astype("<i8")),
            "request_rate": float(self.request_rate),
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> ActivationSnapshot:
        """Inverse of to_wire; raises ValueError on anything malformed."""
        try:
            if int(d["wire"]) != WIRE_VERSION:
                raise ValueError(f"unsupported snapshot wire version {d['wire']}")
            counts = _unpack(d["counts"], "<f8")
            layers = _unpack(d["coact_layers"], "<i8")
            sets = _unpack(d["coact_sets"], "<i8")
            snap = cls(
                origin=str(d["origin"]),
                version=int(d["version"]),
                counts=counts,
                coact_layers=layers,
                coact_sets=sets,
                request_rate=float(d["request_rate"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed snapshot: {exc!r}") from None
        if counts.ndim != 2 or layers.ndim != 1 or sets.ndim != 2 or len(layers) != len(sets):
            raise ValueError("malformed snapshot: inconsistent array shapes")
        return snap
