"""`ActivationRecorder`: which experts this node's own requests select (numpy only).

Counts decay exponentially with a half-life (lazily, when read or updated), the co-activation
sample is a bounded reservoir (Algorithm R, seeded) of recent (token, layer) top-k sets, and
the request rate is an exponentially weighted event rate with the same half-life.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import numpy as np

from edgemoe.stats.snapshot import ActivationSnapshot

# Records queued before they are counted. A decode step records every MoE layer (26 for
# DeepSeek-V2-Lite), and numpy's per-call costs, paid per record, were ~5% of a decode step on
# the model thread; queued, they are counted together when a snapshot is taken (each gossip
# round) or when this many wait, a bounded memory (top-k ids of a few steps' rows each).
FOLD_EVERY = 1024


class ActivationRecorder:
    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int,
        half_life_s: float = 300.0,
        reservoir: int = 4096,
        clock: Callable[[], float] = time.monotonic,
        seed: int = 0,
    ) -> None:
        if half_life_s <= 0 or reservoir < 0:
            raise ValueError("half_life_s must be > 0 and reservoir >= 0")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.top_k = top_k
        self.half_life_s = half_life_s
        self._rate = math.log(2.0) / half_life_s
        self._clock = clock
        self._counts = np.zeros((num_layers, num_experts), dtype=np.float64)
        self._requests = 0.0  # decayed request count
        self._last = clock()
        self._capacity = reservoir
        self._res_layers = np.zeros(reservoir, dtype=np.int64)
        self._res_sets = np.zeros((reservoir, top_k), dtype=np.int64)
        self._seen = 0
        self._version = 0
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        # records not yet counted: (time, layer, ids [N, K])
        self._pending: list[tuple[float, int, np.ndarray]] = []

    def _decay(self) -> None:
        now = self._clock()
        dt = max(0.0, now - self._last)
        if dt > 0:
            factor = math.exp(-self._rate * dt)
            self._counts *= factor
            self._requests *= factor
            self._last = now

    def record(self, layer: int, topk_ids: np.ndarray) -> None:
        """Count one layer's routing of N tokens: topk_ids int [N, K] (negative ids ignored).

        Called by the model thread for every layer of every step, so it only queues a copy of
        the ids with their time; `_fold` counts them (see `FOLD_EVERY`)."""
        ids = np.array(topk_ids, dtype=np.int64)
        if ids.ndim != 2:
            raise ValueError(f"topk_ids must be [N, K], got shape {ids.shape}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        now = self._clock()
        with self._lock:
            self._pending.append((now, layer, ids))
            if len(self._pending) >= FOLD_EVERY:
                self._fold()

    def _fold(self) -> None:
        """Decay to now, then count the queued records in one pass of array operations: each
        id weighted by the decay since its record's time (what decaying at every record would
        give), and their rows offered to the reservoir in the order they were recorded."""
        self._decay()
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        ages = self._last - np.array([t for t, _, _ in pending])
        sizes = [ids.size for _, _, ids in pending]
        flat = np.concatenate([ids.ravel() for _, _, ids in pending])
        layers = np.repeat([layer for _, layer, _ in pending], sizes)
        weights = np.repeat(np.exp(-self._rate * np.maximum(ages, 0.0)), sizes)
        ok = (flat >= 0) & (flat < self.num_experts)
        cells = layers[ok] * self.num_experts + flat[ok]
        self._counts += np.bincount(
            cells, weights=weights[ok], minlength=self._counts.size
        ).reshape(self._counts.shape)
        if self._capacity:
            self._sample(pending)

    def _sample(self, pending: list[tuple[float, int, np.ndarray]]) -> None:
        """Algorithm R over the queued rows: row i of all seen so far takes slot i while the
        reservoir fills, then a uniform slot in [0, i] (kept when it is < capacity); a slot
        drawn twice keeps the later row."""
        k = self.top_k
        if all(ids.shape[1] == k for _, _, ids in pending):  # the model's own top-k: as they are
            rows = np.concatenate([ids for _, _, ids in pending])
        else:  # cut to k, or padded with -1 (np.pad per record cost ~10 us each)
            rows = np.full((sum(len(ids) for _, _, ids in pending), k), -1, dtype=np.int64)
            at = 0
            for _, _, ids in pending:
                rows[at : at + len(ids), : min(k, ids.shape[1])] = ids[:, :k]
                at += len(ids)
        row_layers = np.repeat([layer for _, layer, _ in pending], [len(i) for _, _, i in pending])
        index = self._seen + np.arange(len(rows))
        slots = index.copy()
        late = index >= self._capacity
        if late.any():
            slots[late] = self._rng.integers(0, index[late] + 1)
        self._seen += len(rows)
        kept = np.flatnonzero(slots < self._capacity)
        # the last row drawn for each slot: np.unique's first index over the reversed order
        taken, last = np.unique(slots[kept][::-1], return_index=True)
        source = kept[::-1][last]
        self._res_layers[taken] = row_layers[source]
        self._res_sets[taken] = rows[source]

    def note_request(self) -> None:
        with self._lock:
            self._decay()
            self._requests += 1.0

    def snapshot(self, origin: str) -> ActivationSnapshot:
        """The current statistics, with a version one higher than the previous snapshot's."""
        with self._lock:
            self._fold()
            self._version += 1
            n = min(self._seen, self._capacity)
            return ActivationSnapshot(
                origin=origin,
                version=self._version,
                counts=self._counts.copy(),
                coact_layers=self._res_layers[:n].copy(),
                coact_sets=self._res_sets[:n].copy(),
                request_rate=self._requests * self._rate,
            )
