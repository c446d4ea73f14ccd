"""Per-request trace replay: each request follows its own recorded request's routing.

Request r of a node replays rows `off[r]:off[r+1]` of the node's stream (wrapping around at
the stream's end): the first half of those rows feed the prompt's prefill, the rest one
decode step each (each part wraps within itself when a prompt or a generation is longer).
Cursors are per request and per layer, so concurrent requests never share one; a model
thread binds its request with `with replay.request():`; a batched forward binds several
requests' cursors at once (`bind`), each taking its equal share of the pass's rows in order.
Expert ids are mapped onto the model
as `RoutingTrace` maps them (modulo the model's expert count, layer modulo the trace's).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from edgemoe.model.routing import RoutingTrace


class _Cursor:
    """One request's rows: prefill part [start, mid), decode part [mid, stop)."""

    def __init__(self, index: int, start: int, stop: int) -> None:
        self.index = index
        half = (stop - start) // 2
        self.start, self.mid, self.stop = start, start + max(half, 1), stop
        if self.mid >= self.stop:  # a one-token request: both parts are that token
            self.mid = self.stop = start + 1
            self.start = start
        self.prefilled: set[int] = set()
        self.decoded: dict[int, int] = {}

    def rows(self, layer: int, num_tokens: int) -> np.ndarray:
        if layer not in self.prefilled:
            self.prefilled.add(layer)
            part = self.mid - self.start
            return self.start + np.arange(num_tokens) % part
        done = self.decoded.get(layer, 0)
        self.decoded[layer] = done + num_tokens
        lo, hi = (self.mid, self.stop) if self.stop > self.mid else (self.start, self.mid)
        return lo + (done + np.arange(num_tokens)) % (hi - lo)


class RequestReplay:
    """Drop-in for `RoutingTrace` on the model (same `route`), one cursor per request."""

    def __init__(self, trace: RoutingTrace, req_offsets: np.ndarray) -> None:
        off = np.asarray(req_offsets, dtype=np.int64)
        if off.ndim != 1 or len(off) < 2 or off[0] != 0 or off[-1] != trace.ids.shape[0]:
            raise ValueError(f"request offsets must rise from 0 to {trace.ids.shape[0]}")
        if np.any(np.diff(off) <= 0):
            raise ValueError("every request needs at least one token")
        self.trace = trace
        self.offsets = off
        self._counter = itertools.count()
        self._local = threading.local()

    @property
    def num_requests(self) -> int:
        return len(self.offsets) - 1

    def rows_of(self, index: int) -> tuple[int, int]:
        """Trace rows [start, stop) that request `index` (0, 1, ... as served) replays."""
        r = index % self.num_requests
        return int(self.offsets[r]), int(self.offsets[r + 1])

    def open(self) -> _Cursor:
        """The next request's cursor (requests are numbered in the order they start)."""
        index = next(self._counter)
        return _Cursor(index, *self.rows_of(index))

    @contextlib.contextmanager
    def bind(self, cursors: Sequence[_Cursor]) -> Iterator[None]:
        """Route the calling thread's forwards by these requests' rows, in this order."""
        previous = getattr(self._local, "cursors", None)
        self._local.cursors = list(cursors)
        try:
            yield
        finally:
            self._local.cursors = previous

    @contextlib.contextmanager
    def request(self) -> Iterator[int]:
        """Bind the calling thread to the next request's rows for the duration."""
        cursor = self.open()
        with self.bind([cursor]):
            yield cursor.index

    def route(
        self, layer: int, num_tokens: int, *, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cursors: list[_Cursor] | None = getattr(self._local, "cursors", None)
        if not cursors:  # a forward outside any request (warm-up): the shared cursor
            return self.trace.route(layer, num_tokens, device=device, dtype=dtype)
        if num_tokens % len(cursors):
            raise ValueError(f"{num_tokens} rows do not split over {len(cursors)} requests")
        share = num_tokens // len(cursors)
        rows = np.concatenate([cursor.rows(layer, share) for cursor in cursors])
        trace_layer = layer % self.trace.ids.shape[1]
        ids = torch.from_numpy(self.trace.ids[rows, trace_layer]).to(device)
        weights = torch.from_numpy(self.trace.weights[rows, trace_layer])
        return ids, weights.to(device=device, dtype=dtype)
