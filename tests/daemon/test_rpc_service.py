"""The expert service computes a small request that arrives alone on the event loop and the rest
(large ones, several at once) on its worker, and both give what the experts give when called
directly; tensors cross the wire unchanged, decoded as views of the received bytes."""

from __future__ import annotations

import asyncio

import pytest
import torch

from edgemoe.daemon.rpc import (
    INLINE_PAIRS,
    ExpertService,
    parse_forward,
    tensor_from_wire,
    tensor_to_wire,
)
from edgemoe.daemon.wire import pack, unpack
from edgemoe.model.local import LocalExperts
from edgemoe.model.manifest import Manifest

from .conftest import TinyModel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_tensors_cross_the_wire_unchanged(dtype: torch.dtype) -> None:
    t = (torch.randn(5, 7) * 100).to(dtype)
    for shape in ((5, 7), (0, 7)):
        src = t[: shape[0]]
        wire = unpack(pack(tensor_to_wire(src)))
        name = str(dtype).removeprefix("torch.")
        back = tensor_from_wire(wire, dtypes=(name,), ndim=2, max_elements=64, name="t")
        assert back.dtype == dtype and torch.equal(back, src)


def _request(m: Manifest, rows: int, seed: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(m.num_experts, generator=g)[: m.top_k] for _ in range(rows)])
    return {"layer": 1, "hidden": tensor_to_wire(torch.randn(rows, m.hidden_size, generator=g)),
            "expert_ids": tensor_to_wire(ids),
            "weights": tensor_to_wire(torch.rand(ids.shape, generator=g))}  # fmt: skip


async def test_inline_and_worker_requests_match_the_experts(tiny: TinyModel) -> None:
    m = Manifest.load(tiny.shard_dir)
    local = LocalExperts(tiny.shard_dir).load_all()
    rows_seen: list[int] = []
    service = ExpertService(local, on_batch=rows_seen.append)
    service.start()
    try:
        small_rows = INLINE_PAIRS // m.top_k
        bodies = [_request(m, small_rows, 0), _request(m, small_rows * 4, 1)]
        bodies += [_request(m, 3, s) for s in range(2, 6)]  # concurrent small ones
        bodies += [_request(m, small_rows * 2, s) for s in range(6, 8)]  # concurrent large
        shape = dict(num_layers=m.num_layers, num_experts=m.num_experts,
                     hidden_size=m.hidden_size, dtype=m.dtype)  # fmt: skip
        reqs = [parse_forward(unpack(pack(b)), **shape) for b in bodies]
        small = await service.forward(reqs[0])
        assert service.inline == 1  # small and idle: no thread hand-off
        large = await service.forward(reqs[1])
        assert service.inline == 1  # too many pairs: computed on the worker
        together = await asyncio.gather(*(service.forward(r) for r in reqs[2:6]))
        assert service.inline == 1  # arrived together: batched on the worker
        both = await asyncio.gather(*(service.forward(r) for r in reqs[6:]))
        assert service.inline == 1
        for req, out in zip(reqs, [small, large, *together, *both], strict=True):
            want = local.forward(req.layer, req.hidden, req.expert_ids, req.weights)
            assert torch.allclose(out, want, atol=1e-6)
        assert sum(rows_seen) == sum(r.hidden.shape[0] for r in reqs)
    finally:
        service.stop()
