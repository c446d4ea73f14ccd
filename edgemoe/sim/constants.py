"""The simulator's inputs: compute and messaging costs, measured, never the objective's.

`edgemoe bench calibrate` measures them on this machine with the model runtime (a
DeepSeek-V2-Lite-shaped layer: hidden 2048, top-6, two shared experts) and writes the JSON
file `load` reads; `bench placement --constants FILE` and the testbed pass it on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SimConstants:
    """Seconds at compute speed 1.0. Defaults: `edgemoe bench calibrate` (DeepSeek-V2-Lite
    layer shapes, float32, torch CPU) on the shared 2-core development box, 2026-11-30,
    rounded: a slow device (about 4 s per decode step of 26 layers), so compute dominates
    a fast network; measure yours and pass the file.

    A batch of work items on one server costs
    ``dense_fixed_s`` per distinct layer + ``dense_token_s`` per token (dense part: attention,
    router, shared experts) + ``expert_fixed_s`` per distinct (layer, expert) + ``expert_row_s``
    per (token, expert) row + ``message_s`` per message received. The fixed parts are the
    weights read once per batch: what batching concurrent decode steps saves.

    A remote call also costs its caller ``caller_message_s`` of compute (encoding, signing and
    sealing the request, then checking, opening and decoding its answer), charged when the
    answer is back: the testbed's daemons spend about as much per call made as per call
    served (a fit of their CPU seconds: 0.9-1.2 ms made, 1.3-1.4 ms served). Each end also
    pays ``byte_s`` per byte of the request and of the answer it handles.
    """

    dense_fixed_s: float = 5.5e-2
    dense_token_s: float = 2.1e-2
    expert_fixed_s: float = 1.05e-2
    expert_row_s: float = 2.7e-3
    message_s: float = 2.7e-4  # half of calibrate's 0.54 ms signed round trip: holder's side
    caller_message_s: float = 2.7e-4  # and the caller's
    # compute per byte of hidden states a call moves, at each end (the holder reads the
    # request and writes the answer, the caller writes one and reads the other): 0 unless
    # measured; the testbed fits it to its daemons' CPU beside the per-call costs
    byte_s: float = 0.0
    batching: bool = True  # a server runs everything waiting in its queue as one batch
    prompt_fraction: float = 0.5  # share of a request's tokens that form its prompt
    source: str = "defaults"  # where the figures came from (a calibration file, a flag)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and v < 0:
                raise ValueError(f"{f.name} must not be negative, got {v}")
        if not 0.0 < self.prompt_fraction < 1.0:
            raise ValueError(f"prompt_fraction must be in (0, 1), got {self.prompt_fraction}")

    def with_call_cost(self, seconds: float, source: str | None = None) -> SimConstants:
        """These constants with one call's measured round-trip work split evenly between its
        two ends (`message_s` at the holder, `caller_message_s` at the caller)."""
        return replace(self, message_s=seconds / 2, caller_message_s=seconds / 2,
                       source=self.source if source is None else source)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def load(path: str | Path) -> SimConstants:
    """Constants from a calibration file; unknown keys are an error (a typo is not ignored)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read constants from {path}: {exc}") from None
    doc = doc.get("constants", doc) if isinstance(doc, dict) else doc
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object of constants")
    known = {f.name for f in fields(SimConstants)}
    bad = sorted(set(doc) - known)
    if bad:
        raise ValueError(f"{path}: unknown constants {bad}; known: {sorted(known)}")
    try:
        src = doc.get("source")
        return replace(SimConstants(), **{**doc, "source": str(path) if src in (None, "defaults")
                                          else src})
    except TypeError as exc:
        raise ValueError(f"{path}: {exc}") from None
