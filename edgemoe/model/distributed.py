"""`DistributedExperts`: drop-in for a family's fused experts module, spread over executors.

Same call signature as the library's experts module: (hidden [N, H], top_k_index [N, K],
top_k_weights [N, K]) -> [N, H]. The router, shared experts and the combine stay the
library's. The (token, slot) pairs are grouped by executor; remote executors are submitted
first, local ones compute while the remote calls are in flight, then results are summed.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import torch
from torch import nn

from edgemoe.model.executor import SMALL_IDS, ExpertDirectory, ExpertExecutor
from edgemoe.model.routing import RoutingTrace


class DistributedExperts(nn.Module):
    """One MoE layer's routed experts, computed wherever the directory says."""

    def __init__(
        self,
        layer: int,
        num_experts: int,
        directory: ExpertDirectory,
        *,
        recorder: Any | None = None,
        routing: RoutingTrace | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.num_experts = num_experts
        self.directory = directory
        self.recorder = recorder
        self.routing = routing

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}"

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self.routing is not None:
            top_k_index, top_k_weights = self.routing.route(
                self.layer,
                hidden_states.shape[0],
                device=hidden_states.device,
                dtype=top_k_weights.dtype,
            )
        ids = top_k_index.to(torch.long)
        if self.recorder is not None:
            self.recorder.record(self.layer, ids.detach().cpu().numpy())
        groups: dict[int, tuple[ExpertExecutor, list[int]]] = {}
        for expert in _experts_in(ids):
            executor = self.directory.executor_for(self.layer, expert)
            groups.setdefault(id(executor), (executor, []))[1].append(expert)
        if len(groups) == 1:  # one executor takes every row: no split, no sum
            ((executor, _),) = groups.values()
            if getattr(executor, "is_local", False):
                part = executor.forward(self.layer, hidden_states, ids, top_k_weights)
            else:
                part = executor.submit(self.layer, hidden_states, ids, top_k_weights).result()
            return part.to(device=hidden_states.device, dtype=hidden_states.dtype)

        calls = []
        for executor, experts in groups.values():
            mine = torch.isin(ids, torch.tensor(experts, device=ids.device))
            # Only the rows with a slot for this executor travel (fewer bytes to remote peers).
            rows = torch.nonzero(mine.any(dim=1), as_tuple=True)[0]
            masked = torch.where(mine, ids, torch.full_like(ids, -1))[rows]
            calls.append((executor, rows, masked, top_k_weights[rows], hidden_states[rows]))
        # Remote calls first, so the network works while local experts compute.
        calls.sort(key=lambda call: bool(getattr(call[0], "is_local", False)))
        pending = []
        for executor, rows, masked, weights, hidden in calls:
            if getattr(executor, "is_local", False):
                result = executor.forward(self.layer, hidden, masked, weights)
                pending.append((rows, _done(result)))
            else:
                pending.append((rows, executor.submit(self.layer, hidden, masked, weights)))
        out = torch.zeros_like(hidden_states)
        for rows, future in pending:
            out.index_add_(0, rows, future.result().to(device=out.device, dtype=out.dtype))
        return out


def _experts_in(ids: torch.Tensor) -> list[int]:
    """The distinct expert ids of `ids`, ascending."""
    if ids.numel() <= SMALL_IDS:
        return sorted(set(ids.reshape(-1).tolist()))
    return [int(e) for e in torch.unique(ids).tolist()]


def _done(value: torch.Tensor) -> Future[torch.Tensor]:
    future: Future[torch.Tensor] = Future()
    future.set_result(value)
    return future
