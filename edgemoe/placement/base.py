"""The strategy interface and helpers shared by several strategies."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from edgemoe.placement.problem import Placement, Problem


class Strategy(Protocol):
    """A placement strategy: deterministic for the same problem."""

    name: str

    def place(self, problem: Problem) -> Placement: ...


def proportional_quotas(total: int, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """int [S]: `total` split in proportion to `weights` (largest remainder), none over `caps`."""
    w = np.asarray(weights, dtype=np.float64)
    caps = np.asarray(caps, dtype=np.int64)
    if total > int(caps.sum()):
        raise ValueError(f"cannot place {total} items in {int(caps.sum())} slots")
    quota = np.zeros(len(w), dtype=np.int64)
    left = total
    free = caps > 0
    while left > 0:
        ww = np.where(free, w, 0.0)
        if ww.sum() <= 0:
            ww = free.astype(np.float64)
        share = ww / ww.sum() * left
        add = np.minimum(np.floor(share).astype(np.int64), caps - quota)
        rem = share - np.floor(share)
        room = (caps - quota - add) > 0
        extra = left - int(add.sum())
        order = np.lexsort((np.arange(len(w)), -rem))
        for i in order:
            if extra <= 0:
                break
            if room[i] and rem[i] > 0:
                add[i] += 1
                extra -= 1
        if int(add.sum()) == 0:  # only zero remainders left: give one to the first with room
            i = int(np.argmax(room))
            add[i] = 1
        quota += add
        left -= int(add.sum())
        free = quota < caps
    return quota


def layer_entropy(counts: np.ndarray) -> np.ndarray:
    """float [..., L]: Shannon entropy (nats) of each layer's activation distribution."""
    tot = counts.sum(-1, keepdims=True)
    p = np.divide(counts, tot, out=np.zeros_like(counts, dtype=np.float64), where=tot > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    return h
