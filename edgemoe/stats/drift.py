"""How far the activation statistics moved since a placement was decided (numpy only).

A placement is computed from each node's per-(layer, expert) counts; it goes stale when a
node's requests start selecting other experts, not when they merely get more or fewer (the
counts decay, and a placement depends on proportions). So the measure compares normalised
per-layer distributions: the total-variation distance of one layer is the share of that
node's expert selections that now land on different experts, in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def layer_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Total-variation distance per layer between two [L, E] count arrays; NaN for a layer
    where neither side has counts (no evidence either way), 1 where only one side has."""
    a = np.maximum(np.asarray(a, dtype=np.float64), 0.0)
    b = np.maximum(np.asarray(b, dtype=np.float64), 0.0)
    sa, sb = a.sum(axis=1), b.sum(axis=1)
    both = (sa > 0) & (sb > 0)
    pa = np.divide(a, sa[:, None], out=np.zeros_like(a), where=sa[:, None] > 0)
    pb = np.divide(b, sb[:, None], out=np.zeros_like(b), where=sb[:, None] > 0)
    tv = np.minimum(0.5 * np.abs(pa - pb).sum(axis=1), 1.0)
    out = np.where(both, tv, 1.0)
    return np.where((sa > 0) | (sb > 0), out, np.nan)


def activation_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-layer total-variation distance between two nodes' counts: 0 for the same
    proportions, 1 for disjoint experts in every layer; symmetric. Layers without counts on
    either side are left out; arrays of different shapes (another model) are 1."""
    if np.shape(a) != np.shape(b):
        return 1.0
    d = layer_distances(a, b)
    d = d[~np.isnan(d)]
    return float(d.mean()) if d.size else 0.0


def statistics_drift(current: Mapping[str, np.ndarray], used: Mapping[str, np.ndarray]) -> float:
    """Drift of the cluster: the largest `activation_distance` of any node's current counts
    from those the placement used. The max, not a mean, because one box whose users changed
    task is exactly what should move experts. A node the placement had no counts for counts
    as fully drifted (1) once it has some; a node without counts now (just restarted, or
    idle so long its counts decayed to zero) counts as no drift: no evidence to place on."""
    worst = 0.0
    for origin, counts in current.items():
        if not np.any(np.asarray(counts) > 0):
            continue
        before = used.get(origin)
        if before is None:
            return 1.0
        worst = max(worst, activation_distance(counts, before))
    return worst
