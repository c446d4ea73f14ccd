"""`ActivationRecorder`: which experts this node's own requests select (numpy only).

Counts decay exponentially with a half-life (lazily, on each update), the co-activation
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

    def _decay(self) -> None:
        now = self._clock()
        dt = max(0.0, now - self._last)
        if dt > 0:
            factor = math.exp(-self._rate * dt)
            self._counts *= factor
            self._requests *= factor
            self._last = now

    def record(self, layer: int, topk_ids: np.ndarray) -> None:
        """Count one layer's routing of N tokens: topk_ids int [N, K] (negative ids ignored)."""
        ids = np.asarray(topk_ids, dtype=np.int64)
        if ids.ndim != 2:
            raise ValueError(f"topk_ids must be [N, K], got shape {ids.shape}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        valid = ids[(ids >= 0) & (ids < self.num_experts)]
        with self._lock:
            self._decay()
            self._counts[layer] += np.bincount(valid, minlength=self.num_experts)
            self._sample(layer, ids)

    def _sample(self, layer: int, ids: np.ndarray) -> None:
        if self._capacity == 0:
            return
        k = min(self.top_k, ids.shape[1])
        for row in ids:
            if self._seen < self._capacity:
                slot = self._seen
            else:
                slot = int(self._rng.integers(0, self._seen + 1))
            self._seen += 1
            if slot < self._capacity:
                self._res_layers[slot] = layer
                self._res_sets[slot, :] = -1
                self._res_sets[slot, :k] = row[:k]

    def note_request(self) -> None:
        with self._lock:
            self._decay()
            self._requests += 1.0

    def snapshot(self, origin: str) -> ActivationSnapshot:
        """The current statistics, with a version one higher than the previous snapshot's."""
        with self._lock:
            self._decay()
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
