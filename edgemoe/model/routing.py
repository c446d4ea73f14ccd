"""Trace replay: a recorded routing (top-k ids per token and layer) overrides the router."""

from __future__ import annotations

import threading

import numpy as np
import torch


class RoutingTrace:
    """Feeds top-k expert ids (and weights) per MoE layer, token after token, from a trace.

    ids int [T, L_trace, K_trace] (tokens x layers x slots). Mapped onto a model with
    `num_experts` experts and `top_k` slots: expert id modulo num_experts, model layer l reads
    trace layer l mod L_trace, first top_k slots (duplicates after the modulo are replaced by
    the next unused id, so a token never picks the same expert twice). Weights are the
    trace's (renormalised) or uniform. Each layer has its own cursor, wrapping around.
    """

    def __init__(
        self,
        ids: np.ndarray,
        num_experts: int,
        top_k: int,
        weights: np.ndarray | None = None,
    ) -> None:
        ids = np.asarray(ids)
        if ids.ndim != 3 or ids.shape[2] < top_k or ids.shape[0] == 0:
            raise ValueError(f"trace ids must be [tokens, layers, >= {top_k}], got {ids.shape}")
        if top_k > num_experts:
            raise ValueError("top_k exceeds num_experts")
        self.ids = _dedupe(ids[:, :, :top_k].astype(np.int64) % num_experts, num_experts)
        if weights is None:
            w = np.full(self.ids.shape, 1.0 / top_k)
        else:
            w = np.asarray(weights, dtype=np.float64)[:, :, :top_k]
            w = w / np.maximum(w.sum(axis=2, keepdims=True), 1e-12)
        self.weights = w
        self.num_experts = num_experts
        self.top_k = top_k
        self._cursor: dict[int, int] = {}
        self._lock = threading.Lock()

    def route(
        self, layer: int, num_tokens: int, *, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next `num_tokens` routings of `layer`: (ids int64 [N, K], weights [N, K])."""
        with self._lock:
            start = self._cursor.get(layer, 0)
            self._cursor[layer] = (start + num_tokens) % self.ids.shape[0]
        rows = (start + np.arange(num_tokens)) % self.ids.shape[0]
        trace_layer = layer % self.ids.shape[1]
        ids = torch.from_numpy(self.ids[rows, trace_layer]).to(device)
        weights = torch.from_numpy(self.weights[rows, trace_layer]).to(device=device, dtype=dtype)
        return ids, weights

    def reset(self) -> None:
        with self._lock:
            self._cursor.clear()


def _dedupe(ids: np.ndarray, num_experts: int) -> np.ndarray:
    out = ids.copy()
    for idx in np.ndindex(*out.shape[:2]):
        row = out[idx]
        seen: set[int] = set()
        for k in range(row.shape[0]):
            e = int(row[k])
            while e in seen:
                e = (e + 1) % num_experts
            row[k] = e
            seen.add(e)
    return out
