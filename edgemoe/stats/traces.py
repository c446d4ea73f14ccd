"""Routing traces: one stream per task of (token, layer) top-k expert sets (numpy only).

Format (see shared/traces/README.md): `<stream>_expert_ids` uint8/int [T, L, K],
`<stream>_req_offsets` int64 [R+1] (request r is tokens off[r]:off[r+1]), optional
`<stream>_weights` float16 [T, L, K].
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_TRACE = "esft_deepseek_v2_lite_4tasks_routing.npz"


class TraceError(ValueError):
    """A trace file or stream that cannot be used; the message says why."""


@dataclass(frozen=True)
class Stream:
    """One stream: expert ids int [T, L, K] and request offsets int [R+1]."""

    name: str
    expert_ids: np.ndarray
    req_offsets: np.ndarray

    @property
    def num_requests(self) -> int:
        return len(self.req_offsets) - 1

    def requests(self, start: int, stop: int) -> Stream:
        """Requests start..stop-1 as a stream of their own."""
        off = self.req_offsets[start : stop + 1]
        ids = self.expert_ids[off[0] : off[-1]]
        return Stream(self.name, ids, off - off[0])

    def split(self, fraction: float = 0.5) -> tuple[Stream, Stream]:
        """(profiling, test): the first `fraction` of requests (at least one each) and the rest."""
        if self.num_requests < 2:
            raise TraceError(f"stream {self.name!r} has {self.num_requests} requests; "
                             "need 2 to split into profiling and test windows")
        k = min(max(round(self.num_requests * fraction), 1), self.num_requests - 1)
        return self.requests(0, k), self.requests(k, self.num_requests)


def default_trace_path() -> Path:
    """EDGEMOE_TRACES (a file or a folder) or ../shared/traces/ beside the repository root."""
    env = os.environ.get("EDGEMOE_TRACES")
    if env:
        p = Path(env)
        return p / DEFAULT_TRACE if p.is_dir() else p
    root = Path(__file__).resolve().parents[2]
    return root.parent / "shared" / "traces" / DEFAULT_TRACE


def stream_names(path: str | Path) -> list[str]:
    """Names of the streams an npz holds."""
    with np.load(path) as z:
        return sorted(k[: -len("_expert_ids")] for k in z.files if k.endswith("_expert_ids"))


def load_stream(path: str | Path, name: str) -> Stream:
    """Load and check one stream of an npz trace."""
    p = Path(path)
    if not p.is_file():
        raise TraceError(f"trace file not found: {p}")
    with np.load(p) as z:
        if f"{name}_expert_ids" not in z.files or f"{name}_req_offsets" not in z.files:
            raise TraceError(f"stream {name!r} not in {p.name}; it has: "
                             f"{', '.join(stream_names(p))}")
        ids = z[f"{name}_expert_ids"].astype(np.int64)
        off = z[f"{name}_req_offsets"].astype(np.int64)
    if ids.ndim != 3:
        raise TraceError(f"{name}_expert_ids must be [T, L, K], got shape {ids.shape}")
    if off.ndim != 1 or len(off) < 2 or off[0] != 0 or off[-1] != len(ids) or np.any(
            np.diff(off) <= 0):
        raise TraceError(f"{name}_req_offsets must rise from 0 to {len(ids)}")
    return Stream(name, ids, off)


_ESFT_FILE = re.compile(r"expert_weights_(\d+)\.txt$")


def _parse_esft_line(text: str, top_k: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One ESFT line: tab-separated expert ids (T*k), an empty field, then T*k gate weights."""
    fields = text.rstrip("\n").split("\t")
    try:
        cut = fields.index("")
    except ValueError:
        raise TraceError(f"{where}: no empty field between expert ids and weights") from None
    try:
        ids = np.asarray([int(x) for x in fields[:cut]], dtype=np.int64)
        ws = np.asarray([float(x) for x in fields[cut + 1 :]], dtype=np.float32)
    except ValueError as exc:
        raise TraceError(f"{where}: {exc}") from None
    if len(ids) % top_k or len(ids) != len(ws):
        raise TraceError(f"{where}: {len(ids)} ids and {len(ws)} weights are not tokens x {top_k}")
    return ids.reshape(-1, top_k), ws.reshape(-1, top_k)


def import_esft(task_dirs: dict[str, Path], out: Path, top_k: int = 6) -> dict[str, int]:
    """Pack ESFT `results/expert_scores/<task>/expert_weights_<layer>.txt` into one npz.

    In ESFT's layout each file is one MoE layer (numbered from 1) and line i of every file is
    sample i; a line holds the sample's T*k expert ids, an empty field, then T*k weights.
    Returns tokens per task.
    """
    arrays: dict[str, np.ndarray] = {}
    sizes: dict[str, int] = {}
    for task, folder in task_dirs.items():
        folder = Path(folder)
        if not folder.is_dir():
            raise TraceError(f"not a folder: {folder}")
        files = {int(m.group(1)): f for f in folder.iterdir() if (m := _ESFT_FILE.search(f.name))}
        if not files:
            raise TraceError(f"no expert_weights_<layer>.txt files in {folder}")
        layers = sorted(files)
        if layers != list(range(layers[0], layers[0] + len(layers))):
            raise TraceError(f"{folder}: layer files are not consecutive: {layers}")
        per_layer = [files[n].read_text().splitlines() for n in layers]
        n_samples = {len(lines) for lines in per_layer}
        if len(n_samples) != 1:
            raise TraceError(f"{folder}: layer files hold different numbers of samples")
        ids_all: list[np.ndarray] = []
        w_all: list[np.ndarray] = []
        offsets = [0]
        for i in range(n_samples.pop()):
            parsed = [_parse_esft_line(lines[i], top_k, f"{files[n].name}:{i + 1}")
                      for n, lines in zip(layers, per_layer, strict=True)]
            if len({p[0].shape[0] for p in parsed}) != 1:
                raise TraceError(f"{folder}: sample {i + 1} has different token counts per layer")
            ids_all.append(np.stack([p[0] for p in parsed], axis=1))
            w_all.append(np.stack([p[1] for p in parsed], axis=1))
            offsets.append(offsets[-1] + len(ids_all[-1]))
        ids_cat = np.concatenate(ids_all)
        if ids_cat.max() > 255 or ids_cat.min() < 0:
            raise TraceError(f"task {task}: expert ids outside 0..255")
        arrays[f"{task}_expert_ids"] = ids_cat.astype(np.uint8)
        arrays[f"{task}_weights"] = np.concatenate(w_all).astype(np.float16)
        arrays[f"{task}_req_offsets"] = np.asarray(offsets, dtype=np.int64)
        sizes[task] = len(ids_cat)
    np.savez_compressed(out, **arrays)
    return sizes
