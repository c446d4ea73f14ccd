"""Expert RPC: tensors on the wire, and the server side that computes held experts for peers.

`ExpertService` computes a small request on the event loop when it is alone (a thread hand-off
and the wake-up back cost more than the few milliseconds of the experts under load); larger
ones, and requests that arrive together or while others are computed, go to one worker thread
that groups them per layer into one call, while the loop keeps receiving. Tensors travel
without copies on a little-endian host: encoded as views of the tensor's memory, decoded as
tensors over the received bytes (`torch.frombuffer`).
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from edgemoe.daemon.wire import MAX_ROWS, WireError, decode_array, encode_array
from edgemoe.model.local import LocalExperts

# A request of at most this many (row, expert) pairs is computed on the event loop when the
# worker is idle: at hidden 512 that is ~1-2 ms of CPU, less than two thread wake-ups under load.
INLINE_PAIRS = 128
_TORCH_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.int64: "int64"}  # fmt: skip
_WIRE_TORCH = {name: dt for dt, name in _TORCH_NAMES.items()}
_LITTLE = sys.byteorder == "little"


def tensor_to_wire(t: torch.Tensor) -> dict[str, Any]:
    """{"dtype", "shape", "data"}; on a little-endian host "data" is a view of the tensor's
    memory (msgpack packs it as bin without an intermediate copy)."""
    t = t.detach().to("cpu").contiguous()
    if not _LITTLE:
        if t.dtype == torch.bfloat16:
            return encode_array(t.view(torch.int16).numpy().view(np.uint16), "bfloat16")
        return encode_array(t.numpy(), _TORCH_NAMES[t.dtype])
    raw = t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return {"dtype": _TORCH_NAMES[t.dtype], "shape": list(t.shape),
            "data": memoryview(raw.numpy()).cast("B")}  # fmt: skip


def tensor_from_wire(
    obj: Any, *, dtypes: tuple[str, ...], ndim: int, max_elements: int, name: str
) -> torch.Tensor:
    """A validated tensor; on a little-endian host it is a read-only view of the received
    bytes (callers only read it: every consumer copies into its own output)."""
    arr, dtype = decode_array(obj, dtypes=dtypes, ndim=ndim, max_elements=max_elements, name=name)
    if not _LITTLE:
        if dtype == "bfloat16":
            return torch.from_numpy(arr.astype(np.int16, copy=True)).view(torch.bfloat16)
        return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
    if arr.size == 0:
        return torch.empty(arr.shape, dtype=_WIRE_TORCH[dtype])
    with warnings.catch_warnings():  # the bytes are immutable: the tensor is never written
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(obj["data"], dtype=_WIRE_TORCH[dtype])
    return flat.view(arr.shape)


def _finite(t: torch.Tensor) -> bool:
    """No inf or nan in `t`; a few rows are checked in numpy (one call where torch's dispatch
    of isfinite+all costs tens of microseconds), bfloat16 and large tensors in torch."""
    if t.dtype != torch.bfloat16 and t.numel() <= 1 << 16:
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


@dataclass(frozen=True)
class ForwardRequest:
    layer: int
    hidden: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor


def parse_forward(
    body: Any, *, num_layers: int, num_experts: int, hidden_size: int, dtype: str
) -> ForwardRequest:
    """Validate a decoded /v1/experts/forward body; WireError (4xx) names what is wrong."""
    if not isinstance(body, dict):
        raise WireError("body must be a map {layer, hidden, expert_ids, weights}")
    layer = body.get("layer")
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < num_layers:
        raise WireError(f"layer must be an integer in 0..{num_layers - 1}", 404)
    hidden = tensor_from_wire(
        body.get("hidden"),
        dtypes=(dtype,),
        ndim=2,
        max_elements=MAX_ROWS * hidden_size,
        name="hidden",
    )
    rows = hidden.shape[0]
    if hidden.shape[1] != hidden_size:
        raise WireError(f"hidden: width {hidden.shape[1]} != model hidden size {hidden_size}")
    ids = tensor_from_wire(
        body.get("expert_ids"),
        dtypes=("int64",),
        ndim=2,
        max_elements=MAX_ROWS * 64,
        name="expert_ids",
    )
    weights = tensor_from_wire(
        body.get("weights"),
        dtypes=(dtype, "float32"),
        ndim=2,
        max_elements=MAX_ROWS * 64,
        name="weights",
    )
    if ids.shape[0] != rows or weights.shape != ids.shape:
        raise WireError(
            f"expert_ids {list(ids.shape)} and weights {list(weights.shape)} "
            f"must both be [{rows}, K]"
        )
    if ids.numel():
        low, high = (int(v) for v in torch.aminmax(ids))
        if low < -1 or high >= num_experts:
            raise WireError(f"expert_ids must be in -1..{num_experts - 1}", 404)
    if not (_finite(hidden) and _finite(weights)):
        raise WireError("hidden and weights must be finite")
    return ForwardRequest(layer, hidden, ids, weights)


@dataclass
class _Job:
    request: ForwardRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[torch.Tensor] = field(repr=False)


class ExpertService:
    """Computes forward requests on a worker thread, batching concurrent ones per layer."""

    def __init__(self, experts: LocalExperts, *, on_batch: Any = None) -> None:
        self.experts = experts
        self.on_batch = on_batch
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="expert-rpc", daemon=True)
        self._queued = 0  # jobs handed to the worker and not yet answered (event loop only)
        self._arrived = 0  # small requests deciding where to run (event loop only)
        self.batches = 0
        self.inline = 0  # requests computed on the event loop

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    async def forward(self, request: ForwardRequest) -> torch.Tensor:
        ids = request.expert_ids
        distinct = ids.reshape(-1).tolist() if ids.numel() <= INLINE_PAIRS else torch.unique(ids)
        wanted = {int(e) for e in set(distinct) if e >= 0}
        missing = sorted(e for e in wanted if not self.experts.holds(request.layer, e))
        if missing:
            raise WireError(f"layer {request.layer} experts {missing} are not held here", 409)
        if request.expert_ids.numel() <= INLINE_PAIRS:
            self._arrived += 1
            try:
                await asyncio.sleep(0)  # requests received with this one get here meanwhile
                alone = self._arrived == 1 and self._queued == 0
            finally:
                self._arrived -= 1
            if alone:
                return self._inline(request)
        loop = asyncio.get_running_loop()
        job = _Job(request, loop, loop.create_future())
        self._queued += 1
        self._queue.put(job)
        try:
            return await job.future
        finally:
            self._queued -= 1

    def _inline(self, request: ForwardRequest) -> torch.Tensor:
        self.inline += 1
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(request.hidden.shape[0])
        with torch.inference_mode():  # as the model's own forward runs: no autograd state
            return self.experts.forward(request.layer, request.hidden, request.expert_ids,
                                        request.weights.to(request.hidden.dtype))  # fmt: skip

    def _run(self) -> None:
        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                jobs.append(nxt)
            by_layer: dict[int, list[_Job]] = {}
            for j in jobs:
                by_layer.setdefault(j.request.layer, []).append(j)
            for layer, group in by_layer.items():
                self._compute(layer, group)

    def _compute(self, layer: int, group: list[_Job]) -> None:
        width = max(j.request.expert_ids.shape[1] for j in group)
        hidden = torch.cat([j.request.hidden for j in group])
        ids = torch.cat([_pad(j.request.expert_ids, width, -1) for j in group])
        weights = torch.cat([_pad(j.request.weights.to(hidden.dtype), width, 0) for j in group])
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(hidden.shape[0])
        try:
            out = self.experts.forward(layer, hidden, ids, weights)
        except Exception as exc:
            for j in group:
                j.loop.call_soon_threadsafe(_set_exc, j.future, exc)
            return
        start = 0
        for j in group:
            n = j.request.hidden.shape[0]
            j.loop.call_soon_threadsafe(_set_result, j.future, out[start : start + n])
            start += n


def _pad(t: torch.Tensor, width: int, value: float) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    pad = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype)
    return torch.cat([t, pad], dim=1)


def _set_result(fut: asyncio.Future[torch.Tensor], value: torch.Tensor) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exc(fut: asyncio.Future[torch.Tensor], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
